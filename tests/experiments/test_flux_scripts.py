"""The training scripts on Flux weights from disk (``--backbone flux --model-path <folder>``), as on a GPU with
FLUX.1-dev, here with a tiny random FluxPipeline saved in diffusers' layout, a CLIP reward whose open_clip
weights are a local file (``--reward clip --reward-kwargs``), and prompt files (``--train-prompts`` /
``--eval-prompts``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import tyro

from fluxguide.backbones.flux import FluxBackbone
from fluxguide.backbones.registry import TINY_CLIP_CFG, build_backbone, build_reward, parse_reward_kwargs
from fluxguide.checkpointing import latest_checkpoint, load_checkpoint
from fluxguide.harness.tracking import metric_curve, read_metrics
from fluxguide.rewards import CLIPScore, load_open_clip
from tests.experiments.conftest import CLIP_NAME
from tests.scripts import load_script, open_world_eval_metrics


def flux_args(files: dict[str, str], run_dir: Path) -> list[str]:
    return ["--backbone", "flux", "--model-path", files["pipeline"], "--height", "64", "--width", "64",
            "--max-sequence-length", "16", "--reward", "clip", "--reward-kwargs", files["reward_kwargs"],
            "--train-prompts", files["train"], "--eval-prompts", files["heldout"], "--run-dir", str(run_dir),
            "--num-steps", "3", "--hidden-dim", "16", "--num-heads", "2", "--num-layers", "1",
            "--eval-samples-per-prompt", "1", "--grid-prompts", "2", "--wandb-mode", "disabled"]


def test_build_reward_loads_the_clip_weights_file_given_in_the_kwargs(flux_files) -> None:
    backbone = build_backbone("flux", model_path=flux_files["pipeline"], height=64, width=64, max_sequence_length=16)
    assert isinstance(backbone, FluxBackbone) and backbone.default_num_steps == 28  # from_pretrained's default
    reward = build_reward("clip", backbone, seed=5, **parse_reward_kwargs(flux_files["reward_kwargs"]))
    assert isinstance(reward, CLIPScore)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        saved, _ = load_open_clip(CLIP_NAME, None, model_cfg=TINY_CLIP_CFG)
    for name, value in saved.state_dict().items():  # the file's weights, not a random init
        assert torch.equal(reward.model.state_dict()[name], value), name


def test_reward_gradient_script_trains_on_flux_from_a_folder(flux_files, tmp_path) -> None:
    script = load_script("train_reward_gradient")
    final = script.main(tyro.cli(script.Config, args=flux_args(flux_files, tmp_path) + [
        "--batch-size", "2", "--total-updates", "2", "--eval-every", "2", "--checkpoint-every", "2",
        "--grad-last-k", "2"]))
    assert set(final) == open_world_eval_metrics("clip")
    records = read_metrics(tmp_path)
    assert len(metric_curve(records, "losses/loss")[1]) == 2
    assert all(torch.isfinite(torch.tensor(metric_curve(records, "train/reward_mean")[1])))
    assert load_checkpoint(latest_checkpoint(tmp_path), restore_global_rng=False).step == 2
    assert (tmp_path / "guidance.safetensors").is_file()
    assert (tmp_path / "samples" / "eval_00000004.png").is_file()


def test_ppo_script_trains_on_flux_from_a_folder(flux_files, tmp_path) -> None:
    script = load_script("train_ppo")
    final = script.main(tyro.cli(script.Config, args=flux_args(flux_files, tmp_path) + [
        "--batch-size", "4", "--samples-per-prompt", "2", "--minibatch-trajectories", "2", "--epochs", "1",
        "--total-updates", "2", "--eval-every", "2", "--checkpoint-every", "2"]))
    assert set(final) == open_world_eval_metrics("clip")
    records = read_metrics(tmp_path)
    assert all(torch.isfinite(torch.tensor(metric_curve(records, "losses/loss")[1])))
    assert len(metric_curve(records, "train/reward_mean")[1]) == 2
    assert load_checkpoint(latest_checkpoint(tmp_path), restore_global_rng=False).step == 2
    assert (tmp_path / "guidance.safetensors").is_file()


@pytest.mark.parametrize("name", ["train_reward_gradient", "train_ppo"])
def test_flux_without_a_model_path_or_with_a_shapes_reward_says_what_to_pass(name, flux_files, tmp_path) -> None:
    script = load_script(name)
    with pytest.raises(ValueError, match="--model-path"):
        script.main(tyro.cli(script.Config, args=["--backbone", "flux", "--run-dir", str(tmp_path / "a"),
                                                  "--wandb-mode", "disabled"]))
    args = [a for a in flux_args(flux_files, tmp_path / "b") if a not in ("--reward", "clip")]
    with pytest.raises(ValueError, match="belongs to the shapes world.*--reward clip"):
        script.main(tyro.cli(script.Config, args=args))  # the default reward is a shapes-world one


def test_reward_kwargs_must_be_a_json_object() -> None:
    assert parse_reward_kwargs(None) == {} and parse_reward_kwargs(" ") == {}
    assert parse_reward_kwargs('{"pretrained": "openai"}') == {"pretrained": "openai"}
    with pytest.raises(ValueError, match="not valid JSON"):
        parse_reward_kwargs("{pretrained: openai}")
    with pytest.raises(TypeError, match="JSON object"):
        parse_reward_kwargs('["openai"]')
