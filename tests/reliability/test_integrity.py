"""Integrity end to end (issue 27): a resumed run's options are compared with those its checkpoint recorded, and
behaviour cloning compares the dataset's backbone fingerprint with the loaded base model's. Each refusal is one
line naming the flag or the dataset and the fix (exit 2)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fluxguide.checkpointing import latest_checkpoint, load_checkpoint
from fluxguide.data.store import DatasetError, GuidanceDataset
from fluxguide.harness.cli import cli
from fluxguide.harness.config import RESUME_MAY_CHANGE, ConfigError, check_resume_config
from fluxguide.provenance import FingerprintError, check_dataset_fingerprint
from tests.reliability.test_data_safety import chunk
from tests.scripts import SMALL_RUN, load_script


def run_cli(script, argv: list[str]) -> None:
    cli(script.main, script.Config, args=argv)


def test_a_resume_with_a_changed_option_is_refused_naming_it(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    script = load_script("train_reward_gradient")
    argv = [*SMALL_RUN, "--batch-size", "2", "--run-dir", str(tmp_path), "--eval-every", "100"]
    run_cli(script, [*argv, "--total-updates", "1"])
    capsys.readouterr()
    # A longer budget and another checkpoint cadence are what resuming is for; the learning rate is not.
    again = [*argv, "--total-updates", "2", "--checkpoint-every", "1", "--lr", "0.003"]
    with pytest.raises(SystemExit) as exit_:
        run_cli(script, again)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "--lr: recorded 0.01, given 0.003" in err
    assert "--total-updates" not in err and "--checkpoint-every" not in err
    assert "--allow-config-change" in err and "another --run-dir" in err
    assert latest_checkpoint(tmp_path).name == "step_000000001"  # nothing was trained or written

    run_cli(script, [*again, "--allow-config-change"])  # the explicit option resumes with the new value
    assert "resuming with changed options" in capsys.readouterr().out
    state = load_checkpoint(latest_checkpoint(tmp_path), restore_global_rng=False)
    assert state.step == 2 and state.state["config"]["lr"] == 0.003


def test_the_resume_comparison_accepts_older_checkpoints_and_what_may_change() -> None:
    current = {"lr": 0.01, "hidden_dim": 16, "total_updates": 9, "device": "cpu", "new_flag": 3,
               "init_policy": None, "eval_prompts": "shapes-heldout"}
    recorded = {"lr": 0.01, "hidden_dim": 16, "total_updates": 2, "device": "cuda", "removed_flag": 1,
                "init_policy": None, "eval_prompts": "shapes-heldout"}
    ckpt = Path("run/checkpoints/step_000000002")
    assert check_resume_config(None, current, ckpt, allow=False) == []  # a checkpoint without a config
    assert check_resume_config(recorded, current, ckpt, allow=False) == []  # flags added or removed since: no change
    recorded["hidden_dim"], recorded["eval_prompts"] = 64, "prompts.txt"
    with pytest.raises(ConfigError, match=r"--eval-prompts: recorded 'prompts.txt', given 'shapes-heldout'; "
                                          r"--hidden-dim: recorded 64, given 16\)"):
        check_resume_config(recorded, current, ckpt, allow=False)
    assert len(check_resume_config(recorded, current, ckpt, allow=True)) == 2
    assert {"total_updates", "run_dir", "device", "allow_config_change"} <= set(RESUME_MAY_CHANGE)
    assert all(reason for reason in RESUME_MAY_CHANGE.values())


def test_bc_refuses_a_dataset_of_another_base_model(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    collect_data, train_bc = load_script("collect_data"), load_script("train_bc")
    data = tmp_path / "data"
    run_cli(collect_data, ["--backbone", "shapes-random", "--num-steps", "3", "--wandb-mode", "disabled",
                           "--prompt-swaps", "0", "--episodes", "4", "--batch-size", "4", "--out-dir", str(data)])
    recorded = GuidanceDataset(data).metadata["backbone_fingerprint"]
    capsys.readouterr()
    # The random shapes world follows --seed: seed 1 is another base model than the one the data was collected on.
    with pytest.raises(SystemExit) as exit_:
        run_cli(train_bc, [*SMALL_RUN, "--batch-size", "16", "--warmup-updates", "2", "--dataset", str(data),
                           "--run-dir", str(tmp_path / "run"), "--total-updates", "1", "--seed", "1"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in err and err.count("\n") == 1, err
    assert f"the dataset {data} was collected against another base model (backbone fingerprint {recorded}; " in err
    assert "collect a dataset with this one" in err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_fingerprint_absent_from_a_file_is_no_mismatch() -> None:
    check_dataset_fingerprint(None, "abc", "old-dataset")  # collected before fingerprints: loads as before
    check_dataset_fingerprint("abc", "abc", "data")
    with pytest.raises(FingerprintError, match=r"data was collected .*fingerprint abc; the one loaded now is xyz"):
        check_dataset_fingerprint("abc", "xyz", "data")


# --------------------------------------------------------------------------------------------------- datasets
def test_a_flipped_bit_reordered_prompts_or_an_edited_manifest_are_found(tmp_path: Path) -> None:
    """Every file of a chunk has its SHA-256 in the manifest, and the manifest its own: same-size edits are found."""
    GuidanceDataset.create(tmp_path / "data", {"strategy": "test"}).append(chunk(episodes=3))
    folder = tmp_path / "data" / "chunk-000000"
    target = folder / "transitions" / "target.memmap"
    original = target.read_bytes()
    target.write_bytes(original[:100] + bytes([original[100] ^ 1]) + original[101:])  # one flipped bit
    with pytest.raises(DatasetError, match=rf"{target} does not match its SHA-256 in manifest.json"):
        GuidanceDataset(tmp_path / "data")
    assert GuidanceDataset(tmp_path / "data", verify=False).num_episodes == 3  # verify=False skips the hashing
    target.write_bytes(original)

    prompts = folder / "prompts.json"
    text = prompts.read_text()
    prompts.write_text(json.dumps(json.loads(text)[::-1]))  # the same bytes in another order
    assert prompts.stat().st_size == len(text)
    with pytest.raises(DatasetError, match=rf"{prompts} does not match its SHA-256"):
        GuidanceDataset(tmp_path / "data")
    prompts.write_text(text)

    (folder / "notes.txt").write_text("planted")
    with pytest.raises(DatasetError, match=rf"{folder / 'notes.txt'} is not in the manifest"):
        GuidanceDataset(tmp_path / "data")
    (folder / "notes.txt").unlink()

    manifest = tmp_path / "data" / "manifest.json"
    saved = manifest.read_text()
    manifest.write_text(saved.replace('"strategy": "test"', '"strategy": "tset"'))
    with pytest.raises(DatasetError, match=r"manifest.json does not match its SHA-256 .*edited or damaged"):
        GuidanceDataset(tmp_path / "data", verify=False)  # the manifest's own digest is cheap: always checked
    manifest.write_text(saved)
    assert GuidanceDataset(tmp_path / "data").prompts == ["prompt 0", "prompt 1", "prompt 2"]


def as_written_before_sha256s(dataset: Path) -> None:
    """Rewrite ``dataset``'s manifest as version 1 wrote it: file sizes only, no digests."""
    manifest = json.loads((dataset / "manifest.json").read_text())
    manifest = {k: v for k, v in manifest.items() if k in ("format", "metadata", "spec", "chunks")}
    manifest["version"] = 1
    manifest["chunks"] = [{k: v for k, v in c.items() if k != "sha256"} for c in manifest["chunks"]]
    (dataset / "manifest.json").write_text(json.dumps(manifest))


def test_a_dataset_written_before_sha256s_loads_and_appends(tmp_path: Path) -> None:
    data = tmp_path / "data"
    GuidanceDataset.create(data).append(chunk(rng=0))
    as_written_before_sha256s(data)
    old = data / "chunk-000000" / "transitions" / "target.memmap"
    old.write_bytes(old.read_bytes()[:-1] + bytes([old.read_bytes()[-1] ^ 1]))  # undetectable by size alone
    assert GuidanceDataset(data).num_chunks == 1  # its files are checked by size, as when it was written
    GuidanceDataset(data).append(chunk(rng=1))  # the new chunk is hashed, the old one keeps its size check
    assert GuidanceDataset(data).num_chunks == 2
    new = data / "chunk-000001" / "transitions" / "target.memmap"
    new.write_bytes(new.read_bytes()[:-1] + bytes([new.read_bytes()[-1] ^ 1]))
    with pytest.raises(DatasetError, match=rf"{new} does not match its SHA-256"):
        GuidanceDataset(data)
