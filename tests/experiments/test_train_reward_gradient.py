"""The reward-gradient script end to end: kill-and-resume continues the run exactly, a NaN loss stops it
without a poisoned checkpoint, and the tiny random Flux code path completes."""

from __future__ import annotations

import json
from functools import partial

import pytest
import torch
import tyro

from fluxguide.checkpointing import latest_checkpoint, list_checkpoints, load_checkpoint
from fluxguide.harness.config import ConfigError
from fluxguide.harness.tracking import metric_curve, read_metrics
from fluxguide.rewards import RewardModel, make_reward, register_reward
from tests.experiments import check_killed_run_resumes, saved_start_policy
from tests.scripts import SMALL_RUNS, load_script, open_world_eval_metrics, run_script

script = load_script("train_reward_gradient")
run = partial(run_script, script)

#: A small run on a randomly initialised shapes world: every code path of the loop, in seconds.
SMALL = [*SMALL_RUNS["train_reward_gradient"], "--lr", "3e-3"]


def test_killed_run_resumes_with_the_same_step_count_and_curve(tmp_path) -> None:
    total = 14
    common = SMALL + ["--total-updates", str(total), "--checkpoint-every", "2", "--eval-every", "4"]
    run_dir = check_killed_run_resumes(script, common, tmp_path, total,
                                       ("losses/loss", "train/reward_mean", "eval/reward_mean"))
    # Rerunning a finished run does nothing more.
    run(common + ["--run-dir", str(run_dir)])
    assert metric_curve(read_metrics(run_dir), "charts/updates")[1] == list(range(1, total + 1))


def test_a_weight_averaged_run_evaluates_saves_and_resumes_the_average(tmp_path) -> None:
    """--policy-average: the evaluations score the average (a killed run resumes its curve exactly, so the average
    was checkpointed), and guidance.safetensors holds the average, not the last iterate."""
    from fluxguide.policies import load_guidance_model

    total = 8
    common = SMALL + ["--total-updates", str(total), "--checkpoint-every", "2", "--eval-every", "4",
                      "--policy-average", "0.7"]
    run_dir = check_killed_run_resumes(script, common, tmp_path, total, ("train/reward_mean", "eval/reward_mean"))
    saved = load_guidance_model(run_dir / "guidance.safetensors").state_dict()
    cfg = tyro.cli(script.Config, args=common)
    policy = cfg.guide.build(cfg.model.build(seed=cfg.run.seed, device="cpu"))
    average = script.PolicyAverage(policy, 0.7)
    load_checkpoint(latest_checkpoint(run_dir), modules={"policy": policy, "policy_average": average},
                    restore_global_rng=False)
    assert int(average.updates) == total
    for name, value in saved.items():
        torch.testing.assert_close(value, average.average.state_dict()[name])
    assert any(not torch.equal(value, policy.state_dict()[name]) for name, value in saved.items())
    with pytest.raises(ConfigError, match=r"--policy-average 1\.0: a decay in \(0, 1\)"):
        run(SMALL + ["--run-dir", str(tmp_path / "bad"), "--policy-average", "1.0"])


def test_a_learned_reward_run_trains_on_a_black_box_and_resumes_exactly(tmp_path) -> None:
    """--surrogate: the verifier (no gradient) is the trained reward, logged as train/reward_mean and eval/reward_mean;
    the surrogate's own metrics are logged beside it; a killed run resumes its curves exactly (the head, its memory
    and its optimizer were checkpointed)."""
    total = 6
    common = SMALL + ["--total-updates", str(total), "--checkpoint-every", "2", "--eval-every", "3",
                      "--reward", "verifier-partial", "--surrogate", "shapes-clip", "--surrogate-fit-steps", "4",
                      "--surrogate-warmup", "4", "--surrogate-ramp", "4", "--reward-target", "None"]  # a target is in the black box's units
    run_dir = check_killed_run_resumes(script, common, tmp_path, total,
                                       ("train/reward_mean", "train/surrogate_mean", "train/surrogate_rmse",
                                        "eval/reward_mean"))
    records = read_metrics(run_dir)
    sizes = metric_curve(records, "train/surrogate_size")[1]
    assert sizes == [2.0 * u for u in range(1, total + 1)]  # every update's images were scored and remembered
    assert [g == 0.0 for g in metric_curve(records, "losses/grad_norm")[1]] == [True, True] + [False] * (total - 2)
    assert metric_curve(records, "train/lr_factor")[1] == [0.0, 0.0, 0.5, 1.0, 1.0, 1.0]  # warm-up, then the ramp
    evals = [r for r in records if "eval/reward_mean" in r]
    assert all(r["eval/reward_mean"] == r["eval/rewards/verifier-partial"] for r in evals)  # the black box
    with pytest.raises(ConfigError, match="--one-step with --surrogate"):
        run(common + ["--run-dir", str(tmp_path / "bad"), "--one-step"])
    with pytest.raises(ConfigError, match="--surrogate 'shapes-aesthetic' is a .*not a CLIP reward"):
        run(common + ["--run-dir", str(tmp_path / "bad2"), "--surrogate", "shapes-aesthetic"])


class NaNAfter(RewardModel):
    """The shapes-world CLIP score that turns NaN from its ``n``-th training call on."""

    def __init__(self, inner: RewardModel, n: int) -> None:
        super().__init__()
        self.inner, self.n, self.calls = inner, n, 0

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        values = self.inner(images, prompts)
        if torch.is_grad_enabled():  # training calls only (evaluation runs under no_grad)
            self.calls += 1
            if self.calls >= self.n:
                return values * float("nan")
        return values


register_reward("test-clip-nan-after-3", overwrite=True)(
    lambda world=None: NaNAfter(make_reward("shapes-clip", world=world), 3)
)


def test_nan_loss_stops_the_run_without_a_poisoned_checkpoint(tmp_path) -> None:
    argv = SMALL + ["--run-dir", str(tmp_path), "--reward", "test-clip-nan-after-3", "--total-updates", "10",
                    "--checkpoint-every", "2", "--eval-every", "100"]
    # The NaN is refused where the reward enters the algorithm, naming it (issue 27), and stops the run as a NaN loss.
    with pytest.raises(SystemExit, match=r"(?s)stopping at update 3: reward 'test-clip-nan-after-3' \(NaNAfter\) "
                                         r"returned 2 NaN values.*No checkpoint was written"):
        run(argv)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000000002"]
    cfg = tyro.cli(script.Config, args=argv)
    policy = cfg.guide.build(cfg.model.build(seed=cfg.run.seed, device="cpu"))
    load_checkpoint(latest_checkpoint(tmp_path), modules={"policy": policy}, restore_global_rng=False)
    assert all(torch.isfinite(p).all() for p in policy.parameters())


def test_tiny_flux_run_completes(tmp_path) -> None:
    """The earlier README settings (early steps, a text-blind attention network, a reward target) on a tiny random
    Flux: the real-Flux path."""
    from fluxguide.policies import TimestepRangeGuidance, load_guidance_model

    final = run(["--backbone", "tiny-flux", "--run-dir", str(tmp_path), "--batch-size", "2", "--num-steps", "3",
                 "--hidden-dim", "16", "--num-heads", "2", "--num-layers", "1", "--total-updates", "3",
                 "--eval-every", "3", "--checkpoint-every", "3", "--eval-num-prompts", "2",
                 "--eval-samples-per-prompt", "1", "--grid-prompts", "2", "--wandb-mode", "offline",
                 "--policy", "attention", "--policy-min-t", "0.5", "--no-text-conditioning", "--reward-target", "1.0"])
    policy = load_guidance_model(tmp_path / "guidance.safetensors")
    assert isinstance(policy, TimestepRangeGuidance)
    assert policy.config["models"][0]["model"]["text_conditioning"] is False
    assert set(final) == open_world_eval_metrics("tiny-random-clip")  # no verifier for Flux
    losses = metric_curve(read_metrics(tmp_path), "losses/loss")[1]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    assert load_checkpoint(latest_checkpoint(tmp_path), restore_global_rng=False).step == 3
    assert (tmp_path / "samples" / "eval_00000006.png").is_file()
    assert list((tmp_path / "wandb").glob("offline-run-*"))


def test_resuming_under_another_base_model_is_refused(tmp_path) -> None:
    # --seed draws another random shapes world: the checkpoint's fingerprint no longer matches.
    argv = SMALL + ["--run-dir", str(tmp_path), "--reward", "shapes-clip", "--total-updates", "1", "--eval-every", "100"]
    run(argv)
    saved = load_checkpoint(latest_checkpoint(tmp_path), restore_global_rng=False).state["backbone_fingerprint"]
    with pytest.raises(ConfigError, match=r"--seed: recorded 0, given 1"):  # a changed option, named first
        run(argv + ["--seed", "1", "--total-updates", "2"])
    # --allow-config-change accepts the option, never another base model.
    with pytest.raises(RuntimeError, match=rf"trained against another base model \(backbone fingerprint {saved};"):
        run(argv + ["--seed", "1", "--total-updates", "2", "--allow-config-change"])


def test_rl_from_a_distilled_start_with_an_affine_head(tmp_path) -> None:
    """--init-policy loads a saved network, --head affine adds a zero-initialised affine schedule on top (so the
    untrained sum is the loaded policy), and --body-lr-scale 0 trains the head alone, leaving the network as saved."""
    from fluxguide.policies import MultiObjectiveGuidance, load_guidance_model

    start, path = saved_start_policy(tmp_path)

    args = [*SMALL, "--init-policy", str(path), "--head", "affine", "--total-updates", "3", "--eval-every", "3",
            "--checkpoint-every", "3"]
    run([*args, "--run-dir", str(tmp_path / "frozen"), "--body-lr-scale", "0"])
    frozen = load_guidance_model(tmp_path / "frozen" / "guidance.safetensors")
    assert isinstance(frozen, MultiObjectiveGuidance)
    body, head = frozen.models
    assert all(a.equal(b) for a, b in zip(body.state_dict().values(), start.state_dict().values()))
    assert any(p.abs().sum() > 0 for p in head.parameters()), "the head trained"

    run([*args, "--run-dir", str(tmp_path / "both"), "--body-lr-scale", "0.1", "--init-kl", "1.0"])
    body = load_guidance_model(tmp_path / "both" / "guidance.safetensors").models[0]
    assert not all(a.equal(b) for a, b in zip(body.state_dict().values(), start.state_dict().values()))
    logged = [json.loads(line) for line in (tmp_path / "both" / "metrics.jsonl").read_text().splitlines()]
    kls = [r["train/init_kl"] for r in logged if "train/init_kl" in r]
    terms = [r["losses/loss_init_kl"] for r in logged if "losses/loss_init_kl" in r]
    assert len(kls) == 3 and kls[0] == 0.0 and kls[-1] > 0  # the distance to the start, which it begins at
    assert terms == pytest.approx(kls, rel=1e-5)  # --init-kl 1.0: the loss term is the KL itself

    with pytest.raises(SystemExit):  # a missing file is refused before anything runs
        script.cli(script.main, script.Config, [*SMALL, "--init-policy", str(tmp_path / "nope.safetensors"),
                                                "--run-dir", str(tmp_path / "x")])
