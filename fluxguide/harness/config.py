"""The options every training script shares, defined once: nested tyro configs with flat flags.

A script's ``Config`` holds its algorithm's own options and these groups, each annotated with
:data:`Flat` so that the flags stay flat (``--seed``, ``--run-dir``, ``--total-updates``, ``--policy`` ...)::

    @dataclass
    class Config:
        run: Flat[RunConfig] = field(default_factory=lambda: RunConfig(run_dir=Path("runs/ppo/shapes")))
        model: Flat[BackboneConfig] = field(default_factory=BackboneConfig)
        ...
        clip_epsilon: float = 0.2
        \"\"\"PPO clip range\"\"\"

A script that wants other defaults passes them to the group's default instance (as above); no field is
defined twice. ``reward``, ``policy`` and ``backbone`` are plain strings: a registered name, an installed
package's entry-point name, or a ``package.module:factory`` spec (:mod:`fluxguide.plugins`).
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, fields, is_dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import torch
import tyro

from fluxguide.harness.checks import (  # importable from here too
    ConfigError,
    check_device,
    check_float,
    check_int,
    check_no_duplicates,
    check_writable_dir,
    flag,
)

T = TypeVar("T")
#: A nested config group whose flags carry no prefix (``--seed``, not ``--run.seed``).
Flat = Annotated[T, tyro.conf.OmitArgPrefixes]


# --------------------------------------------------------------------------------------------- validation
def validate(config: Any) -> None:
    """Call ``validate()`` on ``config`` and on every nested config group that has one (each check written once)."""
    if not is_dataclass(config):
        return
    for f in fields(config):
        validate(getattr(config, f.name))
    if callable(getattr(config, "validate", None)):
        config.validate()


@dataclass
class RunConfig:
    """The run: its folder, seed, device, budgets, evaluation and checkpoint cadence, W&B."""

    preset: str = "shapes"
    """the recipe whose values are this script's defaults, set by --preset (listed in --help; the first is the
    default): 'shapes' for the shapes world, 'flux-dev' for FLUX.1-dev on a GPU (fluxguide.harness.presets)"""
    run_dir: Path = Path("runs/run")
    """run folder (checkpoints, metrics.jsonl, sample grids, W&B files, guidance.safetensors); rerunning with it
    resumes"""
    seed: int = 0
    """seed of the policy initialisation, the training batches and noise, and the evaluation noise"""
    threads: int = 1
    """torch CPU threads (1 is fastest on a shared 2-core machine)"""
    device: str = "cpu"
    """torch device"""
    total_updates: int = 200
    """optimizer updates of the whole run (a resumed run counts the updates already done)"""
    total_samples: int | None = None
    """stop (with a checkpoint) once the run has trained on this many samples (images, trajectories or pairs,
    over all processes), summed over resumes"""
    time_budget_minutes: float | None = None
    """stop (with a checkpoint) once the run has used this much wall time, evaluation included, summed over
    resumes"""
    eval_every: int = 20
    """evaluate every N updates (and at the start and the end)"""
    eval_at_start: bool = True
    """evaluate the policy before the first update (a chain's later stage skips it: the stage before evaluated the
    same policy on the same noise at its end)"""
    checkpoint_every: int = 20
    """write a checkpoint every N updates (and at the end)"""
    eval_prompts: str = "shapes-heldout"
    """held-out evaluation prompts: a text file with one prompt per line, a named set ('shapes-heldout'), or a
    spec 'package.module:function'"""
    eval_num_prompts: int | None = None
    """evaluate on the first N evaluation prompts (default: all)"""
    eval_samples_per_prompt: int = 2
    """samples per held-out prompt in each evaluation (same noise every time: paired comparisons)"""
    grid_prompts: int = 8
    """held-out prompts shown in each sample grid"""
    monitor_rewards: tuple[str, ...] | None = None
    """rewards the policy is not trained on, scored at each held-out evaluation as eval/rewards/<name> next to the
    trained one, to show reward hacking (fluxguide.harness.monitoring): default the backbone's (the shapes world:
    all its rewards); --monitor-rewards with no name scores none"""
    wandb_project: str = "fluxguide"
    """W&B project"""
    wandb_group: str = "fluxguide"
    """W&B group"""
    wandb_mode: str | None = None
    """'online', 'offline' or 'disabled' (default: $WANDB_MODE, else offline)"""
    allow_config_change: bool = False
    """resume even though options differ from those the run's checkpoint recorded (the new values apply from the
    resumed update on, so its curves mix two configurations); without it such a resume is refused, naming each
    changed flag. The budgets, the evaluation and checkpoint cadence, --device, --threads and the W&B options may
    always change"""

    def validate(self) -> None:
        """Refuse bad values before anything is loaded (:class:`ConfigError` naming the flag)."""
        from fluxguide.harness.tracking import resolve_wandb_mode

        check_int("threads", self.threads)
        check_int("total_updates", self.total_updates)
        check_int("total_samples", self.total_samples, optional=True)
        check_float("time_budget_minutes", self.time_budget_minutes, optional=True)
        check_int("eval_every", self.eval_every)
        check_int("checkpoint_every", self.checkpoint_every)
        check_int("eval_num_prompts", self.eval_num_prompts, optional=True)
        check_int("eval_samples_per_prompt", self.eval_samples_per_prompt)
        check_int("grid_prompts", self.grid_prompts, minimum=0)
        if self.monitor_rewards:
            check_no_duplicates("monitor_rewards", self.monitor_rewards)
        try:
            resolve_wandb_mode(self.wandb_mode)
        except ValueError as e:
            raise ConfigError(f"--wandb-mode: {e}") from None
        check_device("device", self.device)
        check_writable_dir("run_dir", self.run_dir)

    def heldout_prompts(self, backbone: Any = None) -> list[str]:
        """The held-out evaluation prompts (the first ``eval_num_prompts``), checked against ``backbone`` if given
        (a script's start: not at the first evaluation)."""
        from fluxguide.backbones.prompt_check import check_backbone_prompts
        from fluxguide.envs.prompts import resolve_prompts

        held = resolve_prompts(self.eval_prompts)[: self.eval_num_prompts]
        return held if backbone is None else check_backbone_prompts(
            backbone, held, where=f"--eval-prompts {self.eval_prompts}", source=self.eval_prompts)


@dataclass
class BackboneConfig:
    """The base model."""

    backbone: str = "shapes"
    """'shapes': the pretrained shapes world; 'shapes-random': a randomly initialised one (smoke tests);
    'tiny-flux': a tiny random diffusers Flux with a CLIP score over a tiny random open_clip (code-path test);
    'flux': real Flux weights from --model-path; an installed package's entry-point name; or a spec
    'package.module:factory'"""
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

    def validate(self) -> None:
        check_int("height", self.height)
        check_int("width", self.width)
        check_int("max_sequence_length", self.max_sequence_length)

    def build(self, *, seed: int, device: torch.device | str, num_steps: int | None = None) -> Any:
        """The backbone (:func:`fluxguide.backbones.registry.build_backbone`)."""
        from fluxguide.backbones.registry import build_backbone

        return build_backbone(self.backbone, weights_dir=self.weights_dir, seed=seed, device=device,
                              num_steps=num_steps, model_path=self.model_path, height=self.height, width=self.width,
                              max_sequence_length=self.max_sequence_length)


@dataclass
class RewardConfig:
    """The reward and the training prompts."""

    reward: str = "shapes-clip"
    """reward: a registry name ('shapes-clip', 'verifier', 'clip', 'aesthetic', ...; fluxguide.rewards.make_reward,
    built by the backbone with what it gives the reward, e.g. world=<the shapes world>, device=<its device>), an
    installed package's entry-point name, or a spec 'package.module:make_my_reward'. Ignored by tiny-flux, whose
    only reward is its tiny random CLIP score; on flux e.g. 'clip' with --reward-kwargs (the shapes rewards and
    the verifier belong to the shapes world, which flux refuses)"""
    reward_kwargs: str | None = None
    """keyword arguments of the reward as a JSON object, e.g. '{"model_name": "ViT-L-14", "pretrained":
    "/weights/open_clip_vitl14.safetensors"}' (a local open_clip weights file or an open_clip tag)"""
    train_prompts: str = "shapes-train"
    """training prompts: a text file with one prompt per line, a named set ('shapes-train', 'shapes-heldout'),
    or a spec 'package.module:function'"""

    def validate(self) -> None:
        from fluxguide.backbones.registry import parse_reward_kwargs

        try:
            parse_reward_kwargs(self.reward_kwargs)
        except (ValueError, TypeError) as e:
            raise ConfigError(str(e)) from None

    def build(self, backbone: Any, *, seed: int) -> Any:
        """The reward module, built by the one reward builder (:func:`fluxguide.backbones.registry.build_reward`)."""
        from fluxguide.backbones.registry import build_reward, parse_reward_kwargs

        return build_reward(self.reward, backbone, seed=seed, **parse_reward_kwargs(self.reward_kwargs))

    def prompts(self, backbone: Any = None) -> list[str]:
        """The training prompts, checked against ``backbone`` if given (at a script's start, before any model runs)."""
        from fluxguide.backbones.prompt_check import check_backbone_prompts
        from fluxguide.envs.prompts import resolve_prompts

        train = resolve_prompts(self.train_prompts)
        return train if backbone is None else check_backbone_prompts(
            backbone, train, where=f"--train-prompts {self.train_prompts}", source=self.train_prompts)


@dataclass
class PolicyConfig:
    """The guidance network."""

    policy: str = "attention"
    """guidance architecture: 'attention' (sees every token and the text tokens), 'affine', 'mlp', 'conv', ...
    (fluxguide.policies.registry), an installed package's entry-point name, or a spec 'package.module:factory'"""
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
    later steps to the base model (0: guide every step)"""

    init_policy: Path | None = None
    """start from this saved policy (a guidance.safetensors, e.g. a CFG-distilled BC policy, for RL from a
    distilled start or a DAgger round); its architecture replaces --policy / --hidden-dim / ..."""
    head: Literal["none", "affine"] = "none"
    """'affine': add a fresh affine schedule (a(t) img + b(t) pred per image channel, on t >= --policy-min-t,
    zero at the start) to the built or loaded policy, the two corrections summed: a few parameters that move fast
    on top of a network (see --body-lr-scale)"""
    body_lr_scale: float = 1.0
    """with --head: learning rate of the policy under the head, as a multiple of --lr (0 freezes it)"""

    def validate(self) -> None:
        check_int("hidden_dim", self.hidden_dim)
        check_int("num_layers", self.num_layers)
        check_int("num_heads", self.num_heads)
        check_float("policy_min_t", self.policy_min_t, strict=False, maximum=1.0)
        check_float("body_lr_scale", self.body_lr_scale, strict=False)
        if self.init_policy is not None and not Path(self.init_policy).is_file():
            raise ConfigError(f"--init-policy {self.init_policy}: no such file; pass a saved guidance.safetensors, "
                              "e.g. the one experiments/train_bc.py writes into its --run-dir")

    def build(self, backbone: Any, **options: Any) -> Any:
        """The guidance network: loaded from ``--init-policy`` or fresh (:func:`~fluxguide.policies.registry.
        build_policy`), under a fresh affine head with ``--head affine``."""
        from fluxguide.policies import MultiObjectiveGuidance, load_guidance_model
        from fluxguide.policies.registry import build_policy

        if self.init_policy is not None:
            policy = load_guidance_model(self.init_policy, device=backbone.device)
        else:
            policy = build_policy(self.policy, backbone, hidden_dim=self.hidden_dim, num_layers=self.num_layers,
                                  num_heads=self.num_heads, min_t=self.policy_min_t,
                                  text_conditioning=self.text_conditioning, **options)
        if self.head == "affine":
            head = build_policy("affine", backbone, hidden_dim=8, min_t=self.policy_min_t)
            policy = MultiObjectiveGuidance([policy, head])
        return policy

    def reference(self, policy: Any, init_kl: float) -> Any:
        """A frozen copy of ``policy`` as built, before any update or resume: the initial policy that an RL
        script's ``--init-kl`` keeps the fine-tuned one near (and whose distance it logs as ``train/init_kl``), and
        whose sampler Adjoint Matching's ``--tilt-from init`` tilts. ``None`` when there is nothing to measure: no
        ``--init-kl`` and no ``--init-policy``."""
        if init_kl <= 0 and self.init_policy is None:
            return None
        return copy.deepcopy(policy).eval().requires_grad_(False)

    def param_groups(self, policy: Any, lr: float, extra: Iterable[Any] = ()) -> list[dict[str, Any]]:
        """The optimizer's parameter groups: with ``--head``, the body at ``lr * --body-lr-scale`` (left out at 0)
        and the head at ``lr``; else every parameter at ``lr``. ``extra`` parameters (an actor's log-std, a critic)
        join at ``lr`` unless they are the policy's own."""
        own = {id(p) for p in policy.parameters()}
        rest = [p for p in dict.fromkeys(extra) if id(p) not in own]
        if self.head == "none":
            return [{"params": [*policy.parameters(), *rest], "lr": lr}]
        body, head = policy.models
        groups = [{"params": [*head.parameters(), *rest], "lr": lr}]
        if self.body_lr_scale > 0:
            groups.insert(0, {"params": list(body.parameters()), "lr": lr * self.body_lr_scale})
        else:
            body.requires_grad_(False)
        return groups


@dataclass
class TrainConfig:
    """The optimizer and the sampler of the training batches."""

    batch_size: int = 16
    """training batch of one update on each process: images (reward gradient), trajectories (PPO) or
    (observation, target) pairs (behaviour cloning)"""
    lr: float = 1e-3
    """learning rate (the peak of the schedule where there is one)"""
    weight_decay: float = 0.0
    """optimizer weight decay"""
    max_grad_norm: float | None = 1.0
    """clip the global gradient norm (None: no clipping)"""
    num_steps: int | None = 20
    """sampling steps (None: the dataset's in behaviour cloning, else the backbone's default)"""
    guidance_scale: float = 1.0
    """scale of the policy's correction"""

    def validate(self) -> None:
        check_int("batch_size", self.batch_size)
        check_float("lr", self.lr)
        check_float("weight_decay", self.weight_decay, strict=False)
        check_float("max_grad_norm", self.max_grad_norm, optional=True)
        check_int("num_steps", self.num_steps, optional=True)
        check_float("guidance_scale", self.guidance_scale, minimum=-math.inf)


#: The options a resumed run may give another value than its checkpoint recorded, and why: they say how long,
#: where and how visibly the run goes on, not what it trains or how it is measured. Every other recorded option
#: must be given the same value (:func:`check_resume_config`); the evaluation prompts and samples are compared,
#: since a resumed evaluation on others would not continue the curves (and BC reuses its stored references).
RESUME_MAY_CHANGE: dict[str, str] = {
    "run_dir": "the run folder may be moved or copied",
    "total_updates": "a budget: extending it is what resuming is for",
    "total_samples": "a budget",
    "time_budget_minutes": "a budget",
    "eval_every": "the cadence of evaluations, not what they measure",
    "eval_at_start": "the cadence of evaluations, not what they measure",
    "checkpoint_every": "the cadence of checkpoints",
    "grid_prompts": "how many evaluation prompts the sample grids show, not what is measured",
    "monitor_rewards": "which untrained rewards the evaluations also score, not what is trained",
    "device": "where the run computes (another GPU, or the same run moved to another machine)",
    "threads": "how many CPU threads compute it",
    "wandb_project": "where the metrics are sent",
    "wandb_group": "where the metrics are sent",
    "wandb_mode": "where the metrics are sent",
    "preset": "it only picks defaults: the values it sets are compared one by one",
    "gradient_checkpointing": "trades memory for compute; the gradients are the same",
    "storage": "BC's replay storage (memory or memmap) holds the same pairs",
    "allow_config_change": "the option that accepts a change",
}


def check_resume_config(recorded: Mapping[str, Any] | None, current: Mapping[str, Any], checkpoint: Path, *,
                        allow: bool) -> list[str]:
    """Compare a resumed run's flat options with those ``checkpoint`` recorded; return the changes found.

    Options in :data:`RESUME_MAY_CHANGE` are not compared, nor options one side lacks (a checkpoint written
    before an option existed, or without a config at all, resumes as before).

    Raises:
        ConfigError: an option changed and ``allow`` (``--allow-config-change``) is not set, naming each flag with
            the recorded and the given value, and the fixes.
    """
    now = json.loads(json.dumps(dict(current), default=str))  # as recorded: paths as strings, tuples as lists
    changes = [f"{flag(k)}: recorded {recorded[k]!r}, given {now[k]!r}" for k in sorted(now)
               if recorded and k in recorded and k not in RESUME_MAY_CHANGE and recorded[k] != now[k]]
    if changes and not allow:
        raise ConfigError(
            f"the run in {Path(checkpoint).parent.parent} was started with other options than given now ("
            + "; ".join(changes) + f"), recorded in {checkpoint}: rerun with the recorded values to resume it, use "
            "another --run-dir to start a new run with these, or pass --allow-config-change to resume it with the "
            "new values"
        )
    return changes


def flat_config(config: Any) -> dict[str, Any]:
    """``config`` as one flat JSON-able dict (the nested groups' fields at the top level, paths as strings):
    what checkpoints and W&B record, keyed as the flags are."""
    out: dict[str, Any] = {}
    for key, value in (asdict(config) if is_dataclass(config) else dict(config)).items():
        if isinstance(value, dict):
            out.update(flat_config(value))
        else:
            out[key] = str(value) if isinstance(value, Path) else value
    return out
