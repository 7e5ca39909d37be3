"""Behaviour-cloning datasets: training pairs, append-safe memory-mapped storage, replay buffers, bad input.

States come from the real instrumented sampler on a randomly initialised shapes world (tiny CLIP + tiny
diffusers Flux). Crash safety is tested by killing a real subprocess while it is inside an append.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from tensordict import TensorDict

from fluxguide import keys
from fluxguide.data.collector import StateCollectionCallback
from fluxguide.data.episodes import EPISODE, FINAL_IMAGE, REWARD, TARGET, EpisodeChunk, create_training_pairs
from fluxguide.data.store import MANIFEST, DatasetError, GuidanceDataset, load_guidance_dataset
from fluxguide.sampling.instrumented import PRED_USED, denoise_with_state_collection
from fluxguide.worlds.shapes import ShapesWorld, train_prompts
from tests.scripts import ROOT

STEPS = 3


def collect_states(world: ShapesWorld, prompts: list[str], seed: int = 0,
                   guidance_model=None) -> tuple[torch.Tensor, TensorDict]:
    cond = world.encode(prompts)
    noise = world.noise(len(prompts), torch.Generator().manual_seed(seed))
    return denoise_with_state_collection(world, noise, cond.img_ids, cond.txt, cond.txt_ids, cond.vec,
                                         world.schedule(STEPS), guidance=None, guidance_model=guidance_model)


def constant_guidance(value: float):
    return lambda img, pred, txt, vec, t, step: torch.full_like(pred, value)


# ---------------------------------------------------------------- training pairs


def test_training_pairs_flatten_steps_and_store_episode_constants_once(shapes_random: ShapesWorld) -> None:
    prompts = train_prompts()[:3]
    final, states = collect_states(shapes_random, prompts, guidance_model=constant_guidance(0.25))
    images = shapes_random.decode(final)
    chunk = create_training_pairs(states, prompts, final_image=images, rewards=torch.tensor([1.0, 0.0, 0.5]))
    assert chunk.num_episodes == 3 and chunk.num_transitions == 3 * STEPS
    assert set(chunk.episodes.keys()) == {keys.TXT, keys.VEC, FINAL_IMAGE, REWARD}
    assert keys.TXT not in chunk.transitions  # not copied once per step
    assert torch.equal(chunk.transitions[EPISODE], torch.arange(3).repeat_interleave(STEPS))
    assert torch.equal(chunk.transitions[keys.STEP], torch.arange(STEPS).repeat(3))
    assert torch.equal(chunk.transitions[keys.IMG][STEPS + 1], states[keys.IMG][1, 1])
    # Default target: the correction the sampler applied.
    assert torch.allclose(chunk.transitions[TARGET], torch.full_like(chunk.transitions[TARGET], 0.25), atol=1e-6)
    assert torch.equal(chunk.episodes[FINAL_IMAGE], images)


def test_training_pairs_accept_explicit_or_computed_targets(shapes_random: ShapesWorld) -> None:
    prompts = train_prompts()[:2]
    _, states = collect_states(shapes_random, prompts)
    explicit = torch.randn_like(states[keys.PRED])
    chunk = create_training_pairs(states, prompts, explicit)
    assert torch.equal(chunk.transitions[TARGET].reshape(explicit.shape), explicit)
    chunk = create_training_pairs(states, prompts, lambda s: -s[keys.PRED])
    assert torch.equal(chunk.transitions[TARGET], -chunk.transitions[keys.PRED])
    with pytest.raises(ValueError, match=r"targets must be shaped like the per-step predictions"):
        create_training_pairs(states, prompts, explicit[:, :1])
    with pytest.raises(ValueError, match="2 samples but 1 prompts"):
        create_training_pairs(states, prompts[:1])
    states_without = states.exclude(PRED_USED)
    with pytest.raises(ValueError, match="pass targets="):
        create_training_pairs(states_without, prompts)


def test_select_episodes_renumbers(shapes_random: ShapesWorld) -> None:
    prompts = train_prompts()[:4]
    _, states = collect_states(shapes_random, prompts)
    chunk = create_training_pairs(states, prompts)
    kept = chunk.select_episodes(torch.tensor([False, True, False, True]))
    assert kept.prompts == [prompts[1], prompts[3]]
    assert torch.equal(kept.transitions[EPISODE], torch.arange(2).repeat_interleave(STEPS))
    assert torch.equal(kept.transitions[keys.IMG][:STEPS], chunk.transitions[keys.IMG][STEPS : 2 * STEPS])
    assert torch.equal(kept.episodes[keys.TXT][1], chunk.episodes[keys.TXT][3])


# ---------------------------------------------------------------- append and load


def make_chunk(world: ShapesWorld, prompts: list[str], seed: int) -> EpisodeChunk:
    final, states = collect_states(world, prompts, seed=seed, guidance_model=constant_guidance(0.1 * (seed + 1)))
    return create_training_pairs(states, prompts, final_image=world.decode(final), metadata={"seed": seed})


def test_two_appends_load_as_one_dataset(shapes_random: ShapesWorld, tmp_path: Path) -> None:
    first = make_chunk(shapes_random, train_prompts()[:2], 0)
    second = make_chunk(shapes_random, train_prompts()[5:8], 1)
    callback = StateCollectionCallback(tmp_path / "data", metadata={"strategy": "test"})
    callback.add_chunk(first)
    callback.save_to_disk()
    # A second run (a new callback, e.g. another process) appends to the same folder.
    callback = StateCollectionCallback(tmp_path / "data", metadata={"strategy": "test"})
    callback.add_chunk(second)
    assert callback.num_pending == 3
    callback.save_to_disk()
    assert callback.num_pending == 0

    data = load_guidance_dataset(tmp_path / "data")
    assert data.num_chunks == 2 and data.num_episodes == 5 and len(data) == 5 * STEPS
    assert data.prompts == train_prompts()[:2] + train_prompts()[5:8]
    assert data.chunk_metadata == [{"seed": 0}, {"seed": 1}] and data.metadata == {"strategy": "test"}
    everything = data.transitions()
    assert torch.equal(everything[keys.IMG], torch.cat([first.transitions[keys.IMG], second.transitions[keys.IMG]]))
    assert torch.equal(everything[EPISODE], torch.arange(5).repeat_interleave(STEPS))
    # Each transition carries its own episode's conditioning, joined at read time.
    want_txt = torch.cat([first.episodes[keys.TXT], second.episodes[keys.TXT]])[everything[EPISODE]]
    assert torch.equal(everything[keys.TXT], want_txt)
    # Random access across chunks, in the requested order.
    idx = torch.tensor([14, 0, 7, 3])
    batch = data[idx]
    assert torch.equal(batch[keys.IMG], everything[keys.IMG][idx])
    assert torch.equal(batch[keys.VEC], everything[keys.VEC][idx])


@pytest.mark.parametrize("storage", ["memory", "memmap"])
def test_dataset_loads_into_a_torchrl_replay_buffer(shapes_random: ShapesWorld, tmp_path: Path, storage: str) -> None:
    data = GuidanceDataset.create(tmp_path / "data")
    data.append(make_chunk(shapes_random, train_prompts()[:2], 0))
    data.append(make_chunk(shapes_random, train_prompts()[2:5], 1))
    rb = data.replay_buffer(8, storage=storage, scratch_dir=tmp_path / "rb",
                            generator=torch.Generator().manual_seed(0))
    assert len(rb) == data.num_transitions
    batch = rb.sample()
    assert batch.batch_size == torch.Size([8])
    for key in (*keys.OBSERVATION_KEYS, TARGET):
        assert key in batch
    assert torch.equal(batch[keys.TXT], data.episodes[keys.TXT][batch[EPISODE]])
    # The stored transition behind each sample is the dataset's (find it by its latent).
    everything = data.transitions()
    for i in range(8):
        match = (everything[keys.IMG] == batch[keys.IMG][i]).flatten(1).all(1).nonzero()
        assert match.numel() == 1
        assert torch.equal(everything[TARGET][match[0, 0]], batch[TARGET][i])
        assert int(everything[EPISODE][match[0, 0]]) == int(batch[EPISODE][i])


def test_callback_appends_every_episodes_per_chunk(shapes_random: ShapesWorld, tmp_path: Path) -> None:
    callback = StateCollectionCallback(tmp_path / "data", episodes_per_chunk=3)
    for i in range(4):
        prompts = train_prompts()[2 * i : 2 * i + 2]
        final, states = collect_states(shapes_random, prompts, seed=i)
        callback.on_generation_complete(prompts, states, shapes_random.decode(final))
    # 2 + 2 >= 3 appends (4 episodes), again at 2 + 2 (4 more): nothing pending.
    data = load_guidance_dataset(tmp_path / "data")
    assert data.num_chunks == 2 and data.num_episodes == 8 and callback.num_pending == 0


# ---------------------------------------------------------------- crash safety


def test_leftover_temporary_and_unlisted_chunks_are_ignored_then_cleaned(shapes_random: ShapesWorld,
                                                                          tmp_path: Path) -> None:
    data = GuidanceDataset.create(tmp_path / "data")
    data.append(make_chunk(shapes_random, train_prompts()[:2], 0))
    # What a crash leaves: a half-written temporary folder, and a renamed chunk whose manifest entry never came.
    partial = make_chunk(shapes_random, train_prompts()[2:4], 1)
    partial.transitions.memmap_(prefix=tmp_path / "data" / ".tmp-chunk-000001-deadbeef" / "transitions")
    partial.episodes.memmap_(prefix=tmp_path / "data" / "chunk-000001" / "episodes")
    with pytest.warns(UserWarning, match="interrupted append"):
        loaded = load_guidance_dataset(tmp_path / "data")
    assert loaded.num_episodes == 2 and loaded.num_chunks == 1
    loaded.append(make_chunk(shapes_random, train_prompts()[4:7], 2))
    assert not (tmp_path / "data" / ".tmp-chunk-000001-deadbeef").exists()
    assert loaded.num_episodes == 5 and loaded.prompts[2:] == train_prompts()[4:7]


CRASHING_COLLECTION = textwrap.dedent("""
    import sys, time, torch
    from pathlib import Path
    import fluxguide.data.store as store
    from fluxguide.data.episodes import create_training_pairs
    from fluxguide.data.store import GuidanceDataset
    from tensordict import TensorDict
    path, hang_in = Path(sys.argv[1]), sys.argv[2]

    def chunk(i):
        g = torch.Generator().manual_seed(i)
        s = TensorDict({k: torch.randn(2, 3, 64, 48, generator=g) for k in ("img", "pred", "pred_used")},
                       batch_size=[2])
        s["t"], s["t_prev"], s["step"] = torch.rand(2, 3), torch.rand(2, 3), torch.arange(3).expand(2, 3)
        s["txt"], s["vec"] = torch.randn(2, 16, 64), torch.randn(2, 64)
        return create_training_pairs(s, [f"prompt {2 * i}", f"prompt {2 * i + 1}"])

    def hang(*args, **kwargs):
        print("HANGING", flush=True)
        time.sleep(600)

    data = GuidanceDataset.create(path)
    for i in range(2):
        data.append(chunk(i))
    # The third append hangs at the chosen point; the test kills the process there.
    if hang_in == "rename":
        store.os.rename = hang                # the chunk is written to its temporary folder, not renamed
    else:
        store.write_json_atomic = hang       # the chunk is renamed into place, the manifest not yet updated
    data.append(chunk(2))
""")


@pytest.mark.parametrize("hang_in", ["rename", "manifest"])
def test_collection_killed_mid_append_loads_without_the_partial_chunk(tmp_path: Path, hang_in: str) -> None:
    script = tmp_path / "collect.py"
    script.write_text(CRASHING_COLLECTION)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path / "data"), hang_in],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    try:
        deadline = time.time() + 120
        line = ""
        while time.time() < deadline and "HANGING" not in line:
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                raise AssertionError(f"the collection exited early: {proc.stderr.read()}")
        assert "HANGING" in line
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    leftovers = [p.name for p in (tmp_path / "data").iterdir() if p.is_dir()]
    assert len(leftovers) == 3  # two complete chunks and the partial third
    with pytest.warns(UserWarning, match="interrupted append"):
        data = load_guidance_dataset(tmp_path / "data")
    assert data.num_chunks == 2 and data.num_episodes == 4 and data.prompts == [f"prompt {i}" for i in range(4)]
    assert data.transitions().batch_size == torch.Size([4 * 3])


# ---------------------------------------------------------------- bad input


def test_missing_dataset_and_missing_manifest_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="the folder does not exist"):
        load_guidance_dataset(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="manifest.json is missing"):
        load_guidance_dataset(tmp_path / "empty")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    with pytest.raises(DatasetError, match="not an empty folder or a guidance dataset"):
        GuidanceDataset.create(tmp_path / "other")


def test_truncated_missing_or_corrupt_files_are_clear_errors(shapes_random: ShapesWorld, tmp_path: Path) -> None:
    data = GuidanceDataset.create(tmp_path / "data")
    data.append(make_chunk(shapes_random, train_prompts()[:2], 0))
    target_file = tmp_path / "data" / "chunk-000000" / "transitions" / "target.memmap"
    size = target_file.stat().st_size
    os.truncate(target_file, size // 2)
    with pytest.raises(DatasetError, match=rf"target.memmap is truncated or altered: {size // 2} bytes, the manifest says {size}"):
        load_guidance_dataset(tmp_path / "data")
    target_file.unlink()
    with pytest.raises(DatasetError, match=r"target.memmap is missing"):
        load_guidance_dataset(tmp_path / "data")
    (tmp_path / "data" / MANIFEST).write_text('{"format": "fluxguide.guidance_dataset", "chunks": [')
    with pytest.raises(DatasetError, match="manifest.json is corrupt"):
        load_guidance_dataset(tmp_path / "data")


def test_appending_a_chunk_of_other_shapes_is_an_error(shapes_random: ShapesWorld, tmp_path: Path) -> None:
    data = GuidanceDataset.create(tmp_path / "data")
    chunk = make_chunk(shapes_random, train_prompts()[:2], 0)
    data.append(chunk)
    # Half the tokens (another resolution): img, pred and targets of shape (32, 48) instead of (64, 48).
    other = EpisodeChunk(
        chunk.episodes,
        TensorDict({**dict(chunk.transitions.items()),
                    **{k: chunk.transitions[k][:, :32] for k in (keys.IMG, keys.PRED, TARGET)}},
                   batch_size=chunk.transitions.batch_size),
        chunk.prompts,
    )
    with pytest.raises(DatasetError, match=r"transitions/img: dataset \(64, 48\) float32, chunk \(32, 48\) float32"):
        data.append(other)
    assert load_guidance_dataset(tmp_path / "data").num_chunks == 1


def test_metadata_of_another_collection_is_an_error(tmp_path: Path) -> None:
    GuidanceDataset.create(tmp_path / "data", {"strategy": "cfg_distillation", "cfg_scale": 3.0})
    with pytest.raises(DatasetError, match="cfg_scale"):
        GuidanceDataset.create(tmp_path / "data", {"strategy": "cfg_distillation", "cfg_scale": 5.0})
    manifest = json.loads((tmp_path / "data" / MANIFEST).read_text())
    assert manifest["chunks"] == []
    with pytest.raises(DatasetError, match="holds no episodes yet"):
        load_guidance_dataset(tmp_path / "data").sample(4)
