"""Named presets: each training script's best known recipe per backbone, picked with ``--preset``.

A script lists its recipes as ``PRESETS = {"shapes": lambda: Config(...), "flux-dev": lambda: Config(...)}``,
the first being its default, and calls ``cli(main, Config, presets=PRESETS)``. ``--preset NAME`` is read
before the other flags, so the preset's values are the defaults that every other flag overrides::

    python experiments/train_ppo.py                              # the shapes recipe (the default preset)
    python experiments/train_ppo.py --preset shapes --lr 3e-4    # the same with one value changed
    python experiments/train_ppo.py --preset flux-dev            # real FLUX.1-dev on a GPU

The shapes presets are measured: the README's results table and docs/results.md give what each reaches, over
three seeds, with the command. The flux-dev presets carry the shapes recipe's algorithmic settings over to
FLUX.1-dev at 512 px with an open_clip CLIP score; they have not been run on real weights (docs/scaling.md says
what they cost). The pieces every flux-dev preset shares are defined here once.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

from fluxguide.harness.config import (
    BackboneConfig,
    ConfigError,
    PolicyConfig,
    RewardConfig,
    RunConfig,
    TrainConfig,
)

C = TypeVar("C")
Presets = Mapping[str, Callable[[], C]]

#: The flux-dev presets' base model: FLUX.1-dev from the hub (gated: accept its licence and log in) or a local
#: diffusers folder given with --model-path; 512 px keeps the full reward-gradient backward on one 80 GB card.
FLUX_DEV_MODEL = {"backbone": "flux", "model_path": "black-forest-labs/FLUX.1-dev", "height": 512, "width": 512}
#: The flux-dev presets' reward: OpenAI's CLIP ViT-L/14 through open_clip (downloaded on first use).
FLUX_DEV_REWARD = {"reward": "clip",
                   "reward_kwargs": json.dumps({"model_name": "ViT-L-14-quickgelu", "pretrained": "openai"}),
                   "train_prompts": "animals-train"}
#: FLUX.1-dev's usual step count.
FLUX_DEV_STEPS = 28


#: Where ``train_bc.py`` run with its defaults writes the CFG-distilled policy the ``shapes-distilled`` presets start from.
DISTILLED_POLICY = Path("runs/bc/cfg_distillation/guidance.safetensors")


def distilled_start(guide: PolicyConfig, policy: Path = DISTILLED_POLICY) -> PolicyConfig:
    """``guide`` started from the CFG-distilled attention network ``policy`` (default :data:`DISTILLED_POLICY`)
    under a fresh affine head, the head at --lr and the network at a tenth of it: RL from a distilled start
    (docs/results.md)."""
    return replace(guide, init_policy=policy, head="affine", body_lr_scale=0.1)


def few_step_policy(num_steps: int) -> Path:
    """Where ``train_bc.py`` writes the network distilled for a ``num_steps``-step sampler in the few-step recipe
    (``collect_data.py --coarse-steps K --out-dir runs/bc_data/K_step``, then ``train_bc.py --dataset
    runs/bc_data/K_step --run-dir runs/bc/K_step``): the start of ``train_reward_gradient.py --preset
    shapes-K-step``."""
    return Path(f"runs/bc/{num_steps}_step/guidance.safetensors")


def flux_dev_model() -> BackboneConfig:
    """The base model group of every flux-dev preset."""
    return BackboneConfig(**FLUX_DEV_MODEL)


def flux_dev_reward() -> RewardConfig:
    """The reward group of the flux-dev presets (CLIP score on the animal prompts)."""
    return RewardConfig(**FLUX_DEV_REWARD)


def flux_dev_run(**overrides: Any) -> RunConfig:
    """The run group of a flux-dev preset: CUDA, held-out animal prompts, a few images per evaluation."""
    values: dict[str, Any] = {"device": "cuda", "eval_prompts": "animals-heldout", "eval_samples_per_prompt": 2,
                              "grid_prompts": 4}
    values.update(overrides)
    return RunConfig(**values)


def flux_dev_preset(config: Callable[..., C], folder: str, group: str, *, batch_size: int, lr: float,
                    **fields: Any) -> C:
    """A training script's flux-dev preset: ``config(...)`` with the flux-dev run (``runs/<folder>/flux-dev``, 400
    updates evaluated and checkpointed every 50, W&B group ``group``), base model, reward and step count, the
    optimizer's ``batch_size`` and ``lr``, and the script's own ``fields``."""
    run = flux_dev_run(preset="flux-dev", run_dir=Path("runs") / folder / "flux-dev", total_updates=400, eval_every=50,
                       checkpoint_every=50, wandb_group=group)
    return config(run=run, model=flux_dev_model(), reward=flux_dev_reward(),
                  optim=TrainConfig(batch_size=batch_size, lr=lr, num_steps=FLUX_DEV_STEPS), **fields)


def preset_name(args: Sequence[str], presets: Presets) -> str:
    """The preset ``args`` ask for (``--preset NAME`` or ``--preset=NAME``; the first preset if none).

    Raises:
        ConfigError: an unknown name or a ``--preset`` without one (the message lists the presets).
    """
    names = list(presets)
    chosen = names[0]
    for i, arg in enumerate(args):
        if arg == "--preset":
            if i + 1 >= len(args) or args[i + 1].startswith("--"):
                raise ConfigError(f"--preset needs a name: one of {', '.join(names)}")
            chosen = args[i + 1]
        elif arg.startswith("--preset="):
            chosen = arg.split("=", 1)[1]
    if chosen not in presets:
        raise ConfigError(f"--preset {chosen!r} is not a preset of this script: choose one of {', '.join(names)} "
                          "(each is the best known recipe for its backbone; other flags override its values)")
    return chosen


def preset_help(presets: Presets) -> str:
    """One line per preset for ``--help``: its name and the backbone / reward / policy it sets."""
    lines = []
    for name, make in presets.items():
        cfg = make()
        bits = [f"{k} {v}" for k, v in _summary(cfg).items()]
        lines.append(f"  {name}: {', '.join(bits)}")
    head = "presets (--preset NAME; the first is the default, other flags override its values):"
    return "\n".join([head, *lines])


def _summary(cfg: Any) -> dict[str, Any]:
    """The few values that tell presets apart (backbone, reward, policy), read from the config's groups."""
    out: dict[str, Any] = {}
    for group, keys in (("model", ("backbone",)), ("reward", ("reward",)), ("guide", ("policy",))):
        part = getattr(cfg, group, None)
        for key in keys:
            if part is not None and hasattr(part, key):
                out[key] = getattr(part, key)
    return out
