"""Registered ids: ``fluxguide/Shapes-v0`` and ``fluxguide/Flux-v0``, for ``gymnasium.make``, ``make_vec`` and TorchRL.

Importing :mod:`fluxguide.envs` registers them. Every keyword given to ``gymnasium.make`` is forwarded to the
factory below, and from there to :class:`fluxguide.envs.GuidanceCore`::

    import gymnasium, fluxguide.envs
    env = gymnasium.make("fluxguide/Shapes-v0", num_steps=10, mode="sde")            # GuidanceEnv
    envs = gymnasium.make_vec("fluxguide/Shapes-v0", num_envs=32)                      # GuidanceVectorEnv
    flux = gymnasium.make("fluxguide/Flux-v0", model_path="/models/FLUX.1-dev", prompts="prompts.txt")

``gymnasium.make("fluxguide.envs:fluxguide/Shapes-v0")`` imports the module itself. Gymnasium's wrappers
deep-copy ``env.spec`` (keywords included) whenever ``env.spec`` is read, so pass a large ``backbone=`` to the
classes (:class:`GuidanceEnv`, ...) rather than through ``gymnasium.make``. TorchRL:
``GymEnv("fluxguide/Shapes-v0")`` wraps the numpy env (batch 1); :func:`make_torchrl_env` builds the native
batched TorchRL env from the same id and keywords.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from functools import partial
from typing import Any

import gymnasium as gym
import torch
from gymnasium.vector import AutoresetMode

from fluxguide.backbones.base import Backbone
from fluxguide.envs.core import GuidanceCore
from fluxguide.envs.gym_env import GuidanceEnv
from fluxguide.envs.make import make_core
from fluxguide.envs.torchrl_env import GuidanceTorchRLEnv
from fluxguide.envs.vector_env import GuidanceVectorEnv

SHAPES_ID = "fluxguide/Shapes-v0"
FLUX_ID = "fluxguide/Flux-v0"


def shapes_core(
    backbone: Backbone | None = None,
    *,
    weights_dir: str | os.PathLike[str] | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    **core_kwargs: Any,
) -> GuidanceCore:
    """A core over the shapes world: the pretrained one (from ``weights_dir``, default the shipped weights,
    on ``device`` in ``dtype``) unless ``backbone`` is given. Reward default ``"shapes-clip"``, prompts
    ``"shapes-train"``."""
    if backbone is None:
        from fluxguide.backbones.registry import build_backbone

        backbone = build_backbone("shapes", weights_dir=weights_dir, device=device or "cpu", dtype=dtype)
    elif weights_dir is not None or dtype is not None:
        raise ValueError("weights_dir= and dtype= load the default shapes world; they cannot apply to a given backbone")
    return make_core(backbone, device=device, **core_kwargs)


def flux_core(
    model_path: str | os.PathLike[str] | None = None,
    *,
    prompts: Any = None,
    reward: Any = None,
    **kwargs: Any,
) -> GuidanceCore:
    """A core over Flux loaded with :meth:`fluxguide.backbones.FluxBackbone.from_pretrained`.

    Args:
        model_path: a diffusers FluxPipeline folder (or a hub id where the machine has access). Required.
        prompts: list or text file of prompts. Required (Flux has no built-in prompt set).
        reward: default: the backbone's, ``"clip"`` (open_clip ViT-L-14 / openai, loaded on the backbone's device;
            ``reward_kwargs=`` names other weights).
        **kwargs: the options of ``FluxBackbone.from_pretrained`` (``height``, ``width``, ``device``, ``dtype``,
            ``max_sequence_length``, ``guidance``, ``local_files_only``, ...; Flux-v0 defaults to FLUX.1-dev's
            3.5) and the other :class:`GuidanceCore` keywords (``num_steps`` is the core's).
    """
    if model_path is None:
        raise ValueError(
            f"{FLUX_ID} needs model_path= (a diffusers FluxPipeline folder, e.g. FLUX.1-dev saved with "
            "FluxPipeline.save_pretrained, or a hub id)"
        )
    if prompts is None:
        raise ValueError(f"{FLUX_ID} needs prompts= (a list of prompts or a text file with one prompt per line)")
    from fluxguide.backbones.flux import FluxBackbone

    loading = set(inspect.signature(FluxBackbone.from_pretrained).parameters) - {"path_or_hub_id", "num_steps"}
    backbone = FluxBackbone.from_pretrained(model_path, **{k: kwargs.pop(k) for k in loading & set(kwargs)})
    return make_core(backbone, reward=reward, prompts=prompts, **kwargs)


CORE_BUILDERS: dict[str, Callable[..., GuidanceCore]] = {SHAPES_ID: shapes_core, FLUX_ID: flux_core}


def make_env(build_core: Callable[..., GuidanceCore], render_mode: str | None = None, **kwargs: Any) -> GuidanceEnv:
    """A registered id's ``gymnasium.make`` entry point: a :class:`GuidanceEnv` over ``build_core(**kwargs)``."""
    return GuidanceEnv(core=build_core(**kwargs), render_mode=render_mode)


def make_vector_env(
    build_core: Callable[..., GuidanceCore], num_envs: int = 1,
    autoreset_mode: AutoresetMode | str = AutoresetMode.NEXT_STEP, **kwargs: Any,
) -> GuidanceVectorEnv:
    """A registered id's ``gymnasium.make_vec`` entry point: a native :class:`GuidanceVectorEnv` over
    ``build_core(batch_size=num_envs, **kwargs)``."""
    return GuidanceVectorEnv(num_envs, core=build_core(batch_size=num_envs, **kwargs), autoreset_mode=autoreset_mode)


# The entry points Gymnasium loads by name, one pair per id.
make_shapes_env = partial(make_env, shapes_core)
make_shapes_vector_env = partial(make_vector_env, shapes_core)
make_flux_env = partial(make_env, flux_core)
make_flux_vector_env = partial(make_vector_env, flux_core)


def make_torchrl_env(env_id: str = SHAPES_ID, **kwargs: Any) -> GuidanceTorchRLEnv:
    """The native batched TorchRL env of a registered id (``batch_size=`` and the id's keywords)."""
    if env_id not in CORE_BUILDERS:
        raise ValueError(f"unknown fluxguide env id {env_id!r}; valid ids: {sorted(CORE_BUILDERS)}")
    return GuidanceTorchRLEnv(core=CORE_BUILDERS[env_id](**kwargs))


def register_envs() -> None:
    """Register the ids with Gymnasium (idempotent)."""
    module = __name__
    for env_id, single, vector in (
        (SHAPES_ID, "make_shapes_env", "make_shapes_vector_env"),
        (FLUX_ID, "make_flux_env", "make_flux_vector_env"),
    ):
        if env_id not in gym.registry:
            gym.register(id=env_id, entry_point=f"{module}:{single}", vector_entry_point=f"{module}:{vector}")
