"""fluxguide: reinforcement learning for learned guidance of Flux (rectified-flow) image sampling.

The public API, imported lazily (PEP 562, :mod:`fluxguide.lazy`): ``import fluxguide`` loads nothing else (no
torch), and ``fluxguide.X`` imports the one module that defines ``X`` the first time it is used. Each name has one canonical home (the right
column of :data:`_EXPORTS`); this module and the seed's module paths (:mod:`fluxguide.guidance_models`,
:mod:`fluxguide.sampling_instrumented`) give the same object. The design of record is ``docs/design.md``.

The seed's names::

    from fluxguide import denoise, get_schedule, MLPGuidanceModel, GuidanceModelTrainer, GuidanceDataCollector

and what a user needs first::

    backbone = fluxguide.build_backbone("shapes")               # or "flux" with model_path=, or a spec
    reward = fluxguide.make_reward("clip", model_name=..., pretrained=...)
    policy = fluxguide.build_policy("attention", backbone)
    env = fluxguide.GuidanceEnv(backbone, reward=reward)        # Gymnasium; GuidanceTorchRLEnv for TorchRL
"""

from __future__ import annotations

from fluxguide.lazy import lazy_attributes

__version__ = "0.1.0"

#: Every public name and its canonical module.
_EXPORTS: dict[str, str] = {
    # the seed's names
    "denoise": "fluxguide.sampling",
    "get_schedule": "fluxguide.sampling",
    "apply_guidance_model": "fluxguide.sampling",
    "denoise_with_state_collection": "fluxguide.sampling",
    "BaseGuidanceModel": "fluxguide.policies",
    "MLPGuidanceModel": "fluxguide.policies",
    "AttentionGuidanceModel": "fluxguide.policies",
    "ConvGuidanceModel": "fluxguide.policies",
    "create_mlp_guidance_model": "fluxguide.policies",
    "MultiObjectiveGuidance": "fluxguide.policies",
    "StepSpecificGuidance": "fluxguide.policies",
    "GuidanceModelTrainer": "fluxguide.algos",
    "StateCollectionCallback": "fluxguide.data",
    "create_training_pairs": "fluxguide.data",
    "GuidanceDataCollector": "fluxguide.data",
    # what a user needs first
    "Backbone": "fluxguide.backbones",
    "FluxBackbone": "fluxguide.backbones",
    "build_backbone": "fluxguide.backbones.registry",
    "make_reward": "fluxguide.rewards",
    "register_reward": "fluxguide.rewards",
    "available_rewards": "fluxguide.rewards",
    "build_policy": "fluxguide.policies.registry",
    "load_guidance_model": "fluxguide.policies",
    "save_guidance_model": "fluxguide.policies",
    "guide_pipeline": "fluxguide.policies.flux_pipeline",
    "unguide_pipeline": "fluxguide.policies.flux_pipeline",
    "GuidanceCore": "fluxguide.envs",
    "GuidanceEnv": "fluxguide.envs",
    "GuidanceVectorEnv": "fluxguide.envs",
    "GuidanceTorchRLEnv": "fluxguide.envs",
    "PluginError": "fluxguide.plugins",
}

#: The subpackages and modules, reachable as attributes (``fluxguide.envs``) without importing them first.
_SUBMODULES = frozenset({
    "algos", "backbones", "checkpointing", "data", "distributed", "envs", "guidance_models", "harness",
    "keys", "lazy", "plugins", "policies", "provenance", "rewards", "sampling", "sampling_instrumented",
    "serialization", "worlds",
})

__all__ = [  # noqa: RUF022 - the seed's names first, then the rest, as in _EXPORTS
    "__version__",
    "denoise",
    "get_schedule",
    "apply_guidance_model",
    "denoise_with_state_collection",
    "BaseGuidanceModel",
    "MLPGuidanceModel",
    "AttentionGuidanceModel",
    "ConvGuidanceModel",
    "create_mlp_guidance_model",
    "MultiObjectiveGuidance",
    "StepSpecificGuidance",
    "GuidanceModelTrainer",
    "StateCollectionCallback",
    "create_training_pairs",
    "GuidanceDataCollector",
    "Backbone",
    "FluxBackbone",
    "build_backbone",
    "make_reward",
    "register_reward",
    "available_rewards",
    "build_policy",
    "load_guidance_model",
    "save_guidance_model",
    "guide_pipeline",
    "unguide_pipeline",
    "GuidanceCore",
    "GuidanceEnv",
    "GuidanceVectorEnv",
    "GuidanceTorchRLEnv",
    "PluginError",
]


__getattr__, __dir__ = lazy_attributes(__name__, _EXPORTS, _SUBMODULES)
