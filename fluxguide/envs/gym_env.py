"""The guidance MDP as a standard Gymnasium environment (one trajectory, numpy observations)."""

from __future__ import annotations

from typing import Any, ClassVar, SupportsFloat

import gymnasium as gym
import numpy as np
import torch

from fluxguide.backbones.base import Backbone
from fluxguide.envs.core import GuidanceCore
from fluxguide.envs.make import make_core
from fluxguide.envs.spaces import action_space, observation_space, observation_to_numpy, to_numpy


def _scalar(x: torch.Tensor) -> float | bool:
    return bool(x) if x.dtype == torch.bool else float(x)


def episode_info_item(info: dict[str, Any], index: int) -> dict[str, Any]:
    """The core's end-of-episode ``info`` for trajectory ``index``, as Python scalars and numpy arrays."""
    out: dict[str, Any] = {}
    if "terminal_reward" in info:
        out["terminal_reward"] = float(info["terminal_reward"][index])
    if "control_cost" in info:
        out["control_cost"] = float(info["control_cost"][index])
    for group in ("reward_components", "verifier"):
        if group in info:
            out[group] = {k: _scalar(v[index]) for k, v in info[group].items()}
    if "final_images" in info:
        out["final_image"] = to_numpy(info["final_images"][index])
    return out


class GuidanceEnv(gym.Env):
    """Learned guidance of a rectified-flow sampler (Flux, or the embedded shapes world) as a Gymnasium env.

    ## Description
    An episode is one sampling trajectory of ``num_steps`` steps from Gaussian noise (``t = 1``) to an image
    (``t = 0``) for one prompt. At every step the agent sees the current latent and the base model's
    velocity prediction and returns a correction; the sampler steps with ``pred + guidance_scale * action``
    (Euler in ``"ode"`` mode, the marginal-preserving drift in ``"sde"`` mode). The dynamics, every argument
    and the control cost's units are documented on :class:`fluxguide.envs.GuidanceCore`; the batched faces
    are :class:`fluxguide.envs.GuidanceVectorEnv` and :class:`fluxguide.envs.GuidanceTorchRLEnv`.

    ## Observation Space
    A ``Dict`` of float32 numpy arrays (int64 for ``step``):

    | key       | shape          | meaning                                                       |
    |-----------|----------------|---------------------------------------------------------------|
    | ``img``   | ``(seq, C)``   | current packed latent (shapes world: ``(64, 48)``)            |
    | ``pred``  | ``(seq, C)``   | the base model's velocity prediction at ``img``, ``t``        |
    | ``txt``   | ``(L, D_txt)`` | text token features of the prompt                             |
    | ``vec``   | ``(D_vec,)``   | pooled text embedding                                         |
    | ``t``     | ``(1,)``       | time in [0, 1], 1 = noise                                     |
    | ``step``  | ``(1,)``       | step index in [0, num_steps]                                  |
    | ``sde_std`` | ``(1,)``     | SDE mode only: the Gaussian policy std that makes it the SDE  |

    The terminal observation has ``t = 0``, ``step = num_steps`` and ``pred = 0`` (there is no next step).

    ## Action Space
    ``Box(-max_action, max_action, (seq, C), float32)``: the guidance correction, shaped like ``pred``.
    Out-of-range actions are clipped; NaN/inf, another shape or a non-floating dtype raise.

    ## Rewards
    0 at every step but the last, minus the optional control cost (``control_cost``: ``beta mean(a^2)`` in
    ODE mode, ``beta`` times the step's KL to the base sampler in nats in SDE mode). At the last step, the
    reward (default: the backbone's :meth:`~fluxguide.backbones.Backbone.default_reward`, ``"shapes-clip"`` in the
    shapes world) on the decoded final image, minus that step's cost.

    ## Starting State
    ``reset(seed=...)`` seeds the env's generator, draws a prompt from ``prompts`` and the initial noise
    from it, and runs the base model at ``t = 1``. ``reset(options={"prompt": "a red circle"})`` fixes
    the prompt. After reset the step is deterministic given the action.

    ## Episode End
    ``terminated`` after ``num_steps`` steps (default: the backbone's, 20 for the shapes world); never
    truncated, so no ``TimeLimit`` is needed. ``info`` holds ``prompt`` at every step and, at the end,
    ``terminal_reward``, ``control_cost``, ``reward_components`` (if the reward has parts), ``verifier``
    (shapes world: pass / per-attribute scores) and ``final_image`` ``(3, H, W)`` in [0, 1].

    ## Arguments
    ``backbone`` (default: the pretrained shapes world on ``device``), ``reward``, ``prompts``,
    ``render_mode`` (``"rgb_array"``: the decoded current latent as ``uint8 (H, W, 3)``), and the keywords
    of :class:`fluxguide.envs.GuidanceCore` except ``batch_size`` (1 here): ``num_steps``, ``guidance_scale``,
    ``max_action``, ``mode``, ``noise_level``, ``sde_window``, ``control_cost``, ``cfg_scale``, ``reward_kwargs``,
    ``verify``.

    ```python
    import gymnasium, fluxguide.envs
    env = gymnasium.make("fluxguide/Shapes-v0", num_steps=20, mode="sde")
    obs, info = env.reset(seed=0)
    ```
    """

    metadata: ClassVar[dict[str, Any]] = {"render_modes": ["rgb_array"], "render_fps": 4}

    def __init__(
        self,
        backbone: Backbone | None = None,
        *,
        core: GuidanceCore | None = None,
        device: torch.device | str | None = None,
        render_mode: str | None = None,
        **core_kwargs: Any,
    ) -> None:
        if core is None and core_kwargs.setdefault("batch_size", 1) != 1:
            raise ValueError(
                f"GuidanceEnv runs one trajectory (batch_size=1), got batch_size={core_kwargs['batch_size']}: "
                "use GuidanceVectorEnv or GuidanceTorchRLEnv for batches"
            )
        self.core = make_core(backbone, core=core, device=device, **core_kwargs)
        if self.core.batch_size != 1 or self.core.samples_per_prompt != 1:
            raise ValueError(
                f"GuidanceEnv needs a core with batch_size=1 and samples_per_prompt=1, got "
                f"{self.core.batch_size} and {self.core.samples_per_prompt}"
            )
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"render_mode must be None or one of {self.metadata['render_modes']}, got {render_mode!r}")
        self.render_mode = render_mode
        c = self.core
        self.observation_space = observation_space(c.latent_shape, c.txt_shape, c.vec_shape, c.num_steps, c.mode == "sde")
        self.action_space = action_space(c.latent_shape, c.max_action)

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        super().reset(seed=seed)
        options = dict(options or {})
        prompt = options.pop("prompt", None)
        if options:
            raise ValueError(f"unknown reset options {sorted(options)}; valid: 'prompt'")
        obs, _ = self.core.reset(seed=seed, prompts=None if prompt is None else [prompt])
        return observation_to_numpy(obs, 0), {"prompt": self.core.prompts[0]}

    def step(self, action: np.ndarray) -> tuple[dict[str, np.ndarray], SupportsFloat, bool, bool, dict[str, Any]]:
        if not isinstance(action, (np.ndarray, torch.Tensor)):
            raise TypeError(f"action must be a numpy array of shape {self.action_space.shape}, got {type(action).__name__}")
        if tuple(action.shape) != self.action_space.shape:
            raise ValueError(
                f"action has shape {tuple(action.shape)}, expected {self.action_space.shape} (seq, C): shaped like pred"
            )
        result = self.core.step(action[None])
        info = {"prompt": self.core.prompts[0]}
        if result.terminated:
            info.update(episode_info_item(result.info, 0))
        return observation_to_numpy(result.observation, 0), float(result.reward[0]), result.terminated, False, info

    def render(self) -> np.ndarray | None:
        if self.render_mode is None or self.core.img is None:
            return None
        with torch.no_grad():
            image = self.core.backbone.decode(self.core.img[:1])[0]
        return (to_numpy(image).transpose(1, 2, 0) * 255).round().astype(np.uint8)
