"""Behaviour cloning: a few updates lower the loss and move the corrections toward the targets; bad input.

The data is real: CFG-distillation pairs collected from a randomly initialised shapes world into a dataset
folder and read back through a TorchRL replay buffer.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fluxguide.algos.bc import BCLoss, bc_evaluate, bc_update, check_dataset_matches_policy
from fluxguide.data.collector import GuidanceDataCollector
from fluxguide.data.episodes import TARGET
from fluxguide.data.store import DatasetError, GuidanceDataset
from fluxguide.policies import AttentionGuidanceModel, ConvGuidanceModel, GaussianHead, MLPGuidanceModel
from fluxguide.worlds.shapes import ShapesWorld, train_prompts

STEPS = 4


@pytest.fixture(scope="module")
def cfg_dataset(tmp_path_factory: pytest.TempPathFactory, shapes_random: ShapesWorld) -> GuidanceDataset:
    """CFG-distillation pairs collected on the random shapes world."""
    collector = GuidanceDataCollector(shapes_random, "cfg_distillation", num_steps=STEPS, scale=3.0)
    return collector.collect_to(tmp_path_factory.mktemp("bc") / "cfg", train_prompts()[:16], batch_size=8)


def seeded_mlp() -> MLPGuidanceModel:
    torch.manual_seed(1)
    return MLPGuidanceModel(latent_channels=48, hidden_dim=64, num_layers=2, vec_dim=64, time_embed_dim=32)


def correction_distance(loss: BCLoss, batch) -> float:
    with torch.no_grad():
        mean, _ = loss.correction(batch)
    return float((mean - batch[TARGET]).norm())


@pytest.mark.parametrize("loss_type", ["mse", "gaussian_nll"])
def test_a_few_bc_updates_lower_the_loss_and_move_corrections_to_the_targets(
    cfg_dataset: GuidanceDataset, loss_type: str
) -> None:
    model = seeded_mlp()
    check_dataset_matches_policy(cfg_dataset, model)
    loss = BCLoss(model, loss_type=loss_type, init_std=0.2)
    rb = cfg_dataset.replay_buffer(64, generator=torch.Generator().manual_seed(0))
    held = cfg_dataset.sample(128, generator=torch.Generator().manual_seed(123))  # a fixed evaluation batch
    before = bc_evaluate(loss, held)
    dist_before = correction_distance(loss, held)
    # A fresh guidance model outputs zero: its relative error is exactly 1.
    assert before["relative_error"] == pytest.approx(1.0) and before["correction_rms"] == 0.0
    opt = torch.optim.Adam(loss.parameters(), lr=3e-3)
    for _ in range(40):
        metrics = bc_update(loss, opt, rb.sample(), max_grad_norm=1.0)
        assert {"loss_bc", "mse", "grad_norm", "target_rms"} <= set(metrics)
    after = bc_evaluate(loss, held)
    dist_after = correction_distance(loss, held)
    assert after["loss_bc"] < before["loss_bc"]
    assert after["mse"] < 0.8 * before["mse"]
    assert dist_after < 0.9 * dist_before
    assert after["correction_rms"] > 0.2 * after["target_rms"]
    if loss_type == "gaussian_nll":
        # The learned std moves from 0.2 toward the residual's RMS.
        assert abs(after["std"] - after["mse"] ** 0.5) < abs(0.2 - after["mse"] ** 0.5)


def test_gaussian_head_uses_the_policys_own_std(cfg_dataset: GuidanceDataset) -> None:
    head = GaussianHead(seeded_mlp(), std=0.5, learn_std=True)
    loss = BCLoss(head, loss_type="gaussian_nll")
    assert loss.log_std is None  # the head's std is learned, not a second one
    opt = torch.optim.Adam(loss.parameters(), lr=1e-2)
    batch = cfg_dataset.sample(64, generator=torch.Generator().manual_seed(0))
    first = bc_update(loss, opt, batch)
    for _ in range(10):
        last = bc_update(loss, opt, batch)
    assert first["std"] == pytest.approx(0.5) and last["std"] < 0.5 and last["loss_bc"] < first["loss_bc"]


def test_dataset_that_does_not_fit_the_policy_is_a_clear_error(cfg_dataset: GuidanceDataset) -> None:
    flux_sized = MLPGuidanceModel(latent_channels=64, hidden_dim=16, num_layers=1, vec_dim=64)
    with pytest.raises(DatasetError, match=r"MLPGuidanceModel expects latent_channels=64, the dataset holds latents "
                                           r"\(seq=64, C=48\)"):
        check_dataset_matches_policy(cfg_dataset, flux_sized)
    with pytest.raises(DatasetError, match=r"expects vec_dim=768, the dataset holds vec \[64\]"):
        check_dataset_matches_policy(cfg_dataset, MLPGuidanceModel(latent_channels=48, hidden_dim=16, num_layers=1))
    attn = AttentionGuidanceModel(hidden_dim=16, num_heads=2, num_layers=1, latent_channels=48, txt_dim=32, vec_dim=64)
    with pytest.raises(DatasetError, match=r"expects txt_dim=32, the dataset holds txt \[16, 64\]"):
        check_dataset_matches_policy(cfg_dataset, attn)
    conv = ConvGuidanceModel(in_channels=3, hidden_channels=8, num_blocks=1, patch_size=4, vec_dim=64, grid_size=(4, 4))
    with pytest.raises(DatasetError, match=r"expects grid_size=\(4, 4\) \(16 tokens\), the dataset holds seq=64"):
        check_dataset_matches_policy(cfg_dataset, conv)
    # The loss itself refuses a batch of the wrong shape, naming both.
    loss = BCLoss(MLPGuidanceModel(latent_channels=48, hidden_dim=16, num_layers=1, vec_dim=64))
    batch = cfg_dataset.sample(4)
    batch[TARGET] = batch[TARGET][:, :32]
    with pytest.raises(DatasetError, match=r"correction has shape \(4, 64, 48\) but the targets \(4, 32, 48\)"):
        loss(batch)


def test_bad_loss_arguments_and_empty_dataset(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"unknown BC loss 'l1'; valid: \['mse', 'gaussian_nll'\]"):
        BCLoss(seeded_mlp(), loss_type="l1")
    with pytest.raises(ValueError, match="init_std must be positive"):
        BCLoss(seeded_mlp(), loss_type="gaussian_nll", init_std=0.0)
    empty = GuidanceDataset.create(tmp_path / "empty")
    with pytest.raises(DatasetError, match="is empty: collect some episodes"):
        check_dataset_matches_policy(empty, seeded_mlp())


def test_the_seeds_training_loop_runs_on_replay_buffer_batches(cfg_dataset: GuidanceDataset) -> None:
    """The seed's step 4: ``trainer.train_step(img=batch['img'], ..., target_correction=batch['target'])``."""
    from fluxguide.algos import GuidanceModelTrainer

    model = seeded_mlp()
    trainer = GuidanceModelTrainer(model, torch.optim.AdamW(model.parameters(), lr=3e-3))
    dataloader = cfg_dataset.replay_buffer(64, generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(30):
        batch = dataloader.sample()
        metrics = trainer.train_step(
            img=batch["img"], pred=batch["pred"], txt=batch["txt"], vec=batch["vec"],
            timestep=batch["timestep"], step_idx=batch["step_idx"], target_correction=batch["target"],
        )
        losses.append(metrics["loss"])
    assert sum(losses[-5:]) < 0.8 * sum(losses[:5])
