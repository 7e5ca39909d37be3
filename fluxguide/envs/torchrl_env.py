"""The guidance MDP as a native TorchRL environment: ``batch_size=[B]``, every tensor on the env's device.

One ``_step`` is one batched model call for all ``B`` trajectories; nothing goes through numpy and nothing
is copied to the host except the one-element NaN check of the action.
"""

from __future__ import annotations

from typing import Any

import torch
from tensordict import TensorDict, TensorDictBase, set_lazy_legacy
from torchrl.data import Bounded, Categorical, Composite, Unbounded
from torchrl.envs import EnvBase

from fluxguide import keys
from fluxguide.backbones.base import Backbone
from fluxguide.envs.core import GuidanceCore
from fluxguide.envs.make import make_core
from fluxguide.envs.specs import observation_spec


class GuidanceTorchRLEnv(EnvBase):
    """Learned guidance of a rectified-flow sampler as a batched TorchRL environment.

    ## Description
    An episode is one sampling trajectory of ``num_steps`` Euler (or SDE) steps for ``B`` prompts at once.
    At every step the policy sees the current latent and the base model's prediction and returns a
    correction; the sampler steps with ``pred + guidance_scale * action``. See
    :class:`fluxguide.envs.GuidanceCore` for the dynamics and every argument.

    ## Observation Space
    A ``Composite`` of batch shape ``[B]``: ``img`` and ``pred`` ``(B, seq, C)`` float32, ``txt``
    ``(B, L, D_txt)`` and ``vec`` ``(B, D_vec)`` (the backbone's dtype), ``t`` ``(B, 1)`` float32 in [0, 1]
    (1 = noise) and ``step`` ``(B, 1)`` int64 in [0, num_steps]; in SDE mode also ``sde_std`` ``(B, 1)``,
    the std a Gaussian policy must use for the process to be the marginal-preserving SDE. The unbounded
    entries use :class:`fluxguide.envs.specs.LeanUnbounded`, whose bounds allocate nothing.

    ``txt`` and ``vec`` are the *same tensor objects* at every step of an episode, so a
    ``rollout(..., return_contiguous=False)`` (a lazy stack of the step tensordicts) holds them once per
    episode, not once per step. This is the recommended way to collect long trajectories of large text
    features (Flux's ``txt`` is 512 x 4096 per sample); a contiguous rollout or a collector's buffer copies
    them at every step.

    ## Action Space
    ``Bounded(-max_action, max_action)`` of shape ``(B, seq, C)`` float32; actions outside are clipped.
    NaN/inf entries, another shape or a non-floating dtype raise.

    ## Rewards
    ``reward`` ``(B, 1)``: 0 at every step but the last (minus the optional control / KL cost); at the last
    step the reward module on the decoded final images. The episode's prompts, reward components and
    verifier result are in :attr:`last_info` (until the next reset) and :attr:`terminal_info` (until the
    next episode ends: a collector resets right after the last step); the final images in
    :attr:`final_images`.

    ## Episode End
    ``terminated`` (and ``done``) at step ``num_steps``, for all ``B`` trajectories together; ``truncated``
    is never set. Stepping a finished episode without a reset raises.

    ## Arguments
    ``backbone`` (default: the pretrained shapes world on ``device``), ``reward``, ``prompts`` and every
    keyword of :class:`fluxguide.envs.GuidanceCore` (``batch_size``, ``num_steps``, ``guidance_scale``,
    ``max_action``, ``mode``, ``noise_level``, ``sde_window``, ``control_cost``, ``cfg_scale``,
    ``samples_per_prompt``, ``reward_kwargs``, ``verify``); or ``core=`` an existing core. With ``control_cost`` in SDE mode the KL
    uses the policy's mean from the tensordict's ``loc`` entry when present.

    Example:
        >>> env = GuidanceTorchRLEnv(batch_size=8, num_steps=20)
        >>> env.set_seed(0)
        >>> rollout = env.rollout(20, policy, return_contiguous=False)
    """

    def __init__(
        self,
        backbone: Backbone | None = None,
        *,
        core: GuidanceCore | None = None,
        device: torch.device | str | None = None,
        **core_kwargs: Any,
    ) -> None:
        self.core = make_core(backbone, core=core, device=device, **core_kwargs)
        c = self.core
        super().__init__(device=c.device, batch_size=torch.Size([c.batch_size]))
        b = c.batch_size
        self.observation_spec = observation_spec(
            b, c.latent_shape, c.txt_shape, c.vec_shape, c.cond_dtype, c.num_steps, c.device, c.mode == "sde"
        )
        self.action_spec = Bounded(
            -c.max_action, c.max_action, shape=(b, *c.latent_shape), device=c.device, dtype=torch.float32
        )
        self.reward_spec = Unbounded(shape=(b, 1), device=c.device, dtype=torch.float32)
        self.full_done_spec = Composite(
            {
                name: Categorical(2, shape=(b, 1), device=c.device, dtype=torch.bool)
                for name in ("done", "terminated", "truncated")
            },
            shape=(b,),
            device=c.device,
        )
        self.last_info: dict[str, Any] = {}
        self.terminal_info: dict[str, Any] = {}
        self._false = torch.zeros((b, 1), dtype=torch.bool, device=c.device)

    @property
    def final_images(self) -> torch.Tensor | None:
        """The decoded final images ``(B, 3, H, W)`` of the last finished episode."""
        return self.core.final_images

    @property
    def prompts(self) -> list[str]:
        """The current episode's prompts."""
        return self.core.prompts

    def rollout(self, *args: Any, **kwargs: Any) -> TensorDictBase:
        """TorchRL's :meth:`~torchrl.envs.EnvBase.rollout`; ``return_contiguous=False`` gives a lazy stack.

        TorchRL documents ``return_contiguous=False`` as returning a ``LazyStackedTensorDict``, but
        torchrl 0.14 stacks densely whenever the steps have the same keys and shapes (``maybe_dense_stack``),
        copying ``txt`` and ``vec`` once per step. Here the steps are stacked lazily, as documented, so the
        per-step entries keep sharing the episode's single ``txt`` / ``vec`` tensors.
        """
        if kwargs.get("return_contiguous", True) is False:
            with set_lazy_legacy(True):
                return super().rollout(*args, **kwargs)
        return super().rollout(*args, **kwargs)

    def to(self, dest: torch.device | str | torch.dtype) -> GuidanceTorchRLEnv:
        """The env runs where its backbone is: moving it elsewhere is refused (move the backbone instead)."""
        if isinstance(dest, torch.dtype):
            raise TypeError("the env's dtypes are fixed (float32 sampler math); cast the backbone instead")
        dest = torch.device(dest)
        if dest.type != self.device.type or (dest.index is not None and dest.index != self.device.index):
            raise ValueError(
                f"cannot move a guidance env from {self.device} to {dest}: build it over a backbone on {dest} "
                f"(backbone.to({str(dest)!r}))"
            )
        return self

    def _set_seed(self, seed: int | None) -> None:
        self.core.seed(seed)

    def _reset(self, tensordict: TensorDictBase | None = None, **kwargs: Any) -> TensorDictBase:
        if tensordict is not None and "_reset" in tensordict:
            mask = tensordict.get("_reset")
            if not bool(mask.all()):
                raise RuntimeError(
                    f"partial reset of {int(mask.sum())} of {mask.numel()} trajectories: all trajectories of "
                    "a guidance env end at the same step, so reset them all together"
                )
        obs, info = self.core.reset()
        self.last_info = info
        return self._output(obs, False)

    def _step(self, tensordict: TensorDictBase) -> TensorDictBase:
        loc = None
        if self.core.mode == "sde" and self.core.control_cost > 0:
            loc = tensordict.get(keys.LOC, None)
        result = self.core.step(tensordict.get(keys.ACTION), loc=loc)
        out = self._output(result.observation, result.terminated)
        out.set("reward", result.reward.unsqueeze(-1))
        if result.terminated:
            self.last_info = self.terminal_info = result.info
        return out

    def _output(self, obs: dict[str, torch.Tensor], terminated: bool) -> TensorDictBase:
        done = torch.full_like(self._false, terminated)
        out = TensorDict(obs, batch_size=self.batch_size, device=self.device)
        out.set("done", done)
        out.set("terminated", done.clone())
        out.set("truncated", self._false.clone())
        return out
