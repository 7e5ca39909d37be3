"""Train a guidance policy by reward gradient: backpropagate a differentiable reward through the sampler.

    python experiments/train_reward_gradient.py                                # shapes world, tiny-CLIP reward
    python experiments/train_reward_gradient.py --backbone tiny-flux --total-updates 20   # tiny random Flux
    python experiments/train_reward_gradient.py --backbone flux --model-path black-forest-labs/FLUX.1-dev \
        --device cuda --reward clip --reward-kwargs '{"model_name": "ViT-L-14-quickgelu", "pretrained": "openai"}' \
        --train-prompts prompts.txt --eval-prompts heldout.txt   # real Flux (docs/guide.md)
    python experiments/train_reward_gradient.py --help                         # every option

Each update samples a batch of *training* prompts, runs the guided sampler with a graph through the last K
steps, decodes, scores with the reward and takes one optimizer step (``fluxguide.algos.RewardGradient``).
Every ``eval_every`` updates the policy is evaluated on the *held-out* prompts with fixed noise: the reward
and, on the shapes world, the exact verifier's pass rate (the metric that tells real improvement from reward
hacking), plus a PNG grid of samples. Metrics go to W&B (offline unless ``--wandb-mode online``) and to
``<run_dir>/metrics.jsonl``, against ``charts/samples_seen``.

Checkpoints are written every ``checkpoint_every`` updates to ``<run_dir>/checkpoints``. Rerunning the same
command continues from the last one (same update count, same RNG streams, so the curves continue where they
stopped). A NaN/inf loss stops the run with a message and writes no checkpoint.

Under ``torchrun`` every process trains data-parallel on its own prompts and noise (``--batch-size`` per
process) and rank 0 logs the gathered metrics and writes the files (docs/distributed.md).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import tyro
from tqdm import tqdm

from fluxguide import distributed
from fluxguide.algos import NonFiniteLossError, RewardGradient, RewardGradientConfig
from fluxguide.backbones.registry import BackboneName, build_backbone, build_reward, parse_reward_kwargs
from fluxguide.checkpointing import latest_checkpoint, load_checkpoint, save_checkpoint
from fluxguide.harness.curves import plot_curves
from fluxguide.envs.prompts import resolve_prompts
from fluxguide.harness.evaluation import HeldoutEvaluator
from fluxguide.policies import save_guidance_model
from fluxguide.policies.registry import PolicyName, build_policy
from fluxguide.provenance import backbone_fingerprint, check_resume_fingerprint
from fluxguide.harness.tracking import Tracker


@dataclass
class Config:
    run_dir: Path = Path("runs/reward_gradient/shapes")
    """run folder (checkpoints, metrics.jsonl, sample grids, W&B files); rerunning with it resumes"""
    backbone: BackboneName = "shapes"
    """'shapes': the pretrained shapes world; 'shapes-random': a randomly initialised one (smoke tests);
    'tiny-flux': a tiny random diffusers Flux with a CLIP score over a tiny random open_clip (code-path test);
    'flux': real Flux weights from --model-path"""
    model_path: str | None = None
    """flux: a local diffusers FluxPipeline folder or a hub id (e.g. black-forest-labs/FLUX.1-dev)"""
    height: int = 1024
    """flux: image height (a multiple of 16)"""
    width: int = 1024
    """flux: image width (a multiple of 16)"""
    max_sequence_length: int = 512
    """flux: T5 tokens per prompt (512 for FLUX.1-dev, at most 256 for FLUX.1-schnell)"""
    weights_dir: Path | None = None
    """shapes-world weight folder (default: the weights shipped in the package)"""
    reward: str = "shapes-clip"
    """reward registry name (fluxguide.rewards.make_reward), built with world=<the shapes world> on the shapes
    world; must be differentiable. Ignored by tiny-flux, which uses its own tiny CLIP score; on flux e.g. 'clip'
    with --reward-kwargs"""
    reward_kwargs: str | None = None
    """keyword arguments of the reward as a JSON object, e.g. '{"model_name": "ViT-L-14", "pretrained":
    "/weights/open_clip_vitl14.safetensors"}' (a local open_clip weights file or an open_clip tag)"""
    train_prompts: str = "shapes-train"
    """training prompts: a text file with one prompt per line, or a named set ('shapes-train', 'shapes-heldout')"""
    eval_prompts: str = "shapes-heldout"
    """held-out evaluation prompts: a text file with one prompt per line, or a named set"""
    policy: PolicyName = "attention"
    """guidance architecture (all know each token's position; attention also reads the text tokens)"""
    hidden_dim: int = 64
    """policy width"""
    num_layers: int = 2
    """policy depth (MLP layers / transformer blocks / conv blocks)"""
    num_heads: int = 4
    """attention heads (attention policy)"""
    text_conditioning: bool = True
    """attention policy: read the text tokens and pooled embedding; --no-text-conditioning builds a text-blind
    policy (img, pred and t only) that acts on the prompt only through the base model's prediction, as CFG does,
    and so cannot tie what it learns to the training prompts' word combinations"""
    policy_min_t: float = 0.0
    """guide only at times t >= this (1 = noise; e.g. 0.64 = the first 10 of 20 shapes-world steps) and leave the
    later steps to the base model, so that the reward can only be raised through the layout and shapes the
    early steps decide (0: guide every step)"""
    lr: float = 1e-3
    """AdamW learning rate"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    batch_size: int = 16
    """images per update (one per prompt, prompts drawn with replacement from the training prompts)"""
    num_steps: int = 20
    """sampling steps"""
    guidance_scale: float = 1.0
    """scale of the policy's correction"""
    grad_last_k: int | None = None
    """backpropagate through the last K steps only (default: all steps)"""
    random_k: bool = False
    """draw K uniformly from [1, grad_last_k] at every update (AlignProp's randomized truncation)"""
    gradient_checkpointing: bool = True
    """recompute step activations in the backward pass (less memory, about one more forward)"""
    control_cost: float = 0.0
    """weight of the control cost (KL to the base sampler) on the corrections"""
    reward_target: float | None = None
    """AlignProp-style reward target: the loss is -min(reward, target)"""
    max_grad_norm: float | None = 1.0
    """clip the global gradient norm (None: no clipping)"""
    reward_shift: int = 0
    """score training images shifted by a random offset of up to this many pixels (robust to reward-model
    artefacts such as textures aligned with a ViT's patch grid); evaluation scores unshifted images"""
    one_step: bool = False
    """train with the one-step variant (reward of the predicted clean image at a random step)"""
    straight_through: bool = False
    """shapes world: give the reward's gradient to pixels the decoder clamps to [0, 1] (straight-through
    clamp), so shapes can grow into the black background"""
    total_updates: int = 200
    """optimizer updates of the whole run (a resumed run counts the updates already done)"""
    time_budget_minutes: float | None = None
    """stop (with a checkpoint) once the run has used this much wall time, evaluation included, summed over
    resumes"""
    eval_every: int = 20
    """evaluate every N updates (and at the start and the end)"""
    eval_num_prompts: int | None = None
    """evaluate on the first N evaluation prompts (default: all)"""
    eval_samples_per_prompt: int = 2
    """samples per held-out prompt in each evaluation (same noise every time: paired comparisons)"""
    grid_prompts: int = 8
    """held-out prompts shown in each sample grid"""
    checkpoint_every: int = 20
    """write a checkpoint every N updates (and at the end)"""
    seed: int = 0
    """seed of the policy initialisation, prompt sampling and noise"""
    threads: int = 1
    """torch CPU threads (1 is fastest on a shared 2-core machine)"""
    device: str = "cpu"
    """torch device"""
    wandb_project: str = "fluxguide"
    """W&B project"""
    wandb_group: str = "reward-gradient"
    """W&B group"""
    wandb_mode: str | None = None
    """'online', 'offline' or 'disabled' (default: $WANDB_MODE, else offline)"""


def main(cfg: Config) -> dict[str, float]:
    device = distributed.init_distributed(cfg.device)  # this rank's device (a no-op without torchrun)
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    backbone = build_backbone(cfg.backbone, weights_dir=cfg.weights_dir, seed=cfg.seed, device=device,
                              num_steps=cfg.num_steps, model_path=cfg.model_path, height=cfg.height, width=cfg.width,
                              max_sequence_length=cfg.max_sequence_length)
    reward = build_reward(cfg.reward, backbone, seed=cfg.seed, **parse_reward_kwargs(cfg.reward_kwargs))
    policy = build_policy(cfg.policy, backbone, hidden_dim=cfg.hidden_dim, num_layers=cfg.num_layers,
                          num_heads=cfg.num_heads, min_t=cfg.policy_min_t,
                          text_conditioning=cfg.text_conditioning)
    distributed.reseed_rank_streams(cfg.seed)  # same policy init on every rank, then each rank's own stream
    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    # DDP fits this loop: the sampler calls the policy at each step, and one backward through them all (with
    # non-reentrant checkpointing) averages each gradient once over the ranks, before clipping.
    algo = RewardGradient(
        backbone, distributed.data_parallel(policy), reward, optimizer,
        RewardGradientConfig(
            num_steps=cfg.num_steps, guidance_scale=cfg.guidance_scale, grad_last_k=cfg.grad_last_k,
            random_k=cfg.random_k, gradient_checkpointing=cfg.gradient_checkpointing,
            control_cost=cfg.control_cost, reward_target=cfg.reward_target, max_grad_norm=cfg.max_grad_norm,
            reward_shift=cfg.reward_shift,
        ),
        one_step=cfg.one_step,
        decode=backbone.straight_through_decoder() if cfg.straight_through else None,
    )
    train, held = resolve_prompts(cfg.train_prompts), resolve_prompts(cfg.eval_prompts)[: cfg.eval_num_prompts]
    data_gen = torch.Generator().manual_seed(distributed.rank_seed(cfg.seed))  # prompts and noise of the batches

    # Resume from the last checkpoint of this run folder, if any.
    update, samples_seen, elapsed = 0, 0, 0.0
    last_eval: dict[str, float] = {}
    fingerprint = backbone_fingerprint(backbone)  # stored in every checkpoint; a resume must match it
    ckpt = latest_checkpoint(cfg.run_dir)
    if ckpt is not None:
        main_rank = distributed.is_main()  # the RNG states saved are rank 0's; other ranks start fresh streams
        loaded = load_checkpoint(ckpt, modules={"policy": policy}, optimizers={"policy": optimizer},
                                 generators={"data": data_gen} if main_rank else {}, restore_global_rng=main_rank)
        check_resume_fingerprint(loaded.state.get("backbone_fingerprint"), fingerprint, ckpt)
        distributed.reseed_rank_streams(cfg.seed, data_gen, step=loaded.step)
        update, samples_seen, elapsed = loaded.step, loaded.state["samples_seen"], loaded.state["elapsed_seconds"]
        last_eval = loaded.state.get("last_eval", {})
        print(f"resuming from {ckpt} (update {update}, {samples_seen} samples seen)")
    config_dict = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()}
    tracker = Tracker(cfg.run_dir, config=config_dict, project=cfg.wandb_project, group=cfg.wandb_group,
                      mode=cfg.wandb_mode, resume_samples_seen=samples_seen if ckpt is not None else None,
                      tags=("reward-gradient", cfg.reward, cfg.backbone))

    evaluator = HeldoutEvaluator(backbone, reward, held, cfg.run_dir, num_grid_prompts=cfg.grid_prompts,
                                 samples_per_prompt=cfg.eval_samples_per_prompt, seed=cfg.seed,
                                 guidance_scale=cfg.guidance_scale, num_steps=cfg.num_steps) if distributed.is_main() else None

    def run_eval() -> dict[str, float]:
        # rank 0 evaluates (fixed noise; every rank holds the same policy)
        return evaluator(policy, tracker, samples_seen) if evaluator is not None else {}

    start = time.perf_counter() - elapsed
    if update == 0:
        last_eval = run_eval()

    def out_of_time() -> bool:
        return cfg.time_budget_minutes is not None and time.perf_counter() - start >= 60 * cfg.time_budget_minutes
    bar = tqdm(range(update, cfg.total_updates), initial=update, total=cfg.total_updates, desc="reward-gradient",
               disable=not distributed.is_main())
    for update in bar:
        if distributed.any_rank(out_of_time()):  # a resumed run whose budget was already used up
            break
        t0 = time.perf_counter()
        prompts = [train[i] for i in torch.randint(len(train), (cfg.batch_size,), generator=data_gen).tolist()]
        try:
            metrics = algo.update(prompts, data_gen)
        except (NonFiniteLossError, FloatingPointError) as e:
            tracker.finish()
            last = latest_checkpoint(cfg.run_dir)
            raise SystemExit(
                f"stopping at update {update + 1}: {e}\nNo checkpoint was written for this update; the last good "
                f"checkpoint is {last if last is not None else '(none)'}. Rerunning resumes from it: lower --lr "
                f"or --guidance-scale, or add --control-cost."
            ) from e
        metrics = distributed.mean_over_ranks(metrics, pooled_std={"reward_std": "reward_mean"}, count=cfg.batch_size)
        samples_seen += cfg.batch_size * distributed.world_size()
        done = update + 1
        tracker.log({
            "train/reward_mean": metrics["reward_mean"], "train/reward_std": metrics["reward_std"],
            "train/control_cost": metrics["control_cost"], "train/grad_last_k": metrics.get("grad_last_k", 1.0),
            "losses/loss": metrics["loss"], "losses/loss_reward": metrics["loss_reward"],
            "losses/loss_control": metrics.get("loss_control", 0.0), "losses/grad_norm": metrics["grad_norm"],
            "perf/seconds_per_update": time.perf_counter() - t0, "charts/updates": done,
            "charts/world_size": distributed.world_size(),
        }, samples_seen)
        bar.set_postfix(reward=f"{metrics['reward_mean']:.4f}", **(
            {"heldout_pass": f"{last_eval['eval/verifier_pass_rate']:.3f}"} if "eval/verifier_pass_rate" in last_eval
            else {}))
        stop = distributed.any_rank(out_of_time())
        last = done == cfg.total_updates or stop
        if done % cfg.eval_every == 0 or last:
            last_eval = run_eval()
        if (done % cfg.checkpoint_every == 0 or last) and distributed.is_main():
            save_checkpoint(cfg.run_dir, done, modules={"policy": policy}, optimizers={"policy": optimizer},
                            generators={"data": data_gen},
                            state={"samples_seen": samples_seen, "elapsed_seconds": time.perf_counter() - start,
                                   "backbone_fingerprint": fingerprint, "config": config_dict, "last_eval": last_eval})
        if stop:
            print(f"time budget of {cfg.time_budget_minutes} min used up after {done} updates")
            break
    bar.close()
    tracker.finish()
    distributed.check_in_sync(policy)  # data-parallel ranks must end with the same policy
    if distributed.is_main():
        save_guidance_model(policy, cfg.run_dir / "guidance.safetensors")  # for evaluate.py / main.py
        plot_curves(cfg.run_dir)
    distributed.cleanup()
    if last_eval:
        shown = {k: round(v, 4) for k, v in last_eval.items() if not math.isnan(v)}
        print(f"final held-out evaluation after {samples_seen} samples: {shown}")
    return last_eval


if __name__ == "__main__":
    main(tyro.cli(Config))
