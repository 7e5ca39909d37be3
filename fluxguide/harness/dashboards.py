"""W&B dashboards built in code: the report (and saved workspace) of a reward study.

A reward study trains one algorithm per reward, several seeds each, all in one W&B group, each run's config
naming its ``reward`` (:class:`fluxguide.harness.tracking.Tracker` logs every metric against
``charts/samples_seen``). Whether a reward was learned or hacked shows in curves side by side: the held-out
verifier and every monitored reward (``eval/rewards/<name>``) against samples seen, per trained reward and
across them. Clicking those panels together in the W&B UI after every study is slow and unrepeatable, so
:func:`study_report` builds the report in code (``wandb_workspaces.reports.v2``) from the study's own names.

Offline (the default of every fluxguide run), nothing goes to the network: :func:`write_report` writes
``wandb_report.md`` (:func:`describe_report`: what each section and panel plots, over which runs) and
``wandb_report.json`` (the report's W&B spec, :func:`report_json`; :func:`report_from_json` rebuilds the report
from it, to ``save()`` later from a machine that is logged in). Online, :func:`write_report` saves the report to
W&B and returns its URL. No ``wandb.Api`` is built unless the report is saved: ``wandb_workspaces`` looks each
runset's project up on W&B when it converts a report to its spec, so :func:`report_json` converts a copy
whose runsets name no project and puts the names back into the spec.

Usage::

    report = study_report(entity=resolve_entity(None, "offline"), project="fluxguide", group="reward-study",
                          rewards={"shapes-clip": "reward-gradient"}, monitored=["shapes-clip", "verifier-partial"],
                          matrix_markdown=matrix, verdicts_markdown=verdicts)
    write_report(report, run_folder, mode="offline")   # -> run_folder / "wandb_report.md"
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import wandb_workspaces.reports.v2 as wr
import wandb_workspaces.workspaces as ws
from wandb_workspaces import expr
from wandb_workspaces.reports.v2 import internal

from fluxguide.errors import UserError
from fluxguide.harness.tracking import SAMPLES_SEEN, resolve_wandb_mode
from fluxguide.serialization import write_text_atomic

#: The entity a report gets offline when neither ``--wandb-entity`` nor ``WANDB_ENTITY`` names one. It is only
#: written to the offline files (and flagged in the description); saving such a report is refused.
PLACEHOLDER_ENTITY = "SET-YOUR-WANDB-ENTITY"
ENTITY_ENV = "WANDB_ENTITY"
REPORT_DESCRIPTION_FILE = "wandb_report.md"
REPORT_JSON_FILE = "wandb_report.json"

#: The study's metrics (names logged by the training scripts' tracker).
VERIFIER = "eval/verifier_pass_rate"
EVAL_REWARD = "eval/reward_mean"
TRAIN_REWARD = "train/reward_mean"
SAMPLES = "eval/samples"
#: The W&B config key naming the reward a run trained on; the report's runsets filter and group by it.
REWARD_KEY = "reward"

# Panels sit two to a row in W&B's 24-column grid.
_PANEL_WIDTH, _PANEL_HEIGHT, _GRID_COLUMNS = 12, 8, 24


class MissingWandbEntityError(UserError, ValueError):
    """A report was to be saved to W&B without an entity (team or user) to save it under."""


def monitored_metric(name: str) -> str:
    """The metric under which monitored reward ``name`` is logged on held-out images: ``eval/rewards/<name>``."""
    return f"eval/rewards/{name}"


def resolve_entity(entity: str | None, mode: str) -> str:
    """The W&B entity of a report: ``entity`` (the ``--wandb-entity`` flag), else ``$WANDB_ENTITY``, else, when
    ``mode`` is not ``"online"``, :data:`PLACEHOLDER_ENTITY` (the offline files are still written).

    Raises:
        MissingWandbEntityError: ``mode`` is ``"online"`` and no entity is given: W&B needs one to save under.
    """
    entity = (entity or os.environ.get(ENTITY_ENV) or "").strip()
    if entity:
        return entity
    if resolve_wandb_mode(mode) == "online":
        raise MissingWandbEntityError(
            "saving the study's W&B report needs an entity (your W&B user or team): pass --wandb-entity NAME "
            f"or set {ENTITY_ENV}; or run with --wandb-mode offline to write the report's description only"
        )
    return PLACEHOLDER_ENTITY


# ------------------------------------------------------------------------------------------ building
def study_runset(*, entity: str, project: str, group: str, reward: str | None = None, name: str | None = None,
                 group_by_reward: bool = False) -> wr.Runset:
    """The study's runs in W&B group ``group``; only those whose config ``reward`` is ``reward`` if given."""
    in_group = expr.Metric("Group") == group
    filters = expr.And(in_group) if reward is None else expr.And(expr.Config(REWARD_KEY) == reward, in_group)
    return wr.Runset(
        entity=entity, project=project, name=name or (f"trained on {reward}" if reward else f"group {group}"),
        filters=filters, groupby=[f"config.{REWARD_KEY}"] if group_by_reward else [],
    )


def _curve(metric: str, title: str, *, group_by_reward: bool) -> wr.LinePlot:
    """A line plot of ``metric`` against samples seen. Grouped by trained reward (mean over seeds, min-max
    band) when several rewards share the panel; otherwise one line per seed, so a diverging seed stays visible."""
    grouping: dict[str, Any] = {}
    if group_by_reward:
        grouping = {"groupby": wr.Config(REWARD_KEY), "groupby_aggfunc": "mean", "groupby_rangefunc": "minmax"}
    return wr.LinePlot(title=title, x=SAMPLES_SEEN, y=[metric], title_x="samples seen", title_y=metric,
                       **grouping)


def _laid_out(panels: list[Any]) -> list[Any]:
    """``panels`` placed left to right, two to a row (W&B would otherwise stack them at its default size)."""
    per_row = _GRID_COLUMNS // _PANEL_WIDTH
    for i, panel in enumerate(panels):
        panel.layout = wr.Layout(x=(i % per_row) * _PANEL_WIDTH, y=(i // per_row) * _PANEL_HEIGHT,
                                 w=_PANEL_WIDTH, h=_PANEL_HEIGHT)
    return panels


def _check_study(group: str, rewards: Mapping[str, str], monitored: Sequence[str]) -> None:
    """Refuse a study the report could not select or label runs for (its names go into filters and titles)."""
    if isinstance(monitored, str):
        raise TypeError(f"monitored must be a sequence of reward names, got the string {monitored!r}")
    if not group.strip():
        raise ValueError("the study's W&B group is empty: name the group its runs were logged to (--wandb-group)")
    if not rewards:
        raise ValueError("a study report needs at least one trained reward (rewards maps reward -> algorithm)")
    for name in [*rewards, *monitored]:
        if not name or not name.strip() or name != name.strip():
            raise ValueError(f"reward name {name!r} is empty or padded with spaces: pass the registry name")


def study_report(
    *,
    entity: str,
    project: str,
    group: str,
    rewards: Mapping[str, str],
    monitored: Sequence[str],
    matrix_markdown: str,
    verdicts_markdown: str,
    title: str | None = None,
) -> wr.Report:
    """The W&B report of a reward study (built in memory; nothing is saved or looked up).

    Sections: the verdicts and the reward x reward matrix first (the study's answer); then every monitored
    reward across all trained rewards (one panel each, runs grouped by config ``reward``) beside the held-out
    verifier; then per trained reward (``rewards`` maps reward -> the algorithm that trained it) a panel grid of
    that reward's runs in ``group`` alone: held-out verifier, training reward, trained reward on held-out
    prompts and each monitored reward against samples seen; last, the sample grids (``eval/samples``).

    Args:
        entity / project / group: where the study's runs are (``group`` is the W&B group of all of them).
        rewards: trained reward -> algorithm, in the order the sections appear.
        monitored: the rewards scored on held-out images (``eval/rewards/<name>``), trained and untrained.
        matrix_markdown / verdicts_markdown: the study's markdown tables, shown as they are.
        title: the report's title (default: ``"Reward study: <group>"``).
    """
    _check_study(group, rewards, monitored)
    monitored = list(dict.fromkeys(monitored))
    title = title or f"Reward study: {group}"
    trained = ", ".join(f"`{reward}` ({algorithm})" for reward, algorithm in rewards.items())
    blocks: list[Any] = [
        wr.P(f"Runs of W&B group '{group}' in project '{project}'. Trained rewards: {len(rewards)}; monitored on "
             f"held-out images: {', '.join(monitored) or 'none'}. Every curve is plotted against samples seen "
             f"({SAMPLES_SEEN}). A reward that is learned lifts the held-out verifier with it; a hacked one rises "
             "alone while the verifier and the other rewards stay flat or fall."),
        wr.MarkdownBlock(f"Trained rewards (algorithm): {trained}."),
        wr.TableOfContents(),
        wr.H1("Verdicts"),
        wr.MarkdownBlock(verdicts_markdown),
        wr.H1("Reward x reward matrix"),
        wr.P("Trained on the row's reward, scored by the column's reward on held-out images: mean [lo, hi]."),
        wr.MarkdownBlock(matrix_markdown),
        wr.H1("Monitored rewards across trained rewards"),
        wr.P("One line per trained reward (config 'reward'): the mean over its seeds, the band from min to max."),
        wr.PanelGrid(
            runsets=[study_runset(entity=entity, project=project, group=group, group_by_reward=True)],
            panels=_laid_out(
                [_curve(VERIFIER, "held-out verifier pass rate", group_by_reward=True)]
                + [_curve(monitored_metric(m), f"monitored: {m}", group_by_reward=True) for m in monitored]
            ),
        ),
    ]
    for reward, algorithm in rewards.items():
        blocks += [
            wr.H2(f"Trained on {reward} ({algorithm})"),
            wr.P(f"Runs with config reward = '{reward}' in group '{group}', one line per seed."),
            wr.PanelGrid(
                runsets=[study_runset(entity=entity, project=project, group=group, reward=reward)],
                panels=_laid_out(
                    [
                        _curve(VERIFIER, "held-out verifier pass rate", group_by_reward=False),
                        _curve(TRAIN_REWARD, f"training reward ({reward})", group_by_reward=False),
                        _curve(EVAL_REWARD, f"trained reward on held-out prompts ({reward})", group_by_reward=False),
                    ]
                    + [_curve(monitored_metric(m), f"monitored: {m}", group_by_reward=False) for m in monitored]
                ),
            ),
        ]
    blocks += [
        wr.H1("Samples"),
        wr.P(f"The held-out sample grids ({SAMPLES}) of every run, by step."),
        wr.PanelGrid(
            runsets=[study_runset(entity=entity, project=project, group=group, group_by_reward=True)],
            panels=[wr.MediaBrowser(title="held-out samples", media_keys=[SAMPLES], grid_x_axis="step",
                                    grid_y_axis="run", layout=wr.Layout(x=0, y=0, w=_GRID_COLUMNS, h=12))],
        ),
    ]
    return wr.Report(entity=entity, project=project, title=title[:128],
                     description=f"fluxguide reward study, W&B group {group}", blocks=blocks)


def study_workspace(
    *, entity: str, project: str, group: str, rewards: Mapping[str, str], monitored: Sequence[str],
    name: str | None = None,
) -> ws.Workspace:
    """A saved W&B workspace with the study's panels (``workspace.save()`` puts it on W&B; building it is offline).

    One runset (the group's runs, grouped by config ``reward``, so each trained reward is one line: mean and
    min-max band over seeds), x axis samples seen; sections: held-out verifier and trained / training reward,
    each monitored reward, the sample grids.
    """
    _check_study(group, rewards, monitored)
    monitored = list(dict.fromkeys(monitored))
    return ws.Workspace(
        entity=entity, project=project, name=name or f"Reward study: {group}",
        settings=ws.WorkspaceSettings(x_axis=SAMPLES_SEEN),
        runset_settings=ws.RunsetSettings(filters=expr.And(expr.Metric("Group") == group),
                                          groupby=[expr.Config(REWARD_KEY)]),
        sections=[
            ws.Section(name="held-out verifier and reward", is_open=True, panels=[
                _curve(VERIFIER, "held-out verifier pass rate", group_by_reward=True),
                _curve(EVAL_REWARD, "trained reward on held-out prompts", group_by_reward=True),
                _curve(TRAIN_REWARD, "training reward", group_by_reward=True),
            ]),
            ws.Section(name="monitored rewards (held-out images)", is_open=True, panels=[
                _curve(monitored_metric(m), f"monitored: {m}", group_by_reward=True) for m in monitored
            ]),
            ws.Section(name="samples", is_open=True, panels=[
                wr.MediaBrowser(title="held-out samples", media_keys=[SAMPLES], grid_x_axis="step", grid_y_axis="run")
            ]),
        ],
    )


# ------------------------------------------------------------------------------------------ offline form
def report_json(report: wr.Report) -> dict[str, Any]:
    """The report's W&B spec (what ``report.save()`` uploads), built without the network.

    ``wandb_workspaces`` asks W&B for each runset's project id while converting; a copy whose runsets name no
    project is converted instead, and each runset gets its entity and project names back (the id is looked up
    when the report is saved).
    """
    offline = copy.deepcopy(report)
    grids = [b for b in offline.blocks if isinstance(b, wr.PanelGrid)]
    names = [[(rs.entity, rs.project) for rs in grid.runsets] for grid in grids]
    for grid in grids:
        for rs in grid.runsets:
            rs.entity, rs.project = "", ""
    model = offline._to_model()
    model_grids = [b for b in model.spec.blocks if isinstance(b, internal.PanelGrid)]
    for grid, grid_names in zip(model_grids, names, strict=True):
        for rs, (entity, project) in zip(grid.metadata.run_sets, grid_names, strict=True):
            if entity or project:
                rs.project = internal.Project(entity_name=entity, name=project)
    return model.model_dump(mode="json", by_alias=True, exclude_none=True)


def report_from_json(data: Mapping[str, Any] | str | Path, *, entity: str | None = None) -> wr.Report:
    """The report stored by :func:`report_json` (a dict, or the path of ``wandb_report.json``), e.g. to save it
    from a machine logged in to W&B: ``report_from_json(path, entity="my-team").save()``.

    ``entity`` (if given) replaces the report's entity and its runsets' (an offline report may carry
    :data:`PLACEHOLDER_ENTITY`).
    """
    if isinstance(data, (str, Path)):
        data = json.loads(Path(data).read_text())
    report = wr.Report._from_model(internal.ReportViewspec.model_validate(dict(data)))
    if entity is not None:
        report.entity = entity
        for grid in (b for b in report.blocks if isinstance(b, wr.PanelGrid)):
            for rs in grid.runsets:
                if rs.entity:
                    rs.entity = entity
    return report


def _text(value: Any) -> str:
    """The plain text of a report text field (a string, inline code / link / LaTeX, or a list of them)."""
    if isinstance(value, list):
        return "".join(_text(v) for v in value)
    if isinstance(value, wr.InlineCode):
        return f"`{value.code}`"
    for field in ("text", "code"):
        if hasattr(value, field) and not isinstance(value, str):
            return _text(getattr(value, field))
    return str(value)


def _metric_name(metric: Any) -> str:
    if isinstance(metric, wr.Config):
        return f"config {metric.name}"
    return str(getattr(metric, "name", metric))


def _describe_panel(panel: Any) -> str:
    if isinstance(panel, wr.LinePlot):
        ys = ", ".join(f"`{_metric_name(y)}`" for y in panel.y)
        line = f"- **{panel.title or ys}** (line plot): {ys} against `{_metric_name(panel.x)}`"
        if panel.groupby is not None:
            line += (f", grouped by {_metric_name(panel.groupby)} ({panel.groupby_aggfunc or 'mean'}, "
                     f"{panel.groupby_rangefunc or 'no'} band)")
        return line
    if isinstance(panel, wr.MediaBrowser):
        keys = ", ".join(f"`{k}`" for k in panel.media_keys)
        return f"- **{panel.title or keys}** (media browser): {keys}"
    title = getattr(panel, "title", None)
    return f"- {type(panel).__name__}{f' {title!r}' if title else ''}"


def _describe_runset(rs: wr.Runset) -> str:
    where = f"{rs.entity}/{rs.project}" if rs.entity or rs.project else "the report's project"
    line = f"Runs ({rs.name}): {where}, filter `{rs.filters or 'none'}`"
    if rs.groupby:  # "config.reward" as built, "config.reward.value" as loaded back from a spec
        keys = [g.removesuffix(".value").replace(".", " ", 1) for g in rs.groupby]
        line += f", grouped by {', '.join(keys)}"
    return line


def describe_report(report: wr.Report) -> str:
    """A markdown description of ``report`` to read offline: its title, each section and text block, and each
    panel grid's runs (filter, grouping) and panels (metrics against their x axis)."""
    lines = [f"# {report.title}", "", f"W&B report for {report.entity}/{report.project}."]
    if report.entity == PLACEHOLDER_ENTITY:
        lines.append(f"The entity is a placeholder ({PLACEHOLDER_ENTITY}): to save the report, pass "
                     f"--wandb-entity NAME or set {ENTITY_ENV}.")
    if report.description:
        lines.append(report.description)
    for block in report.blocks:
        lines.append("")
        if isinstance(block, wr.H1):
            lines.append(f"## {_text(block.text)}")
        elif isinstance(block, wr.H2):
            lines.append(f"### {_text(block.text)}")
        elif isinstance(block, wr.H3):
            lines.append(f"#### {_text(block.text)}")
        elif isinstance(block, (wr.P, wr.MarkdownBlock)):
            lines.append(_text(block.text))
        elif isinstance(block, wr.PanelGrid):
            lines += [_describe_runset(rs) for rs in block.runsets]
            lines += [""] + [_describe_panel(p) for p in block.panels]
        elif isinstance(block, wr.TableOfContents):
            lines.pop()
        else:
            lines.append(f"({type(block).__name__})")
    return "\n".join(lines).rstrip() + "\n"


def write_report(report: wr.Report, run_folder: str | Path, *, mode: str) -> Path | str:
    """Publish ``report``: online, save it to W&B and return its URL; offline (or disabled), write
    ``<run_folder>/wandb_report.md`` (:func:`describe_report`) and ``<run_folder>/wandb_report.json``
    (:func:`report_json`) atomically and return the description's path, without touching the network.

    Online, the description is written too, with the report's URL, so the run folder says where the report is.

    Raises:
        MissingWandbEntityError: ``mode`` is ``"online"`` and the report's entity is the offline placeholder.
    """
    mode = resolve_wandb_mode(mode)
    run_folder = Path(run_folder)
    description_path = run_folder / REPORT_DESCRIPTION_FILE
    if mode == "online":
        if not report.entity or report.entity == PLACEHOLDER_ENTITY:
            raise MissingWandbEntityError(
                f"the report's W&B entity is {report.entity or 'empty'!r}: pass --wandb-entity NAME or set "
                f"{ENTITY_ENV} (the W&B user or team to save it under)"
            )
        report.save()
        url = str(report.url)
        write_text_atomic(f"W&B report: {url}\n\n{describe_report(report)}", description_path, root=run_folder)
        return url
    write_text_atomic(json.dumps(report_json(report), indent=2) + "\n", run_folder / REPORT_JSON_FILE,
                      root=run_folder)
    write_text_atomic(describe_report(report), description_path, root=run_folder)
    return description_path
