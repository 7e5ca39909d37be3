"""The PPO script end to end: kill-and-resume continues the run exactly, a non-finite loss stops it without
a poisoned checkpoint, the tiny random Flux code path completes, and --help documents every option."""

from __future__ import annotations

from functools import partial

import pytest
import torch
import tyro

from fluxguide.checkpointing import latest_checkpoint, list_checkpoints, load_checkpoint
from fluxguide.harness.tracking import metric_curve, read_metrics
from fluxguide.rewards import RewardModel, make_reward, register_reward
from tests.experiments import check_killed_run_resumes, leaf_fields, saved_start_policy
from tests.scripts import SMALL_RUNS, load_script, open_world_eval_metrics, run_script

script = load_script("train_ppo")
run = partial(run_script, script)

#: A small run on a randomly initialised shapes world: every code path of the loop, in seconds.
SMALL = [
    *SMALL_RUNS["train_ppo"],
    # the defaults before the shapes preset (affine, ODE, shared noise): these tests are about the general paths
    "--policy", "attention", "--policy-min-t", "0", "--mode", "sde", "--no-shared-group-noise", "--lr", "3e-4",
]


def test_killed_run_resumes_with_the_same_step_count_and_curve(tmp_path) -> None:
    total = 12
    common = SMALL + ["--total-updates", str(total), "--checkpoint-every", "2", "--eval-every", "4"]
    check_killed_run_resumes(script, common, tmp_path, total,
                             ("losses/loss", "train/reward_mean", "eval/reward_mean", "losses/kl_approx"))


class NaNAfterCalls(RewardModel):
    """A reward that turns NaN from its ``n``-th call on (call 1 is the initial evaluation)."""

    def __init__(self, inner: RewardModel, n: int) -> None:
        super().__init__()
        self.inner, self.n, self.calls = inner, n, 0

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        self.calls += 1
        values = self.inner(images, prompts)
        return values * float("nan") if self.calls >= self.n else values


register_reward("test-ppo-nan-after-4", overwrite=True)(
    lambda world=None: NaNAfterCalls(make_reward("shapes-clip", world=world), 4)
)


def test_nan_loss_stops_the_run_without_a_poisoned_checkpoint(tmp_path) -> None:
    # Calls: 1 = initial evaluation, 2-3 = updates 1-2 (checkpoint at 2), 4 = update 3 -> NaN.
    argv = SMALL + ["--run-dir", str(tmp_path), "--reward", "test-ppo-nan-after-4", "--total-updates", "10",
                    "--checkpoint-every", "2", "--eval-every", "100"]
    # The NaN is refused where the env takes the reward, naming it (issue 27), and stops the run as a NaN loss.
    with pytest.raises(SystemExit, match=r"(?s)stopping at update 3: reward 'test-ppo-nan-after-4' "
                                         r"\(NaNAfterCalls\) returned \d+ NaN values.*No checkpoint was written"):
        run(argv)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000000002"]


def test_tiny_flux_run_completes_with_gae(tmp_path) -> None:
    final = run(["--backbone", "tiny-flux", "--run-dir", str(tmp_path), "--batch-size", "4",
                 "--samples-per-prompt", "2", "--minibatch-trajectories", "2", "--num-steps", "3",
                 "--hidden-dim", "16", "--num-heads", "2", "--num-layers", "1", "--total-updates", "2",
                 "--eval-every", "2", "--checkpoint-every", "2", "--eval-num-prompts", "2",
                 "--eval-samples-per-prompt", "1", "--grid-prompts", "2", "--wandb-mode", "offline",
                 "--advantage", "gae", "--mode", "ode"])
    assert set(final) == open_world_eval_metrics("tiny-random-clip")  # no verifier for Flux
    records = read_metrics(tmp_path)
    assert len(metric_curve(records, "losses/loss_critic")[1]) == 2
    assert all(torch.isfinite(torch.tensor(metric_curve(records, "losses/loss")[1])))
    assert load_checkpoint(latest_checkpoint(tmp_path), restore_global_rng=False).step == 2
    assert (tmp_path / "curves.png").is_file() and (tmp_path / "samples" / "eval_00000008.png").is_file()
    assert list((tmp_path / "wandb").glob("offline-run-*"))


def test_help_documents_every_option(capsys) -> None:
    with pytest.raises(SystemExit):
        tyro.cli(script.Config, args=["--help"])
    text = capsys.readouterr().out
    names = [f.name for f in leaf_fields(script.Config)]
    for name in names:
        flag = "--" + name.replace("_", "-")
        assert flag in text, flag
    assert len(names) > 30


def test_early_steps_text_blind_policy_trains_and_is_saved_as_such(tmp_path) -> None:
    """--policy-min-t and --no-text-conditioning reach the actor: the saved policy guides early steps only."""
    from fluxguide.policies import TimestepRangeGuidance, load_guidance_model

    run([*SMALL, "--run-dir", str(tmp_path), "--total-updates", "1", "--eval-every", "1",
         "--checkpoint-every", "1", "--policy-min-t", "0.5", "--no-text-conditioning"])
    policy = load_guidance_model(tmp_path / "guidance.safetensors")
    assert isinstance(policy, TimestepRangeGuidance) and policy.ranges == [(0.5, 1.0)]
    assert policy.config["models"][0]["model"]["text_conditioning"] is False


def test_coarse_actions_train_and_save_a_coarse_policy(tmp_path) -> None:
    """--coarse-actions reaches the actor and the saved policy: its corrections are coarse once trained."""
    from fluxguide.backbones.registry import build_backbone
    from fluxguide.policies import CoarseGuidance, load_guidance_model, project_coarse

    run([*SMALL, "--run-dir", str(tmp_path), "--total-updates", "2", "--eval-every", "2", "--checkpoint-every",
         "2", "--mode", "ode", "--std", "0.5", "--coarse-actions", "--lr", "1e-2"])
    policy = load_guidance_model(tmp_path / "guidance.safetensors")
    assert isinstance(policy, CoarseGuidance) and policy.channels == 3
    world = build_backbone("shapes-random", seed=0)
    cond = world.encode(["a red circle"])
    img, pred = torch.randn(1, 64, 48), torch.randn(1, 64, 48)
    out = policy(img, pred, cond.txt, cond.vec, torch.tensor([0.8]), 1)
    assert out.abs().max() > 0  # the updates moved it
    torch.testing.assert_close(project_coarse(out, 3), out)
    with pytest.raises(ValueError, match="ODE mode"):
        run([*SMALL, "--run-dir", str(tmp_path / "sde"), "--total-updates", "1", "--coarse-actions"])


def test_coefficient_exploration_trains_an_affine_policy(tmp_path) -> None:
    """--policy affine --explore-coefficients: the update moves the coefficients; with any other policy the flag
    (on by default, since the shapes preset's policy is affine) leaves exploration in the whole correction."""
    from fluxguide.policies import AffineGuidance, TimestepRangeGuidance, load_guidance_model

    run([*SMALL, "--run-dir", str(tmp_path), "--total-updates", "2", "--eval-every", "2", "--checkpoint-every",
         "2", "--policy", "affine", "--explore-coefficients", "--mode", "ode", "--std", "0.3", "--lr", "1e-2",
         "--policy-min-t", "0.5"])
    policy = load_guidance_model(tmp_path / "guidance.safetensors")
    assert isinstance(policy, TimestepRangeGuidance) and isinstance(policy.models[0], AffineGuidance)
    assert policy.models[0].coefficients.weight.abs().sum() > 0
    run([*SMALL, "--run-dir", str(tmp_path / "attention"), "--total-updates", "1", "--explore-coefficients",
         "--mode", "ode"])
    assert (tmp_path / "attention" / "guidance.safetensors").is_file()


def test_tiny_flux_runs_the_coefficient_exploring_affine_policy(tmp_path) -> None:
    """The README's PPO setting on a tiny random Flux: its tokens pack 2 x 2 latent pixels, one coefficient pair
    per latent channel."""
    from fluxguide.policies import AffineGuidance, load_guidance_model

    run(["--backbone", "tiny-flux", "--run-dir", str(tmp_path), "--batch-size", "4", "--samples-per-prompt", "2",
         "--minibatch-trajectories", "2", "--num-steps", "3", "--total-updates", "2", "--eval-every", "2",
         "--checkpoint-every", "2", "--eval-num-prompts", "2", "--eval-samples-per-prompt", "1", "--grid-prompts",
         "2", "--wandb-mode", "disabled", "--mode", "ode", "--policy", "affine", "--hidden-dim", "8",
         "--explore-coefficients", "--std", "1.0", "--policy-min-t", "0.5", "--lr", "1e-2"])
    policy = load_guidance_model(tmp_path / "guidance.safetensors")
    affine = policy.models[0]
    assert isinstance(affine, AffineGuidance) and affine.latent_channels == 4 * affine.channels
    assert affine.coefficients.weight.abs().sum() > 0
    assert all(torch.isfinite(torch.tensor(metric_curve(read_metrics(tmp_path), "losses/loss")[1])))


def test_distilled_start_under_an_affine_head_explores_the_head_coefficients(tmp_path) -> None:
    """--init-policy with --head affine in ODE mode: PPO explores the head's few coefficients (the network's
    correction is the unexplored offset), trains the head, and moves the network at --body-lr-scale."""
    from safetensors.torch import load_file

    from fluxguide.policies import MultiObjectiveGuidance, load_guidance_model

    start, path = saved_start_policy(tmp_path)
    run([*SMALL, "--init-policy", str(path), "--head", "affine", "--body-lr-scale", "0.1", "--mode", "ode",
         "--explore-coefficients", "--std", "1.0", "--policy-min-t", "0.5", "--lr", "1e-2", "--total-updates", "2",
         "--eval-every", "2", "--checkpoint-every", "2", "--run-dir", str(tmp_path / "run")])
    saved = load_guidance_model(tmp_path / "run" / "guidance.safetensors")
    assert isinstance(saved, MultiObjectiveGuidance)
    body, head = saved.models
    assert any(p.abs().sum() > 0 for p in head.parameters()), "the head trained"
    assert not all(a.equal(b) for a, b in zip(body.state_dict().values(), start.state_dict().values()))
    actor = load_file(latest_checkpoint(tmp_path / "run") / "actor.safetensors")
    assert any(".body." in k for k in actor) and any(".affine." in k for k in actor), sorted(actor)[:4]


def test_sde_window_trains_with_sde_steps_on_the_window_only(tmp_path) -> None:
    """--sde-window (Flow-GRPO-Fast) reaches the env: SDE steps on the window, Euler steps elsewhere (the env's
    tests check the steps; tests/reliability/test_error_path.py the refusals)."""
    from fluxguide.envs import SDEWindowError

    run([*SMALL, "--run-dir", str(tmp_path), "--total-updates", "2", "--eval-every", "2", "--checkpoint-every", "2",
         "--sde-window", "0", "1"])
    records = read_metrics(tmp_path)
    assert all(torch.isfinite(torch.tensor(metric_curve(records, "losses/loss")[1])))
    assert any(v != 0 for v in metric_curve(records, "losses/kl_approx")[1])  # the window's log-probs moved
    with pytest.raises(SDEWindowError, match=r"sde_window \(0, 9\) must satisfy 0 <= start < stop <= num_steps = 3"):
        run([*SMALL, "--run-dir", str(tmp_path / "late"), "--total-updates", "1", "--sde-window", "0", "9"])
