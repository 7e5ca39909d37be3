"""The seed's GuidanceModelTrainer: supervised steps, one-step reward training, checkpoint files."""

from __future__ import annotations

import pytest
import torch

from fluxguide.algos import GuidanceModelTrainer, NonFiniteLossError
from fluxguide.policies import MLPGuidanceModel, create_mlp_guidance_model, load_guidance_model


def train_step_inputs(seed: int = 0, batch: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "img": torch.randn(batch, 16, 12, generator=g),
        "pred": torch.randn(batch, 16, 12, generator=g),
        "txt": torch.randn(batch, 3, 8, generator=g),
        "vec": torch.randn(batch, 8, generator=g),
        "timestep": torch.rand(batch, generator=g),
        "step_idx": 3,
    }


def make_trainer(seed: int = 0, **kwargs) -> GuidanceModelTrainer:
    torch.manual_seed(seed)
    model = create_mlp_guidance_model(latent_channels=12, hidden_dim=32, num_layers=2, vec_dim=8)
    return GuidanceModelTrainer(model, torch.optim.AdamW(model.parameters(), lr=1e-2), **kwargs)


def test_train_step_regresses_onto_target_corrections() -> None:
    trainer = make_trainer()
    obs = train_step_inputs()
    target = 0.3 * obs["pred"]
    losses = [trainer.train_step(**obs, target_correction=target)["loss"] for _ in range(30)]
    assert losses[-1] < 0.3 * losses[0]
    assert trainer.step == 30
    with pytest.raises(ValueError, match=r"target_correction has shape \(2, 16, 11\)"):
        trainer.train_step(**obs, target_correction=target[..., :11])
    with pytest.raises(NonFiniteLossError):
        trainer.train_step(**obs, target_correction=target * float("nan"))


def test_train_from_reward_raises_the_reward_of_the_predicted_clean_latent() -> None:
    trainer = make_trainer(guidance_scale=0.5)
    obs = train_step_inputs()
    goal = torch.zeros(2, 16, 12)

    def reward_fn(predicted_latent: torch.Tensor) -> torch.Tensor:  # closeness of x0 to a goal latent
        return -(predicted_latent - goal).square().mean((1, 2))

    metrics = trainer.train_from_reward(**obs, reward_fn=reward_fn, num_guidance_steps=20)
    assert metrics["reward"] > metrics["reward_before"] + 0.05, metrics
    assert trainer.step == 20
    with pytest.raises(ValueError, match="does not depend differentiably"):
        trainer.train_from_reward(**obs, reward_fn=lambda x: reward_fn(x).detach())


@pytest.mark.parametrize("name", ["my_guidance.pt", "my_guidance.safetensors"])
def test_checkpoint_round_trip_continues_training_identically(tmp_path, name) -> None:
    trainer = make_trainer()
    obs = train_step_inputs()
    target = 0.3 * obs["pred"]
    for _ in range(3):
        trainer.train_step(**obs, target_correction=target)
    path = trainer.save_checkpoint(tmp_path / name)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary files left
    expected = trainer.train_step(**obs, target_correction=target)["loss"]

    other = make_trainer(seed=1)
    info = other.load_checkpoint(path)
    assert info["step"] == 3 and info["config"] == trainer.model.config
    assert other.train_step(**obs, target_correction=target)["loss"] == pytest.approx(expected, rel=1e-6)


def test_seed_example_loads_the_pt_file_without_pickle(tmp_path) -> None:
    trainer = make_trainer()
    trainer.train_step(**train_step_inputs(), target_correction=torch.ones(2, 16, 12))
    trainer.save_checkpoint(tmp_path / "my_guidance.pt")
    guidance_model = create_mlp_guidance_model(latent_channels=12, hidden_dim=32, num_layers=2, vec_dim=8)
    checkpoint = torch.load(tmp_path / "my_guidance.pt", weights_only=True)
    guidance_model.load_state_dict(checkpoint["model_state_dict"])
    for a, b in zip(guidance_model.parameters(), trainer.model.parameters()):
        assert torch.equal(a, b)


def test_safetensors_checkpoint_opens_with_load_guidance_model(tmp_path) -> None:
    trainer = make_trainer()
    trainer.train_step(**train_step_inputs(), target_correction=torch.ones(2, 16, 12))
    path = trainer.save_checkpoint(tmp_path / "policy.safetensors")
    model = load_guidance_model(path)
    assert isinstance(model, MLPGuidanceModel)
    obs = train_step_inputs(5)
    torch.testing.assert_close(model(**obs), trainer.model(**obs))
    (tmp_path / "policy.optimizer.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="load_optimizer=False"):
        make_trainer().load_checkpoint(path)
    assert make_trainer().load_checkpoint(path, load_optimizer=False)["step"] == 1
