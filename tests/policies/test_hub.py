"""Policies as Hub-style folders: a saved folder loads back bit for bit, its model card holds the run's held-out
numbers and parses as Hub metadata, damaged or foreign folders are refused naming the file, and
experiments/export_policy.py exports a tiny training run end to end."""

from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path

import pytest
import torch
import tyro
import yaml
from huggingface_hub import ModelCard

from fluxguide.checkpointing import latest_checkpoint, read_manifest
from fluxguide.errors import UserError
from fluxguide.harness.config import ConfigError, flat_config
from fluxguide.policies import (
    AttentionGuidanceModel,
    MLPGuidanceModel,
    MultiObjectiveGuidance,
    PolicyCard,
    load_guidance_model,
    load_policy_folder,
    save_policy_folder,
)
from fluxguide.policies.hub import PolicyFolderError, RunFolderError, format_result
from tests.scripts import SMALL_RUNS, load_script, run_script


def randomized(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """``model`` with every parameter drawn at random (a fresh network's last layer is zero: too easy to match)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    return model


def composite_policy() -> MultiObjectiveGuidance:
    """A composite of two architectures: its config nests theirs, so a rebuild must get every part right."""
    return randomized(MultiObjectiveGuidance(
        [MLPGuidanceModel(latent_channels=48, hidden_dim=8, num_layers=1, vec_dim=64),
         AttentionGuidanceModel(latent_channels=48, hidden_dim=8, num_heads=2, num_layers=1, txt_dim=64, vec_dim=64)],
        weights=[0.7, 0.3]))


def test_a_policy_folder_loads_back_bit_for_bit(tmp_path) -> None:
    policy = composite_policy()
    folder = save_policy_folder(policy, tmp_path / "policy")
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert json.loads((folder / "config.json").read_text()) == policy.config
    for loaded in (load_policy_folder(folder), load_policy_folder(str(folder)),
                   load_guidance_model(folder / "model.safetensors")):  # fluxguide's own format, readable alone
        assert type(loaded) is MultiObjectiveGuidance and loaded.config == policy.config
        expected, got = policy.state_dict(), loaded.state_dict()
        assert expected.keys() == got.keys()
        assert all(torch.equal(expected[k], got[k]) for k in expected)
    # Saving again replaces the folder whole; no temporary folder is left beside it.
    other = randomized(MLPGuidanceModel(latent_channels=48, hidden_dim=8, num_layers=1, vec_dim=64), 1)
    save_policy_folder(other, folder)
    assert type(load_policy_folder(folder)) is MLPGuidanceModel
    assert [p.name for p in tmp_path.iterdir()] == ["policy"]


def hub_snapshot(folder: Path, cache: Path, repo_id: str) -> None:
    """Put ``folder`` in a huggingface_hub cache as the ``main`` revision of model repository ``repo_id``: what a
    download leaves there (the layout huggingface_hub reads with ``local_files_only``; no network here)."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots").mkdir()
    shutil.copytree(folder, repo / "snapshots" / commit)


def test_a_hub_id_loads_through_huggingface_hub(tmp_path) -> None:
    policy = composite_policy()
    folder = save_policy_folder(policy, tmp_path / "policy", repo_id="someone/composite")
    hub_snapshot(folder, tmp_path / "cache", "someone/composite")
    loaded = load_policy_folder("someone/composite", cache_dir=tmp_path / "cache", local_files_only=True)
    assert type(loaded) is MultiObjectiveGuidance and loaded.config == policy.config
    assert all(torch.equal(a, b) for a, b in zip(policy.state_dict().values(), loaded.state_dict().values()))
    assert "load_policy_folder('someone/composite')" in (folder / "README.md").read_text()


def test_a_folder_of_other_files_is_not_replaced(tmp_path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(PolicyFolderError, match=r"holds files a policy folder does not \(notes.txt\)"):
        save_policy_folder(composite_policy(), tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine" and not (tmp_path / "model.safetensors").exists()


def test_damaged_or_foreign_folders_are_refused_naming_the_file(tmp_path) -> None:
    policy = composite_policy()
    corrupt = save_policy_folder(policy, tmp_path / "corrupt")
    weights = corrupt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(PolicyFolderError, match=r"model.safetensors of .*corrupt cannot be loaded: .*not a readable "
                                                r"safetensors file.*write the folder again with save_policy_folder"):
        load_policy_folder(corrupt)

    no_config = save_policy_folder(policy, tmp_path / "no_config")
    (no_config / "config.json").unlink()
    with pytest.raises(PolicyFolderError, match=r"not a policy folder: config.json is missing.*save_policy_folder"):
        load_policy_folder(no_config)

    foreign = save_policy_folder(policy, tmp_path / "foreign")
    (foreign / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 8}))
    with pytest.raises(PolicyFolderError, match=r"config.json of .*foreign is not a fluxguide guidance config"):
        load_policy_folder(foreign)

    edited = save_policy_folder(policy, tmp_path / "edited")
    config = json.loads((edited / "config.json").read_text())
    config["weights"] = [0.5, 0.5]
    (edited / "config.json").write_text(json.dumps(config))
    with pytest.raises(PolicyFolderError, match=r"config.json of .*edited .* disagrees with the config inside its "
                                                r"model.safetensors"):
        load_policy_folder(edited)

    (tmp_path / "bad_json").mkdir()
    (tmp_path / "bad_json" / "config.json").write_text("{not json")
    with pytest.raises(PolicyFolderError, match=r"config.json of .*bad_json is not valid JSON"):
        load_policy_folder(tmp_path / "bad_json")

    with pytest.raises(PolicyFolderError, match=r"neither a policy folder nor a hub model id"):
        load_policy_folder(tmp_path / "missing")
    # A hub id that cannot be read (here: nothing cached and no download allowed) is refused the same way.
    with pytest.raises(PolicyFolderError, match=r"the hub repository 'nobody/no-such-policy' \(revision main\) "
                                                r"cannot be read"):
        load_policy_folder("nobody/no-such-policy", local_files_only=True, cache_dir=tmp_path / "cache")
    assert all(issubclass(e, UserError) for e in (PolicyFolderError, RunFolderError))


# --------------------------------------------------------------------------------------- a real tiny run
@pytest.fixture(scope="module")
def tiny_rg_run(tmp_path_factory) -> tuple[Path, dict[str, float]]:
    """A finished reward-gradient run on the random shapes world (seconds) and its final held-out metrics."""
    run_dir = tmp_path_factory.mktemp("hub") / "rg"
    final = run_script(load_script("train_reward_gradient"), [
        *SMALL_RUNS["train_reward_gradient"], "--run-dir", str(run_dir), "--total-updates", "2", "--eval-every", "2",
        "--checkpoint-every", "2", "--eval-num-prompts", "4"])
    return run_dir, final


def test_the_card_of_a_run_holds_its_heldout_numbers_and_parses_as_hub_metadata(tiny_rg_run, tmp_path) -> None:
    run_dir, final = tiny_rg_run
    state = read_manifest(latest_checkpoint(run_dir))["state"]
    assert "eval/verifier_pass_rate" in final and state["last_eval"] == final
    card = PolicyCard.from_run(run_dir)
    folder = save_policy_folder(load_guidance_model(run_dir / "guidance.safetensors"), tmp_path / "p", card=card,
                                repo_id="someone/rg-shapes")
    text = (folder / "README.md").read_text()
    for name, value in final.items():
        assert f"| {name} | {format_result(value)} |" in text
    assert f"| eval/verifier_pass_rate | {final['eval/verifier_pass_rate']:.4f} |" in text
    assert "load_policy_folder('someone/rg-shapes')" in text and "guide_pipeline(pipe, policy" in text
    assert "update 2 of 2" in text and "shapes-random" in text and "shapes-clip-retrieval" in text

    data = ModelCard.load(folder / "README.md").data  # the Hub's own parser
    assert data.library_name == "fluxguide" and "reward-gradient" in data.tags
    assert data.base_model is None  # the shapes world is no Hub model: no base_model the Hub would reject
    meta = data.to_dict()["fluxguide"]
    assert meta["algorithm"] == "reward-gradient" and meta["reward"] == "shapes-clip-retrieval"
    assert meta["backbone"] == "shapes-random" and meta["backbone_fingerprint"] == state["backbone_fingerprint"]
    assert meta["results"] == final
    assert yaml.safe_load(text.split("---")[1])["fluxguide"]["command"] == card.command

    # Without a script to check against, the command sets every recorded option; it parses back to the config.
    argv = shlex.split(card.command)
    assert argv[:2] == ["python", "experiments/train_reward_gradient.py"] and "inferred" in card.command_source
    script = load_script("train_reward_gradient")
    assert flat_config(tyro.cli(script.Config, args=argv[2:])) == json.loads(json.dumps(state["config"]))


def test_a_hub_base_model_is_named_in_the_metadata(tmp_path) -> None:
    card = PolicyCard(algorithm="ppo", backbone="flux", model_path="black-forest-labs/FLUX.1-dev",
                      results={"eval/reward_mean": 0.25})
    folder = save_policy_folder(composite_policy(), tmp_path / "p", card=card)
    data = ModelCard.load(folder / "README.md").data
    assert data.base_model == "black-forest-labs/FLUX.1-dev"
    assert "FluxPipeline.from_pretrained('black-forest-labs/FLUX.1-dev')" in (folder / "README.md").read_text()


def test_export_policy_end_to_end(tiny_rg_run, tmp_path) -> None:
    run_dir, final = tiny_rg_run
    export = load_script("export_policy")
    out = run_script(export, ["--run-dir", str(run_dir), "--out", str(tmp_path / "policies" / "rg")])
    trained = load_guidance_model(run_dir / "guidance.safetensors")
    loaded = load_policy_folder(out)
    assert type(loaded) is type(trained) and loaded.config == trained.config
    assert all(torch.equal(a, b) for a, b in zip(trained.state_dict().values(), loaded.state_dict().values()))
    meta = ModelCard.load(out / "README.md").data.to_dict()["fluxguide"]
    assert meta["results"] == final
    # The command is the preset's flags that differ, checked: it parses back to the recorded config.
    assert "checked" in meta["command_source"]
    argv = shlex.split(meta["command"])
    assert argv[:2] == ["python", "experiments/train_reward_gradient.py"]
    assert "--wandb-group" not in argv and argv[argv.index("--run-dir") + 1] == str(run_dir)
    recorded = read_manifest(latest_checkpoint(run_dir))["state"]["config"]
    script = load_script("train_reward_gradient")
    assert flat_config(tyro.cli(script.Config, args=argv[2:])) == json.loads(json.dumps(recorded))

    with pytest.raises(ConfigError, match=r"--push-to-hub 'not an id' is not a Hub model id"):
        run_script(export, ["--run-dir", str(run_dir), "--push-to-hub", "not an id"])
    (tmp_path / "unfinished").mkdir()
    with pytest.raises(RunFolderError, match=r"holds no guidance.safetensors: the run has not finished"):
        run_script(export, ["--run-dir", str(tmp_path / "unfinished"), "--out", str(tmp_path / "x")])
