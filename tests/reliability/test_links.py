"""No write follows a link the run did not create (issue 27): a symbolic link planted in a shared run or dataset
folder, under a name fluxguide writes, is refused with a one-line error naming it, and the file it points to is
left as it was. The run folder the user names may itself be a link (a scratch disk)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from fluxguide.checkpointing import latest_checkpoint, save_checkpoint
from fluxguide.data.store import GuidanceDataset
from fluxguide.errors import UserError
from fluxguide.harness.curves import plot_curves
from fluxguide.harness.evaluation import write_table
from fluxguide.harness.grids import save_prompt_grid
from fluxguide.harness.tracking import METRICS_FILE, Tracker, read_metrics
from fluxguide.locking import LOCK_FILE, FolderLock
from fluxguide.serialization import LinkRefusedError, open_no_follow, write_json_atomic
from tests.reliability.test_data_safety import chunk

PRECIOUS = "precious: written by someone else\n"


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    """A file the user can write, outside the run folder."""
    path = tmp_path / "elsewhere" / "victim.txt"
    path.parent.mkdir()
    path.write_text(PRECIOUS)
    return path


@pytest.fixture
def victim_dir(tmp_path: Path) -> Path:
    """A folder the user can write, outside the run folder."""
    path = tmp_path / "elsewhere_dir"
    path.mkdir()
    (path / "keep.txt").write_text(PRECIOUS)
    return path


def plant(link: Path, target: Path) -> Path:
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(target)
    return link


def tree(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): p.read_text() for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_refused(error: pytest.ExceptionInfo, link: Path) -> None:
    assert isinstance(error.value, UserError) and isinstance(error.value, OSError)
    assert f"remove the link {link}; fluxguide never writes through links" in str(error.value)


def grid_images(n: int = 2) -> dict[str, torch.Tensor]:
    return {"base": torch.rand(n, 3, 8, 8)}


# ------------------------------------------------------------------------------------------ run folder
@pytest.mark.parametrize("dangling", [False, True])
def test_the_lock_file_is_not_opened_through_a_link(tmp_path: Path, victim: Path, dangling: bool) -> None:
    target = tmp_path / "absent.txt" if dangling else victim
    link = plant(tmp_path / "run" / LOCK_FILE, target)
    with pytest.raises(LinkRefusedError) as e:
        FolderLock(tmp_path / "run", "run folder").acquire()
    assert_refused(e, link)
    assert victim.read_text() == PRECIOUS and not (tmp_path / "absent.txt").exists()


def test_curves_png_is_not_written_through_a_link(tmp_path: Path, victim: Path) -> None:
    run = tmp_path / "run"
    with Tracker(run, mode="disabled") as tracker:
        tracker.log({"train/reward_mean": 0.5}, 4)
    link = plant(run / "curves.png", victim)
    with pytest.raises(LinkRefusedError) as e:
        plot_curves(run)
    assert_refused(e, link)
    assert victim.read_text() == PRECIOUS


def test_a_sample_png_is_not_written_through_a_link_nor_into_a_linked_folder(
        tmp_path: Path, victim: Path, victim_dir: Path) -> None:
    run = tmp_path / "run"
    link = plant(run / "samples" / "eval_00000000.png", victim)
    with pytest.raises(LinkRefusedError) as e:
        save_prompt_grid(grid_images(), ["a", "b"], link, root=run)
    assert_refused(e, link)
    assert victim.read_text() == PRECIOUS

    other = tmp_path / "other_run"
    folder = plant(other / "samples", victim_dir)  # the evaluator's samples folder, planted
    with pytest.raises(LinkRefusedError) as e:
        save_prompt_grid(grid_images(), ["a", "b"], folder / "eval_00000000.png", root=other)
    assert_refused(e, folder)
    assert tree(victim_dir) == {"keep.txt": PRECIOUS}


def test_metrics_jsonl_is_not_truncated_nor_appended_through_a_link(tmp_path: Path, victim: Path) -> None:
    run = tmp_path / "run"
    link = plant(run / METRICS_FILE, victim)
    for resume in (None, 0):  # a fresh start would truncate it, a resume would rewrite it
        with pytest.raises(LinkRefusedError) as e:
            Tracker(run, mode="disabled", resume_samples_seen=resume)
        assert_refused(e, link)
    assert victim.read_text() == PRECIOUS

    # a link planted while the run logs: the next record is refused, not appended to the victim
    other = tmp_path / "other_run"
    tracker = Tracker(other, mode="disabled")
    tracker.log({"train/reward_mean": 0.5}, 4)
    (other / METRICS_FILE).unlink()
    link = plant(other / METRICS_FILE, victim)
    with pytest.raises(LinkRefusedError) as e:
        tracker.log({"train/reward_mean": 0.6}, 8)
    assert_refused(e, link)
    assert victim.read_text() == PRECIOUS


def test_the_metrics_rewrite_of_a_resume_does_not_write_through_a_planted_temporary_name(
        tmp_path: Path, victim: Path) -> None:
    run = tmp_path / "run"
    with Tracker(run, mode="disabled") as tracker:
        for n in (4, 8, 12):
            tracker.log({"train/reward_mean": n / 10}, n)
    plant(run / f".{METRICS_FILE}.tmp", victim)  # the fixed temporary name the rewrite used
    Tracker(run, mode="disabled", resume_samples_seen=8)
    assert [r["charts/samples_seen"] for r in read_metrics(run)] == [4, 8]
    assert victim.read_text() == PRECIOUS


def test_a_checkpoint_is_not_written_into_a_linked_folder(tmp_path: Path, victim_dir: Path) -> None:
    module = nn.Linear(2, 2)
    run = tmp_path / "run"
    folder = plant(run / "checkpoints", victim_dir)
    with pytest.raises(LinkRefusedError) as e:
        save_checkpoint(run, 1, modules={"policy": module})
    assert_refused(e, folder)
    assert tree(victim_dir) == {"keep.txt": PRECIOUS}

    other = tmp_path / "other_run"
    step = plant(other / "checkpoints" / "step_000000001", victim_dir)  # a planted step folder
    with pytest.raises(LinkRefusedError) as e:
        save_checkpoint(other, 1, modules={"policy": module})
    assert_refused(e, step)
    with pytest.raises(LinkRefusedError):  # nor resumed from
        latest_checkpoint(other)
    assert tree(victim_dir) == {"keep.txt": PRECIOUS}


def test_guidance_safetensors_and_evaluation_tables_are_not_written_through_links(
        tmp_path: Path, victim: Path) -> None:
    from fluxguide.policies import MLPGuidanceModel, save_guidance_model

    run = tmp_path / "run"
    link = plant(run / "guidance.safetensors", victim)
    with pytest.raises(LinkRefusedError) as e:
        save_guidance_model(MLPGuidanceModel(latent_channels=4, hidden_dim=8, num_layers=1, vec_dim=8), link)
    assert_refused(e, link)
    for name in ("evaluation.md", "evaluation.csv"):
        out = tmp_path / f"out_{name}"
        link = plant(out / name, victim)
        with pytest.raises(LinkRefusedError) as e:
            write_table([{"sampler": "base", "pass_rate": 0.5}], out / "evaluation")
        assert_refused(e, link)
    assert victim.read_text() == PRECIOUS


@pytest.mark.parametrize("name", ["curves.png", "guidance.safetensors", "samples", "checkpoints", METRICS_FILE])
def test_a_training_run_refuses_a_planted_link_at_its_start_not_after_the_training(
        tmp_path: Path, victim: Path, name: str) -> None:
    from fluxguide.harness.config import RunConfig
    from fluxguide.harness.run import Run

    cfg = RunConfig(run_dir=tmp_path / "run")
    link = plant(cfg.run_dir / name, victim)
    with pytest.raises(LinkRefusedError) as e:
        Run(cfg, cfg, name="test")
    assert_refused(e, link)
    assert not (cfg.run_dir / LOCK_FILE).exists()  # the folder is left free
    assert victim.read_text() == PRECIOUS


# -------------------------------------------------------------------------------------- dataset folder
def test_a_dataset_append_does_not_write_through_links(tmp_path: Path, victim: Path) -> None:
    data = tmp_path / "data"
    dataset = GuidanceDataset.create(data, {})
    dataset.append(chunk(rng=0))
    (data / ".lock").unlink()
    link = plant(data / ".lock", tmp_path / "absent.txt")  # the appenders' lock file
    with pytest.raises(LinkRefusedError) as e:
        dataset.append(chunk(rng=1))
    assert_refused(e, link)
    assert not (tmp_path / "absent.txt").exists()
    link.unlink()

    victim.write_text((data / "manifest.json").read_text())  # a manifest someone else keeps
    before = victim.read_text()
    (data / "manifest.json").unlink()
    link = plant(data / "manifest.json", victim)
    with pytest.raises(LinkRefusedError) as e:
        dataset.append(chunk(rng=2))
    assert_refused(e, link)
    assert victim.read_text() == before


def test_an_unlisted_chunk_that_is_a_link_is_refused_not_deleted_through(tmp_path: Path, victim_dir: Path) -> None:
    data = tmp_path / "data"
    dataset = GuidanceDataset.create(data, {})
    link = plant(data / "chunk-000005", victim_dir)
    with pytest.raises(LinkRefusedError) as e:
        dataset.append(chunk())
    assert_refused(e, link)
    assert tree(victim_dir) == {"keep.txt": PRECIOUS}


def test_collect_data_refuses_a_linked_metrics_folder_before_sampling(tmp_path: Path, victim_dir: Path) -> None:
    from tests.scripts import load_script

    collect = load_script("collect_data")
    data = tmp_path / "data"
    GuidanceDataset.create(data, {})  # an existing dataset, in a shared folder
    (victim_dir / METRICS_FILE).write_text(PRECIOUS)
    link = plant(data / "run_seed0", victim_dir)
    with pytest.raises(LinkRefusedError) as e:
        collect.main(collect.Config(out_dir=data, model=collect.BackboneConfig(backbone="shapes-random"), num_steps=2,
                                    episodes=2, batch_size=2, wandb_mode="disabled"))
    assert_refused(e, link)
    assert tree(victim_dir) == {"keep.txt": PRECIOUS, METRICS_FILE: PRECIOUS}
    assert GuidanceDataset(data).num_chunks == 0  # refused before any work


def test_compare_refuses_a_linked_run_folder_before_training(tmp_path: Path, victim_dir: Path) -> None:
    from tests.scripts import load_script

    compare = load_script("compare")
    out = tmp_path / "out"
    for planted in ("runs", "runs/bc/seed0/data"):  # a training's run folder, BC's dataset folder
        link = plant(out / planted, victim_dir)
        with pytest.raises(LinkRefusedError) as e:
            compare.train(compare.Config(out_dir=out), "bc", 0)
        assert_refused(e, link)
        link.unlink()
    assert tree(victim_dir) == {"keep.txt": PRECIOUS}


# --------------------------------------------------------------------------- what a user may link
def test_a_run_folder_named_as_a_link_is_written_normally(tmp_path: Path) -> None:
    scratch = tmp_path / "scratch" / "run"
    scratch.mkdir(parents=True)
    run = plant(tmp_path / "run", scratch)
    with FolderLock(run, "run folder"):
        with Tracker(run, mode="disabled") as tracker:
            tracker.log({"train/reward_mean": 0.5}, 4)
        plot_curves(run)
        save_prompt_grid(grid_images(), ["a", "b"], run / "samples" / "eval.png", root=run)
        save_checkpoint(run, 1, modules={"policy": nn.Linear(2, 2)})
        write_json_atomic({"a": 1}, run / "tracking_extra.json")
    assert latest_checkpoint(run) == run / "checkpoints" / "step_000000001"
    for name in (METRICS_FILE, "curves.png", "samples/eval.png", "checkpoints/step_000000001/state.json",
                 "tracking_extra.json"):
        assert (scratch / name).is_file(), name
    assert json.loads((scratch / "tracking_extra.json").read_text()) == {"a": 1}


def test_the_kernel_refuses_a_link_planted_after_any_check(tmp_path: Path, victim: Path) -> None:
    """``O_NOFOLLOW``: a link that appears between a check and the open is refused all the same."""
    link = plant(tmp_path / "out.txt", victim)
    for flags in (os.O_WRONLY | os.O_TRUNC, os.O_WRONLY | os.O_APPEND, os.O_RDWR | os.O_CREAT):
        with pytest.raises(LinkRefusedError) as e:
            open_no_follow(link, flags)
        assert_refused(e, link)
    assert victim.read_text() == PRECIOUS
