"""Datasets hold tensors only and are checked when loaded (issue 21): a pickled field is refused before anything
is unpickled, a non-finite value names its file, a collection rerun under other settings is refused, and one
collection at a time writes a dataset folder."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tensordict import TensorDict

from fluxguide import keys
from fluxguide.data.chunk_files import chunk_record, signed
from fluxguide.data.episodes import EPISODE, TARGET, EpisodeChunk
from fluxguide.data.store import DatasetError, GuidanceDataset, check_collection_settings
from fluxguide.locking import LOCK_FILE
from tests.scripts import ROOT, SUBPROCESS_ENV


def chunk(episodes: int = 2, steps: int = 3, rng: int = 0, **metadata) -> EpisodeChunk:
    g = torch.Generator().manual_seed(rng)
    n = episodes * steps
    eps = TensorDict({keys.TXT: torch.randn(episodes, 4, 8, generator=g), keys.VEC: torch.randn(episodes, 8, generator=g)},
                     [episodes])
    tr = TensorDict({keys.IMG: torch.randn(n, 16, 12, generator=g), keys.PRED: torch.randn(n, 16, 12, generator=g),
                     TARGET: torch.randn(n, 16, 12, generator=g), keys.T: torch.rand(n, generator=g),
                     "t_prev": torch.rand(n, generator=g), keys.STEP: torch.arange(n) % steps,
                     EPISODE: torch.arange(n) // steps}, [n])
    return EpisodeChunk(eps, tr, [f"prompt {i}" for i in range(episodes)], dict(metadata))


class Evil:
    """Unpickling this writes a marker file: the code a shared dataset could run."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('ran')",))


def plant_pickled_field(dataset: Path, marker: Path, scratch: Path) -> Path:
    """Add a pickled non-tensor leaf to chunk 0's episodes, as tensordict itself would write one."""
    evil = TensorDict({}, [])
    evil.set_non_tensor("evil", Evil(marker))
    evil.memmap_(prefix=scratch)
    target = dataset / "chunk-000000" / "episodes"
    shutil.copytree(scratch / "evil", target / "evil")
    meta = json.loads((target / "meta.json").read_text())
    meta["evil"] = json.loads((scratch / "meta.json").read_text())["evil"]
    (target / "meta.json").write_text(json.dumps(meta))
    # A crafted dataset lists its files' sizes and SHA-256s and signs its manifest: the integrity checks pass, and
    # the tensors-only check must refuse it on its own.
    manifest = json.loads((dataset / "manifest.json").read_text())
    manifest["chunks"][0].update(chunk_record(dataset / "chunk-000000"))
    (dataset / "manifest.json").write_text(json.dumps(signed(manifest)))
    return target / "meta.json"


def test_a_pickled_field_in_a_dataset_is_refused_without_running(tmp_path: Path) -> None:
    GuidanceDataset.create(tmp_path / "data").append(chunk())
    marker = tmp_path / "marker"
    planted = plant_pickled_field(tmp_path / "data", marker, tmp_path / "scratch")
    # The plant is real: tensordict's own loader, allowed to unpickle, runs it.
    probe = tmp_path / "probe"
    shutil.copytree(tmp_path / "data" / "chunk-000000" / "episodes", probe)
    TensorDict.load_memmap(probe, allow_pickle=True)
    assert marker.exists()
    marker.unlink()

    with pytest.raises(DatasetError, match=rf"{planted}: entry 'evil' is not a tensor.*never unpickled"):
        GuidanceDataset(tmp_path / "data")
    with pytest.raises(DatasetError, match="never unpickled"):
        GuidanceDataset(tmp_path / "data", verify=False)
    assert not marker.exists()


def test_a_chunk_naming_another_class_or_holding_extra_files_is_refused(tmp_path: Path) -> None:
    GuidanceDataset.create(tmp_path / "data").append(chunk())
    episodes = tmp_path / "data" / "chunk-000000" / "episodes"
    (episodes / "payload.pt").write_bytes(b"\x80\x04K\x01.")
    with pytest.raises(DatasetError, match=rf"{episodes / 'payload.pt'}: is not part of a tensors-only chunk"):
        GuidanceDataset(tmp_path / "data")
    (episodes / "payload.pt").unlink()
    meta = json.loads((episodes / "meta.json").read_text())
    (episodes / "meta.json").write_text(json.dumps({**meta, "_type": "<class 'os.system'>"}))
    with pytest.raises(DatasetError, match="names the class .<class 'os.system'>., not a plain TensorDict"):
        GuidanceDataset(tmp_path / "data", verify=False)  # (the manifest's file sizes would catch it first)


def test_non_finite_values_in_a_dataset_name_the_file(tmp_path: Path) -> None:
    bad = chunk()
    bad.transitions[TARGET][1, 2, 3] = float("nan")
    GuidanceDataset.create(tmp_path / "data").append(chunk(rng=1))
    with pytest.raises(DatasetError, match=r"chunk-000001/transitions/target\.memmap holds 1 non-finite value"):
        GuidanceDataset(tmp_path / "data").append(bad)  # the reload after the append checks the new chunk
    with pytest.raises(DatasetError, match=r"target\.memmap holds 1 non-finite"):
        GuidanceDataset(tmp_path / "data")


def test_a_collection_rerun_under_another_batch_size_is_refused(tmp_path: Path) -> None:
    data = GuidanceDataset.create(tmp_path / "data")
    data.append(chunk(seed=0, batch_index=0, batch_size=4, train_prompts="shapes-train"))
    check_collection_settings(data, 0, {"batch_size": 4, "train_prompts": "shapes-train"})  # the same: fine
    check_collection_settings(data, 1, {"batch_size": 8})  # another seed: a new collection
    with pytest.raises(DatasetError, match=r"seed 0 under other settings \(--batch-size: stored 4, given 8\)"):
        check_collection_settings(data, 0, {"batch_size": 8, "train_prompts": "shapes-train"})


def test_collect_data_rerun_under_another_batch_size_is_refused(tmp_path: Path) -> None:
    script = ROOT / "experiments" / "collect_data.py"
    common = [sys.executable, str(script), "--backbone", "shapes-random", "--num-steps", "2", "--prompt-swaps", "0",
              "--episodes", "4",
              "--wandb-mode", "disabled", "--out-dir", str(tmp_path / "data")]
    subprocess.run([*common, "--batch-size", "2"], env=SUBPROCESS_ENV, check=True, capture_output=True)
    again = subprocess.run([*common, "--batch-size", "4"], env=SUBPROCESS_ENV, capture_output=True, text=True)
    assert again.returncode == 2, again.stderr
    assert "--batch-size: stored 2, given 4" in again.stderr and "Traceback" not in again.stderr
    assert GuidanceDataset(tmp_path / "data").num_episodes == 4


HOLD = "import sys, time; from fluxguide.locking import FolderLock; FolderLock(sys.argv[1]).acquire(); " \
       "print('held', flush=True); time.sleep(60)"


def test_two_collections_on_one_dataset_folder(tmp_path: Path) -> None:
    """A second collect_data.py on a folder another process is collecting into stops at once, naming the folder
    and the owner's pid; once the owner is killed, its stale lock is taken over with a warning."""
    folder = tmp_path / "data"
    owner = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], env=SUBPROCESS_ENV, stdout=subprocess.PIPE,
                             text=True)
    try:
        assert owner.stdout.readline().strip() == "held"
        argv = [sys.executable, str(ROOT / "experiments" / "collect_data.py"), "--backbone", "shapes-random",
                "--num-steps", "2", "--prompt-swaps", "0", "--episodes", "2", "--batch-size", "2",
                "--wandb-mode", "disabled",
                "--out-dir", str(folder)]
        start = time.perf_counter()
        second = subprocess.run(argv, env=SUBPROCESS_ENV, capture_output=True, text=True)
        assert second.returncode == 2
        assert f"the dataset folder {folder} is in use by another process (pid {owner.pid}" in second.stderr
        assert "Traceback" not in second.stderr and not (folder / "manifest.json").exists()
        assert time.perf_counter() - start < 30
    finally:
        owner.kill()
        owner.wait()
    assert (folder / LOCK_FILE).exists()  # a killed owner leaves its lock file behind ...
    third = subprocess.run(argv, env=SUBPROCESS_ENV, capture_output=True, text=True)
    assert third.returncode == 0, third.stderr
    assert f"taking over the lock of the dataset folder {folder} left by pid {owner.pid}" in third.stderr
    assert GuidanceDataset(folder).num_episodes == 2 and not (folder / LOCK_FILE).exists()
