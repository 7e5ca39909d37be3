"""The denoising trajectory as an RL environment (docs/design.md, "envs").

One batched torch core (:class:`GuidanceCore`) and three faces over it: a Gymnasium ``Env``
(:class:`GuidanceEnv`, numpy, one trajectory), a native batched Gymnasium ``VectorEnv``
(:class:`GuidanceVectorEnv`) and a native TorchRL ``EnvBase`` (:class:`GuidanceTorchRLEnv`, ``batch_size=[B]``,
tensors on the env's device). Importing this package registers ``fluxguide/Shapes-v0`` and
``fluxguide/Flux-v0`` with Gymnasium.

Memory of per-episode constants: the TorchRL env returns the same ``txt`` / ``vec`` tensors at every step
of an episode, and ``GuidanceTorchRLEnv.rollout(n, policy, return_contiguous=False)`` stacks the steps
lazily, so a trajectory holds them once (and each observation once: a step's ``next`` observation is the
following step's observation). That is the recommended way to collect trajectories with large text features
(Flux's ``txt`` is 512 x 4096 per sample). A contiguous rollout, a collector's batch or a replay buffer
copies them per step. The numpy faces copy them per step by Gymnasium's contract (every returned array is
new memory).
"""

from fluxguide.backbones.registry import build_reward  # the one reward builder, for env users
from fluxguide.envs.core import GuidanceCore, SDEWindowError, StepResult
from fluxguide.envs.gym_env import GuidanceEnv
from fluxguide.envs.make import make_core
from fluxguide.envs.prompts import PROMPT_SETS, PromptSource, register_prompt_set, resolve_prompts
from fluxguide.envs.registration import (
    FLUX_ID,
    SHAPES_ID,
    flux_core,
    make_torchrl_env,
    register_envs,
    shapes_core,
)
from fluxguide.envs.spaces import UnboundedBox
from fluxguide.envs.specs import LeanUnbounded
from fluxguide.envs.torchrl_env import GuidanceTorchRLEnv
from fluxguide.envs.vector_env import GuidanceVectorEnv

register_envs()

__all__ = [
    "FLUX_ID",
    "PROMPT_SETS",
    "SHAPES_ID",
    "GuidanceCore",
    "GuidanceEnv",
    "GuidanceTorchRLEnv",
    "GuidanceVectorEnv",
    "LeanUnbounded",
    "PromptSource",
    "SDEWindowError",
    "StepResult",
    "UnboundedBox",
    "build_reward",
    "flux_core",
    "make_core",
    "make_torchrl_env",
    "register_envs",
    "register_prompt_set",
    "resolve_prompts",
    "shapes_core",
]
