"""Train a guidance policy by PPO on the denoising MDP (TorchRL collector, ClipPPOLoss), against any reward.

    python experiments/train_ppo.py                                   # shapes world, verifier reward, SDE
    python experiments/train_ppo.py --advantage gae                   # GAE with a value network
    python experiments/train_ppo.py --backbone tiny-flux --total-updates 5   # tiny random Flux code path
    python experiments/train_ppo.py --backbone flux --model-path black-forest-labs/FLUX.1-dev --device cuda \
        --reward clip --reward-kwargs '{"model_name": "ViT-L-14-quickgelu", "pretrained": "openai"}' \
        --train-prompts prompts.txt --eval-prompts heldout.txt   # real Flux (docs/guide.md)
    python experiments/train_ppo.py --help                            # every option

Each update collects one episode of ``batch_size`` trajectories (``samples_per_prompt`` per *training*
prompt) with the Gaussian policy on the TorchRL env -- in SDE mode (default) the policy's std is the SDE's,
so exploration is the sampler's own noise (Flow-GRPO); in ODE mode it is a fixed Gaussian std -- computes
advantages (per-prompt normalised returns, or GAE) and runs ``epochs`` passes of ClipPPOLoss over minibatches
of whole trajectories (``fluxguide.algos.PPO``). Every ``eval_every`` updates the mean policy is evaluated
on the *held-out* prompts with fixed noise and the deterministic (ODE) sampler: the reward and, on the
shapes world, the verifier's pass rate, plus a PNG grid. Metrics go to W&B (offline unless
``--wandb-mode online``) and ``<run_dir>/metrics.jsonl`` against ``charts/samples_seen``.

Checkpoints are written every ``checkpoint_every`` updates to ``<run_dir>/checkpoints``; rerunning the same
command continues from the last one with the same RNG streams. A non-finite loss or log-prob stops the run
with a message and writes no checkpoint.

Under ``torchrun`` every process collects its own episodes (``--batch-size`` trajectories per process, its own
prompts and noise) and the gradients are averaged over processes; rank 0 logs the gathered metrics and writes
the files (docs/distributed.md).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
import tyro
from tqdm import tqdm

from fluxguide import distributed
from fluxguide.algos import NonFiniteLossError
from fluxguide.algos.ppo import PPO, AdvantageMode, PPOConfig
from fluxguide.backbones.registry import BackboneName, build_backbone, build_reward, parse_reward_kwargs
from fluxguide.checkpointing import latest_checkpoint, load_checkpoint, save_checkpoint
from fluxguide.harness.curves import plot_curves
from fluxguide.envs import GuidanceTorchRLEnv
from fluxguide.envs.prompts import resolve_prompts
from fluxguide.harness.evaluation import HeldoutEvaluator
from fluxguide.policies import make_coefficient_actor, make_probabilistic_actor, make_value_network, save_guidance_model
from fluxguide.policies.registry import PolicyName, build_policy, image_channels, latent_grid
from fluxguide.provenance import backbone_fingerprint, check_resume_fingerprint
from fluxguide.harness.tracking import Tracker


@dataclass
class Config:
    run_dir: Path = Path("runs/ppo/shapes")
    """run folder (checkpoints, metrics.jsonl, sample grids, W&B files); rerunning with it resumes"""
    backbone: BackboneName = "shapes"
    """'shapes': the pretrained shapes world; 'shapes-random': a randomly initialised one (smoke tests);
    'tiny-flux': a tiny random diffusers Flux with a tiny random CLIP score as reward (code-path test);
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
    reward: str = "verifier"
    """reward registry name (fluxguide.rewards.make_reward); need not be differentiable. Ignored by tiny-flux;
    on flux e.g. 'clip' or 'aesthetic' with --reward-kwargs (the shapes rewards and the verifier are shapes-only)"""
    reward_kwargs: str | None = None
    """keyword arguments of the reward as a JSON object, e.g. '{"model_name": "ViT-L-14", "pretrained":
    "/weights/open_clip_vitl14.safetensors"}' (a local open_clip weights file or an open_clip tag)"""
    train_prompts: str = "shapes-train"
    """training prompts: a text file with one prompt per line, or a named set ('shapes-train', 'shapes-heldout')"""
    eval_prompts: str = "shapes-heldout"
    """held-out evaluation prompts: a text file with one prompt per line, or a named set"""
    policy: PolicyName = "attention"
    """guidance architecture of the policy's mean"""
    hidden_dim: int = 64
    """policy width"""
    num_layers: int = 2
    """policy depth (MLP layers / transformer blocks / conv blocks)"""
    num_heads: int = 4
    """attention heads (attention policy)"""
    policy_min_t: float = 0.0
    """guide only at times t >= this (1 = noise; e.g. 0.64 = the first 10 of 20 shapes-world steps): the policy's
    mean is zero later, and in ODE mode it explores only where it acts (later noise would only blur the reward)"""
    text_conditioning: bool = True
    """attention policy: read the text tokens and pooled embedding; --no-text-conditioning builds a text-blind
    policy (img, pred and t only) that acts on the prompt only through the base model's prediction, as CFG does,
    and so cannot tie what it learns to the training prompts' word combinations"""
    coarse_actions: bool = False
    """explore and correct with coarse corrections, one value per token and image channel (192 numbers per
    shapes-world step instead of 3,072): the policy-gradient noise shrinks with the action's dimension (ODE mode)"""
    explore_coefficients: bool = False
    """with --policy affine: explore in the policy's 2 x channels coefficients of img and pred (6 numbers per
    shapes-world step), each with std --std, instead of in the whole correction (ODE mode)"""
    mode: Literal["sde", "ode"] = "sde"
    """'sde': the marginal-preserving SDE sampler with the policy's std set to the SDE's (Flow-GRPO);
    'ode': the Euler sampler with Gaussian policy noise of std --std"""
    noise_level: float = 0.7
    """SDE noise level a of sigma_t = a sqrt(t / (1 - t)) (SDE mode)"""
    std: float = 0.1
    """policy std in ODE mode (initial std with --learn-std)"""
    learn_std: bool = False
    """learn one log-std parameter (ODE mode)"""
    log_prob_reduction: Literal["mean", "sum"] = "mean"
    """reduce the per-element log-density by mean (sane ratios at high dimension) or sum (exact)"""
    control_cost: float = 0.0
    """KL penalty to the base sampler: the env's per-step control cost (exact Gaussian KL in SDE mode)"""
    shared_group_noise: bool = False
    """start the trajectories of a prompt group from one initial noise (common random numbers, as in
    DanceGRPO): their rewards then differ only through the exploration noise"""
    advantage: AdvantageMode = "group"
    """'group': per-prompt normalised returns (critic-free, DDPO / GRPO); 'gae': GAE with a value network"""
    gae_lambda: float = 0.95
    """GAE lambda"""
    critic_coef: float = 0.5
    """weight of the critic loss (GAE)"""
    clip_epsilon: float = 0.2
    """PPO clip range"""
    epochs: int = 2
    """PPO passes over each collected batch"""
    minibatch_trajectories: int = 16
    """whole trajectories per minibatch"""
    batch_size: int = 32
    """trajectories per update (the env's batch)"""
    samples_per_prompt: int = 8
    """trajectories per prompt (the group of the per-prompt advantage)"""
    num_steps: int = 20
    """sampling steps"""
    guidance_scale: float = 1.0
    """scale of the policy's correction"""
    lr: float = 3e-4
    """Adam learning rate"""
    entropy_coef: float = 0.0
    """entropy bonus (only moves a learned std)"""
    max_grad_norm: float | None = 1.0
    """clip the global gradient norm (None: no clipping)"""
    total_updates: int = 300
    """updates of the whole run (a resumed run counts the updates already done)"""
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
    """seed of the policy initialisation, prompt sampling, noise and policy sampling"""
    threads: int = 1
    """torch CPU threads (1 is fastest on a shared 2-core machine)"""
    device: str = "cpu"
    """torch device"""
    wandb_project: str = "fluxguide"
    """W&B project"""
    wandb_group: str = "ppo"
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
    train, held = resolve_prompts(cfg.train_prompts), resolve_prompts(cfg.eval_prompts)[: cfg.eval_num_prompts]
    if cfg.backbone == "tiny-flux":  # its tokenizer knows English; the shapes captions serve as prompts
        train = train[: cfg.batch_size // cfg.samples_per_prompt]
    env = GuidanceTorchRLEnv(backbone, reward=reward, prompts=train, batch_size=cfg.batch_size,
                             samples_per_prompt=cfg.samples_per_prompt, num_steps=cfg.num_steps,
                             guidance_scale=cfg.guidance_scale, mode=cfg.mode, noise_level=cfg.noise_level,
                             control_cost=cfg.control_cost, shared_group_noise=cfg.shared_group_noise)
    env.set_seed(distributed.rank_seed(cfg.seed))  # each rank its own prompts and noise
    policy = build_policy(cfg.policy, backbone, hidden_dim=cfg.hidden_dim, num_layers=cfg.num_layers,
                          num_heads=cfg.num_heads, min_t=cfg.policy_min_t,
                          text_conditioning=cfg.text_conditioning, coarse=cfg.coarse_actions)
    if cfg.explore_coefficients:
        if cfg.policy != "affine" or cfg.mode != "ode" or cfg.coarse_actions:
            raise ValueError(
                f"--explore-coefficients explores the coefficients of --policy affine in --mode ode (without "
                f"--coarse-actions); got --policy {cfg.policy} --mode {cfg.mode}"
                + (" --coarse-actions" if cfg.coarse_actions else "")
            )
        actor = make_coefficient_actor(policy, std=cfg.std, learn_std=cfg.learn_std,
                                       log_prob_reduction=cfg.log_prob_reduction)
    else:
        actor = make_probabilistic_actor(
            policy, std=cfg.std, learn_std=cfg.learn_std and cfg.mode == "ode", use_sde_std=cfg.mode == "sde",
            log_prob_reduction=cfg.log_prob_reduction,
            coarse_channels=image_channels(backbone) if cfg.coarse_actions else None,
            explore_min_t=cfg.policy_min_t if cfg.mode == "ode" else 0.0)
    critic = None
    if cfg.advantage == "gae":
        cond = backbone.encode([""])
        critic = make_value_network(backbone.latent_channels, cfg.hidden_dim, cfg.num_layers, cond.vec.shape[-1],
                                    latent_grid(backbone), device=device)
    modules = {"actor": actor, **({"critic": critic} if critic is not None else {})}
    params = [p for m in modules.values() for p in m.parameters()]
    optimizer = torch.optim.Adam(params, lr=cfg.lr)
    distributed.reseed_rank_streams(cfg.seed)  # same init on every rank, then each rank's own policy sampling

    ppo = PPO(env, actor, optimizer, PPOConfig(
        clip_epsilon=cfg.clip_epsilon, epochs=cfg.epochs, minibatch_trajectories=cfg.minibatch_trajectories,
        advantage=cfg.advantage, lmbda=cfg.gae_lambda, critic_coef=cfg.critic_coef, entropy_coef=cfg.entropy_coef,
        max_grad_norm=cfg.max_grad_norm,
    ), critic=critic)

    # Resume from the last checkpoint of this run folder, if any: weights, optimizer, RNG streams, and the env's
    # generator as it was when the pending episode was drawn, which the collector then redraws.
    update, samples_seen, elapsed = 0, 0, 0.0
    last_eval: dict[str, float] = {}
    fingerprint = backbone_fingerprint(backbone)  # stored in every checkpoint; a resume must match it
    ckpt = latest_checkpoint(cfg.run_dir)
    if ckpt is not None:
        main_rank = distributed.is_main()  # the RNG states saved are rank 0's; other ranks start fresh streams
        loaded = load_checkpoint(ckpt, modules=modules, optimizers={"policy": optimizer},
                                 generators={"env": env.core.generator} if main_rank else {},
                                 restore_global_rng=main_rank)
        check_resume_fingerprint(loaded.state.get("backbone_fingerprint"), fingerprint, ckpt)
        distributed.reseed_rank_streams(cfg.seed, env.core.generator, step=loaded.step)
        ppo.restart_episode()
        update, samples_seen, elapsed = loaded.step, loaded.state["samples_seen"], loaded.state["elapsed_seconds"]
        last_eval = loaded.state.get("last_eval", {})
        print(f"resuming from {ckpt} (update {update}, {samples_seen} samples seen)")
    config_dict = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()}
    tracker = Tracker(cfg.run_dir, config=config_dict, project=cfg.wandb_project, group=cfg.wandb_group,
                      mode=cfg.wandb_mode, resume_samples_seen=samples_seen if ckpt is not None else None,
                      tags=("ppo", cfg.reward, cfg.backbone, cfg.mode, cfg.advantage))

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

    bar = tqdm(range(update, cfg.total_updates), initial=update, total=cfg.total_updates, desc="ppo",
               disable=not distributed.is_main())
    for update in bar:
        if distributed.any_rank(out_of_time()):
            break
        t0 = time.perf_counter()
        try:
            metrics = ppo.update()
        except NonFiniteLossError as e:
            tracker.finish()
            last = latest_checkpoint(cfg.run_dir)
            raise SystemExit(
                f"stopping at update {update + 1}: {e}\nNo checkpoint was written for this update; the last good "
                f"checkpoint is {last if last is not None else '(none)'}. Rerunning resumes from it: lower --lr, "
                f"--clip-epsilon or --std."
            ) from e
        samples_seen += cfg.batch_size * distributed.world_size()
        done = update + 1
        tracker.log({
            **{f"train/{k}": metrics[k] for k in ("reward_mean", "reward_std", "group_reward_std",
                                                  "zero_std_group_fraction", "verifier_pass_rate") if k in metrics},
            **{f"losses/{k}": v for k, v in metrics.items() if k.startswith("loss") or k in (
                "grad_norm", "clip_fraction", "kl_approx", "ESS", "mean_ratio", "max_ratio", "explained_variance",
                "entropy", "first_mean_ratio", "first_max_ratio", "first_clip_fraction")},
            "perf/seconds_per_update": time.perf_counter() - t0, "charts/updates": done,
            "charts/world_size": distributed.world_size(),
        }, samples_seen)
        bar.set_postfix(reward=f"{metrics['reward_mean']:.3f}", **(
            {"heldout_pass": f"{last_eval['eval/verifier_pass_rate']:.3f}"} if "eval/verifier_pass_rate" in last_eval
            else {}))
        stop = distributed.any_rank(out_of_time())
        last = done == cfg.total_updates or stop
        if done % cfg.eval_every == 0 or last:
            last_eval = run_eval()
        if (done % cfg.checkpoint_every == 0 or last) and distributed.is_main():
            episode = torch.Generator().manual_seed(0)
            episode.set_state(env.core.episode_rng_state)  # the pending episode's draw, not the one after it
            save_checkpoint(cfg.run_dir, done, modules=modules, optimizers={"policy": optimizer},
                            generators={"env": episode},
                            state={"samples_seen": samples_seen, "elapsed_seconds": time.perf_counter() - start,
                                   "backbone_fingerprint": fingerprint, "config": config_dict, "last_eval": last_eval})
        if stop:
            print(f"time budget of {cfg.time_budget_minutes} min used up after {done} updates")
            break
    bar.close()
    ppo.shutdown()
    tracker.finish()
    for name, module in modules.items():  # data-parallel ranks must end with the same weights
        distributed.check_in_sync(module, name)
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
