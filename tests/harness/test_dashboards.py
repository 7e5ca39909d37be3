"""The reward study's W&B report, built and written offline with real ``wandb_workspaces`` objects.

Every test runs behind a guard (``offline``): an Internet socket, a host-name lookup or a ``wandb.Api`` (which
``wandb_workspaces`` builds to look projects up, and to save) raises, so a test passes only if nothing reached for
the network.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import wandb
import wandb_workspaces.reports.v2 as wr
from wandb_workspaces import expr

from fluxguide.errors import UserError
from fluxguide.harness.dashboards import (
    PLACEHOLDER_ENTITY,
    MissingWandbEntityError,
    describe_report,
    monitored_metric,
    report_from_json,
    report_json,
    resolve_entity,
    study_report,
    study_workspace,
    write_report,
)
from fluxguide.harness.tracking import SAMPLES_SEEN
from fluxguide.serialization import LinkRefusedError

REWARDS = {"shapes-clip": "reward-gradient", "shapes-aesthetic": "ppo", "composite": "reward-gradient"}
MONITORED = ["shapes-clip", "shapes-clip-retrieval", "shapes-aesthetic", "verifier-partial", "composite"]
GROUP = "reward-study"
MATRIX = ("| trained \\ scored | shapes-clip | verifier-partial |\n|---|---|---|\n"
          "| shapes-clip | 0.31 [0.29, 0.33] | 0.12 [0.10, 0.15] |\n")
VERDICTS = "- **shapes-clip**: hacked (its score rose, the verifier did not)\n"


class NetworkUsed(RuntimeError):
    """Raised by the guard where a test reached for the network."""


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """W&B offline, no entity in the environment, and no Internet socket, name lookup or ``wandb.Api``."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_ENTITY", raising=False)
    connect = socket.socket.connect

    def guarded_connect(self: socket.socket, address: object) -> None:
        if self.family in (socket.AF_INET, socket.AF_INET6):
            raise NetworkUsed(f"socket.connect{address!r}")
        connect(self, address)

    def refuse(what: str):
        def refused(*args: object, **kwargs: object) -> None:
            raise NetworkUsed(f"{what} called")
        return refused

    monkeypatch.setattr(socket.socket, "connect", guarded_connect)
    monkeypatch.setattr(socket, "getaddrinfo", refuse("socket.getaddrinfo"))
    monkeypatch.setattr(wandb, "Api", refuse("wandb.Api"))


def reward_study_report(entity: str = "my-team") -> wr.Report:
    return study_report(entity=entity, project="fluxguide", group=GROUP, rewards=REWARDS, monitored=MONITORED,
                        matrix_markdown=MATRIX, verdicts_markdown=VERDICTS)


def panel_grids(report: wr.Report) -> list[wr.PanelGrid]:
    return [b for b in report.blocks if isinstance(b, wr.PanelGrid)]


def conditions_of(runset: wr.Runset) -> set[str]:
    """A runset's filter as a set of ``"section:name=value"`` conditions (all AND-ed)."""
    return {f"{f.key.section}:{f.key.name}={f.value}" for f in expr.string_to_filterexpr_list(runset.filters)
            if f.op in ("=", "==")}


def plotted_metrics(grid: wr.PanelGrid) -> list[str]:
    return [y for p in grid.panels if isinstance(p, wr.LinePlot) for y in p.y]


def test_the_guard_catches_what_the_package_would_look_up() -> None:
    """Without :func:`report_json`, converting the report asks W&B for the runsets' project: the guard stops it."""
    with pytest.raises(NetworkUsed, match="wandb.Api"):
        reward_study_report()._to_model()


def test_each_reward_has_a_grid_of_its_own_runs_in_the_group() -> None:
    report = reward_study_report()
    per_reward = {}
    for grid in panel_grids(report):
        (runset,) = grid.runsets
        conditions = conditions_of(runset)
        assert f"run:Group={GROUP}" in conditions  # every grid stays inside the study's group
        rewards = [c.split("=", 1)[1] for c in conditions if c.startswith("config:reward=")]
        if rewards:
            per_reward[rewards[0]] = grid
    assert list(per_reward) == list(REWARDS)  # one grid per trained reward, in the study's order
    for reward, grid in per_reward.items():
        assert conditions_of(grid.runsets[0]) == {f"config:reward={reward}", f"run:Group={GROUP}"}
        assert plotted_metrics(grid) == ["eval/verifier_pass_rate", "train/reward_mean", "eval/reward_mean",
                                 *[monitored_metric(m) for m in MONITORED]]
        assert all(p.x == SAMPLES_SEEN for p in grid.panels)
    # The spec W&B receives filters on the config key and the group as well.
    spec_runsets = [b["metadata"]["runSets"][0] for b in report_json(report)["spec"]["blocks"]
                    if b["type"] == "panel-grid"]
    clip = [rs for rs in spec_runsets if {"key": {"section": "config", "name": "reward"}, "op": "=",
                                          "value": "shapes-clip", "disabled": False} in rs["filters"]["filters"]]
    assert len(clip) == 1 and clip[0]["project"] == {"entityName": "my-team", "name": "fluxguide"}


def test_one_panel_per_monitored_reward_across_all_rewards_runs() -> None:
    report = reward_study_report()
    (across,) = [g for g in panel_grids(report) if any(isinstance(p, wr.LinePlot) for p in g.panels)
                 and not any(c.startswith("config:reward=") for c in conditions_of(g.runsets[0]))]
    assert conditions_of(across.runsets[0]) == {f"run:Group={GROUP}"}  # every trained reward's runs
    plotted = plotted_metrics(across)
    for name in MONITORED:
        assert plotted.count(monitored_metric(name)) == 1
    assert all(p.groupby == wr.Config("reward") for p in across.panels)  # one line per trained reward
    # Two panels per row, none overlapping.
    places = {(p.layout.x, p.layout.y) for p in across.panels}
    assert len(places) == len(across.panels) and {x for x, _ in places} == {0, 12}


def test_the_matrix_verdicts_and_samples_are_in_the_report() -> None:
    report = reward_study_report()
    markdown = [b.text for b in report.blocks if isinstance(b, wr.MarkdownBlock)]
    assert MATRIX in markdown and VERDICTS in markdown
    browsers = [p for g in panel_grids(report) for p in g.panels if isinstance(p, wr.MediaBrowser)]
    assert [b.media_keys for b in browsers] == [["eval/samples"]]
    contents = [b.get("content") for b in report_json(report)["spec"]["blocks"] if b["type"] == "markdown-block"]
    assert MATRIX in contents and VERDICTS in contents  # the spec W&B receives holds them as written


def test_write_report_offline_writes_the_description_and_the_spec_and_never_saves(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    saves = []
    monkeypatch.setattr(wr.Report, "save", lambda self, *a, **k: saves.append(self))
    report = reward_study_report(entity=resolve_entity(None, "offline"))
    written = write_report(report, tmp_path / "run", mode="offline")
    assert saves == []
    assert written == tmp_path / "run" / "wandb_report.md"
    text = written.read_text()
    assert text.startswith("# Reward study: reward-study\n")
    assert PLACEHOLDER_ENTITY in text and "--wandb-entity" in text  # the placeholder is flagged
    assert MATRIX.strip() in text and VERDICTS.strip() in text
    for reward in REWARDS:
        assert f"`Config(\"reward\") == '{reward}' and Metric(\"Group\") == '{GROUP}'`" in text
    for name in MONITORED:
        assert f"`{monitored_metric(name)}` against `{SAMPLES_SEEN}`" in text
    spec = json.loads((tmp_path / "run" / "wandb_report.json").read_text())
    assert spec["project"] == {"entityName": PLACEHOLDER_ENTITY, "name": "fluxguide"}
    assert spec == report_json(report)
    # The spec rebuilds the same report (to be saved later from a machine logged in to W&B).
    again = report_from_json(tmp_path / "run" / "wandb_report.json")
    assert report_json(again) == spec and describe_report(again) == describe_report(report)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["wandb_report.json", "wandb_report.md"]
    # Given an entity, the rebuilt report and every runset move from the placeholder to it.
    moved = report_json(report_from_json(spec, entity="my-team"))
    assert PLACEHOLDER_ENTITY not in json.dumps(moved) and moved["project"]["entityName"] == "my-team"
    assert moved["spec"] == json.loads(json.dumps(spec["spec"]).replace(PLACEHOLDER_ENTITY, "my-team"))


def test_write_report_refuses_a_planted_link(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere.md"
    target.write_text("keep")
    (tmp_path / "wandb_report.md").symlink_to(target)
    with pytest.raises(LinkRefusedError):
        write_report(reward_study_report(), tmp_path, mode="offline")
    assert target.read_text() == "keep"


def test_write_report_online_saves_and_returns_the_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The online path, with W&B's own upload replaced by a recorder (no account in tests)."""
    url = "https://wandb.ai/my-team/fluxguide/reports/Reward-study--abc"
    saves = []
    monkeypatch.setattr(wr.Report, "save", lambda self, *a, **k: saves.append(self) or self)
    monkeypatch.setattr(wr.Report, "url", property(lambda self: url))
    report = reward_study_report()
    assert write_report(report, tmp_path, mode="online") == url
    assert saves == [report]
    assert (tmp_path / "wandb_report.md").read_text().startswith(f"W&B report: {url}\n")


def test_the_entity_comes_from_the_flag_then_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_entity(None, "offline") == PLACEHOLDER_ENTITY
    assert resolve_entity(None, "disabled") == PLACEHOLDER_ENTITY
    monkeypatch.setenv("WANDB_ENTITY", "from-env")
    assert resolve_entity(None, "online") == "from-env"
    assert resolve_entity("from-flag", "online") == "from-flag"


def test_online_without_an_entity_is_a_user_error_naming_the_flag(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(MissingWandbEntityError, match="--wandb-entity") as caught:
        resolve_entity(None, "online")
    assert isinstance(caught.value, UserError)
    saves = []
    monkeypatch.setattr(wr.Report, "save", lambda self, *a, **k: saves.append(self))
    with pytest.raises(MissingWandbEntityError, match="--wandb-entity"):
        write_report(reward_study_report(entity=PLACEHOLDER_ENTITY), tmp_path, mode="online")
    assert saves == [] and not list(tmp_path.iterdir())


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"rewards": {}}, "at least one trained reward"),
    ({"group": " "}, "--wandb-group"),
    ({"monitored": ["shapes-clip", " composite"]}, "' composite'"),
    ({"monitored": "shapes-clip"}, "sequence of reward names"),
])
def test_a_malformed_study_is_refused(kwargs: dict, message: str) -> None:
    arguments = {"entity": "e", "project": "p", "group": GROUP, "rewards": REWARDS, "monitored": MONITORED,
                 "matrix_markdown": MATRIX, "verdicts_markdown": VERDICTS, **kwargs}
    with pytest.raises((ValueError, TypeError), match=message):
        study_report(**arguments)


def test_the_workspace_builds_offline_with_the_same_panels() -> None:
    workspace = study_workspace(entity="my-team", project="fluxguide", group=GROUP, rewards=REWARDS,
                                monitored=MONITORED)
    spec = workspace._to_model().model_dump(mode="json", by_alias=True, exclude_none=True)
    panels = [p["config"] for s in spec["spec"]["section"]["panelBankConfig"]["sections"] for p in s["panels"]]
    plotted = [m for c in panels for m in c.get("metrics", []) + c.get("mediaKeys", [])]
    assert plotted == ["eval/verifier_pass_rate", "eval/reward_mean", "train/reward_mean",
                       *[monitored_metric(m) for m in MONITORED], "eval/samples"]
    assert workspace.settings.x_axis == SAMPLES_SEEN
    assert conditions_of(wr.Runset(filters=workspace.runset_settings.filters)) == {f"run:Group={GROUP}"}

