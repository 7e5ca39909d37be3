"""The guidance MDP as a native batched Gymnasium ``VectorEnv``: one model call per step for all envs.

The ``num_envs`` sub-environments are the ``B`` trajectories of one :class:`GuidanceCore`; they start and
end together, so every autoreset resets all of them at once. Autoreset follows Gymnasium 1.x
(``gymnasium.vector.AutoresetMode``):

* ``NEXT_STEP`` (default, as ``SyncVectorEnv``): the step that ends the episode returns the terminal
  observation; the next ``step`` call ignores its actions, resets and returns the first observation with
  reward 0 and ``terminated = truncated = False``.
* ``SAME_STEP``: the ending step resets at once and returns the new first observation; the terminal
  observation and info are in ``infos["final_obs"]`` (an object array of per-env dicts) and
  ``infos["final_info"]``.
* ``DISABLED``: the caller resets; stepping a finished episode raises.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch
from gymnasium.vector import AutoresetMode, VectorEnv

from fluxguide.backbones.base import Backbone
from fluxguide.envs.core import GuidanceCore
from fluxguide.envs.make import make_core
from fluxguide.envs.spaces import action_space, observation_space, observation_to_numpy, to_numpy


def _with_masks(values: dict[str, Any], n: int) -> dict[str, Any]:
    """Gymnasium's vector info layout: every key ``k`` gets a boolean mask ``_k`` (all envs have it)."""
    out: dict[str, Any] = {}
    for k, v in values.items():
        out[k] = _with_masks(v, n) if isinstance(v, dict) else v
        out[f"_{k}"] = np.ones(n, dtype=bool)
    return out


class GuidanceVectorEnv(VectorEnv):
    """``num_envs`` guidance trajectories as a Gymnasium ``VectorEnv`` (numpy arrays, batched spaces).

    The sub-env is :class:`fluxguide.envs.GuidanceEnv` (same observation / action spaces, rewards and
    episode end, see its docstring); here every array has a leading ``num_envs`` axis and one model call
    serves all of them. ``samples_per_prompt = k`` makes groups of ``k`` consecutive envs share a prompt.

    Args:
        num_envs: number of trajectories ``B``.
        backbone, reward, prompts, device: as :class:`fluxguide.envs.GuidanceEnv`.
        core: an existing :class:`fluxguide.envs.GuidanceCore` with ``batch_size == num_envs`` instead.
        autoreset_mode: a ``gymnasium.vector.AutoresetMode`` (or its value string).
        **core_kwargs: the other :class:`fluxguide.envs.GuidanceCore` keywords.

    ``reset(seed=s)`` takes one integer for the whole batch (the trajectories draw from one generator);
    ``reset(options={"prompts": [...]})`` fixes the prompts (one per group).
    """

    metadata: ClassVar[dict[str, Any]] = {"autoreset_mode": AutoresetMode.NEXT_STEP, "render_modes": []}

    def __init__(
        self,
        num_envs: int = 1,
        backbone: Backbone | None = None,
        *,
        core: GuidanceCore | None = None,
        device: torch.device | str | None = None,
        autoreset_mode: AutoresetMode | str = AutoresetMode.NEXT_STEP,
        **core_kwargs: Any,
    ) -> None:
        if core is None:
            if "batch_size" in core_kwargs and core_kwargs["batch_size"] != num_envs:
                raise ValueError(f"pass num_envs, not batch_size (got num_envs={num_envs}, batch_size={core_kwargs['batch_size']})")
            core_kwargs["batch_size"] = num_envs
        elif num_envs not in (1, core.batch_size):
            raise ValueError(f"num_envs={num_envs} but the core has batch_size={core.batch_size}")
        self.core = make_core(backbone, core=core, device=device, **core_kwargs)
        try:
            mode = AutoresetMode(autoreset_mode)
        except ValueError as e:
            raise ValueError(
                f"autoreset_mode must be one of {[m.value for m in AutoresetMode]}, got {autoreset_mode!r}"
            ) from e
        self.metadata = {**self.metadata, "autoreset_mode": mode}
        self.autoreset_mode = mode
        c = self.core
        self.num_envs = c.batch_size
        sde = c.mode == "sde"
        self.single_observation_space = observation_space(c.latent_shape, c.txt_shape, c.vec_shape, c.num_steps, sde)
        self.observation_space = observation_space(c.latent_shape, c.txt_shape, c.vec_shape, c.num_steps, sde, batch=c.batch_size)
        self.single_action_space = action_space(c.latent_shape, c.max_action)
        self.action_space = action_space(c.latent_shape, c.max_action, batch=c.batch_size)
        self._autoreset = False

    def reset(
        self, *, seed: int | list[int | None] | None = None, options: dict[str, Any] | None = None
    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        if isinstance(seed, (list, tuple)):
            raise TypeError(
                f"GuidanceVectorEnv takes one integer seed for the whole batch (its trajectories share one "
                f"generator), got a list of {len(seed)} seeds"
            )
        options = dict(options or {})
        mask = options.pop("reset_mask", None)
        if mask is not None and not np.all(mask):
            raise ValueError(
                f"reset_mask resets {int(np.sum(mask))} of {self.num_envs} envs: all trajectories end at the "
                "same step, so reset them all together"
            )
        super().reset(seed=seed)
        obs, info = self.core.reset(seed=seed, prompts=options.pop("prompts", None))
        if options:
            raise ValueError(f"unknown reset options {sorted(options)}; valid: 'prompts', 'reset_mask'")
        self._autoreset = False
        return observation_to_numpy(obs), self._step_info(info["prompts"])

    def _step_info(self, prompts: list[str]) -> dict[str, Any]:
        return _with_masks({"prompt": np.array(prompts, dtype=object)}, self.num_envs)

    def _end_info(self, info: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {"prompt": np.array(info["prompts"], dtype=object)}
        for key in ("terminal_reward", "control_cost"):
            if key in info:
                out[key] = to_numpy(info[key]).astype(np.float64)
        for group in ("reward_components", "verifier"):
            if group in info:
                out[group] = {k: to_numpy(v) for k, v in info[group].items()}
        if "final_images" in info:
            out["final_image"] = to_numpy(info["final_images"])
        return _with_masks(out, self.num_envs)

    def step(
        self, actions: np.ndarray
    ) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
        n = self.num_envs
        if self._autoreset:  # NEXT_STEP: this call only resets (its actions are ignored)
            obs, infos = self.reset()
            return obs, np.zeros(n), np.zeros(n, dtype=bool), np.zeros(n, dtype=bool), infos
        if not isinstance(actions, (np.ndarray, torch.Tensor)):
            raise TypeError(f"actions must be a numpy array of shape {self.action_space.shape}, got {type(actions).__name__}")
        result = self.core.step(actions)
        rewards = to_numpy(result.reward).astype(np.float64)
        terminations = np.full(n, result.terminated)
        truncations = np.zeros(n, dtype=bool)
        if not result.terminated:
            return observation_to_numpy(result.observation), rewards, terminations, truncations, self._step_info(
                result.info["prompts"]
            )
        obs = observation_to_numpy(result.observation)
        infos = self._end_info(result.info)
        if self.autoreset_mode == AutoresetMode.NEXT_STEP:
            self._autoreset = True
        elif self.autoreset_mode == AutoresetMode.SAME_STEP:
            final_obs = np.empty(n, dtype=object)
            final_obs[:] = [{k: v[i] for k, v in obs.items()} for i in range(n)]
            final_info = infos
            obs, infos = self.reset()
            infos.update({"final_obs": final_obs, "_final_obs": np.ones(n, dtype=bool)})
            infos.update({"final_info": final_info, "_final_info": np.ones(n, dtype=bool)})
        return obs, rewards, terminations, truncations, infos
