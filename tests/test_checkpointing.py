"""Resumable checkpoints: exact round trip of weights, optimizer and RNG state; atomicity; corruption."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from fluxguide.checkpointing import (
    CheckpointError,
    decode_tree,
    encode_tree,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from fluxguide.policies import MLPGuidanceModel, load_guidance_model


def small_policy() -> MLPGuidanceModel:
    return MLPGuidanceModel(latent_channels=12, hidden_dim=16, num_layers=2, vec_dim=8, pos_frequencies=2,
                            time_embed_dim=8)


def train_a_bit(policy: torch.nn.Module, opt: torch.optim.Optimizer, steps: int, gen: torch.Generator) -> float:
    """A few AdamW steps on random regression targets drawn from ``gen``; returns the last loss."""
    loss = torch.tensor(0.0)
    for _ in range(steps):
        img = torch.randn(2, 16, 12, generator=gen)
        out = policy(img, img, torch.zeros(2, 3, 4), torch.randn(2, 8, generator=gen), torch.rand(2, generator=gen), 0)
        loss = (out - torch.randn(out.shape, generator=gen)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return float(loss.detach())


def test_tree_encoding_round_trips_optimizer_like_state() -> None:
    tree = {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.ones(2)}},
            "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "params": [0], "foreach": None}]}
    tensors: dict[str, torch.Tensor] = {}
    encoded = json.loads(json.dumps(encode_tree(tree, tensors, "opt")))
    decoded = decode_tree(encoded, tensors)
    assert decoded["param_groups"][0]["betas"] == (0.9, 0.999)
    assert list(decoded["state"]) == [0]
    assert torch.equal(decoded["state"][0]["exp_avg"], torch.ones(2))
    with pytest.raises(TypeError, match="without pickling"):
        encode_tree({"x": object()}, {}, "p")


def test_resume_continues_exactly_like_an_uninterrupted_run(tmp_path) -> None:
    # Uninterrupted: 6 steps.
    torch.manual_seed(0)
    ref = small_policy()
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(1)
    train_a_bit(ref, ref_opt, 6, gen)
    ref_after = torch.rand(3)  # the global RNG continues too

    # Interrupted after 3 steps, resumed into fresh objects.
    torch.manual_seed(0)
    policy = small_policy()
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(1)
    train_a_bit(policy, opt, 3, gen)
    save_checkpoint(tmp_path, 3, modules={"policy": policy}, optimizers={"policy": opt}, generators={"data": gen},
                    state={"samples_seen": 6, "history": [{"loss": 1.5}]})
    torch.rand(100), np.random.rand(5), random.random()  # disturb every global RNG

    torch.manual_seed(123)
    policy2 = small_policy()
    opt2 = torch.optim.AdamW(policy2.parameters(), lr=1e-2)
    gen2 = torch.Generator().manual_seed(999)
    ckpt = load_checkpoint(latest_checkpoint(tmp_path), modules={"policy": policy2}, optimizers={"policy": opt2},
                           generators={"data": gen2})
    assert ckpt.step == 3 and ckpt.state == {"samples_seen": 6, "history": [{"loss": 1.5}]}
    train_a_bit(policy2, opt2, 3, gen2)
    for a, b in zip(ref.parameters(), policy2.parameters()):
        assert torch.equal(a, b)
    assert torch.equal(torch.rand(3), ref_after)


def test_policy_file_opens_with_load_guidance_model_and_old_checkpoints_are_pruned(tmp_path) -> None:
    policy = small_policy()
    for step in (1, 2, 3, 4):
        save_checkpoint(tmp_path, step, modules={"policy": policy}, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000000003", "step_000000004"]
    loaded = load_guidance_model(latest_checkpoint(tmp_path) / "policy.safetensors")
    assert loaded.config == policy.config
    # Saving the same step again (a resumed run) replaces it.
    save_checkpoint(tmp_path, 4, modules={"policy": policy}, state={"again": True}, keep=2)
    assert load_checkpoint(latest_checkpoint(tmp_path)).state == {"again": True}


def test_killed_save_leaves_previous_checkpoint_as_latest(tmp_path) -> None:
    policy = small_policy()
    save_checkpoint(tmp_path, 1, modules={"policy": policy})
    # What a kill during a save leaves behind: a temporary folder.
    partial = tmp_path / "checkpoints" / ".tmp-step_000000002-abc"
    partial.mkdir()
    (partial / "policy.safetensors").write_bytes(b"half")
    assert latest_checkpoint(tmp_path).name == "step_000000001"
    save_checkpoint(tmp_path, 2, modules={"policy": policy})
    assert not partial.exists()


def test_non_finite_weights_are_never_checkpointed(tmp_path) -> None:
    policy = small_policy()
    save_checkpoint(tmp_path, 1, modules={"policy": policy})
    with torch.no_grad():
        policy.out.weight[0, 0] = float("nan")
    with pytest.raises(CheckpointError, match="NaN/inf.*previous checkpoint is kept"):
        save_checkpoint(tmp_path, 2, modules={"policy": policy})
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000000001"]


def test_corrupt_checkpoint_raises_a_clear_error(tmp_path) -> None:
    policy = small_policy()
    path = save_checkpoint(tmp_path, 5, modules={"policy": policy})
    data = (path / "policy.safetensors").read_bytes()
    (path / "policy.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"corrupt: policy.safetensors .*step_000000005 is the run's only "
                                              r"checkpoint: deleting it would restart the run .*move the run folder"):
        load_checkpoint(path, modules={"policy": small_policy()})
    (path / "state.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_checkpoint(path)


def test_mismatched_architecture_and_unknown_names_are_reported(tmp_path) -> None:
    path = save_checkpoint(tmp_path, 1, modules={"policy": small_policy()})
    other = MLPGuidanceModel(latent_channels=12, hidden_dim=32, num_layers=2, vec_dim=8)
    with pytest.raises(CheckpointError, match="does not fit module 'policy'"):
        load_checkpoint(path, modules={"policy": other})
    with pytest.raises(CheckpointError, match=r"no optimizer named \['critic'\]"):
        load_checkpoint(path, optimizers={"critic": torch.optim.SGD(other.parameters(), lr=1.0)})


def test_an_edited_state_or_a_file_outside_the_manifest_is_refused(tmp_path) -> None:
    """state.json is covered by the manifest too (issue 27): an edited counter is refused, not resumed from."""
    path = save_checkpoint(tmp_path, 3, modules={"policy": small_policy()}, state={"samples_seen": 48})
    state_file = path / "state.json"
    original = state_file.read_text()
    assert '"samples_seen": 48' in original
    state_file.write_text(original.replace('"samples_seen": 48', '"samples_seen": 96'))
    with pytest.raises(CheckpointError, match=r"state.json does not match its SHA-256 .*edited or damaged"):
        load_checkpoint(path)
    state_file.write_text(original)
    assert load_checkpoint(path, restore_global_rng=False).state == {"samples_seen": 48}
    (path / "notes.txt").write_text("planted")
    with pytest.raises(CheckpointError, match=r"holds notes.txt, which is not in its manifest"):
        load_checkpoint(path, restore_global_rng=False)
