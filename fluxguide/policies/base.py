"""The guidance-model contract: observation in, correction shaped like ``pred`` out.

A guidance model maps the sampler state ``(img, pred, txt, vec, timestep, step_idx)`` to a correction that
the sampler adds to the base prediction (``pred_used = pred + scale * correction``, docs/design.md). Users
subclass :class:`BaseGuidanceModel` and implement ``forward``; :meth:`GuidanceNetwork.check_inputs` gives
them the shape checks with errors that name expected and actual shapes.

Every built-in model stores its constructor arguments in ``model.config`` so a checkpoint (weights plus
config) rebuilds it with :func:`build_guidance_model`; every subclass is recorded by class name in the one
registry of architectures (:mod:`fluxguide.policies.architectures`), and one that names itself in its class
statement (``class MyNet(BaseGuidanceModel, architecture="my-net")``) is also built by that name.
"""

from __future__ import annotations

import copy
import inspect
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import nn
from typing_extensions import Unpack

from fluxguide.policies.architectures import ARCHITECTURES

_Network = TypeVar("_Network", bound="GuidanceNetwork")

GuidanceArgs = tuple[
    torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | float, int | torch.Tensor
]
"""The guidance call's arguments ``(img, pred, txt, vec, timestep, step_idx)``, in order.

:meth:`GuidanceNetwork.forward` names and documents them once; what receives them from it, checks them or
passes them on (:meth:`GuidanceNetwork.respond`, :meth:`GuidanceNetwork.check_inputs`, a wrapper) takes
``*obs: Unpack[GuidanceArgs]`` rather than spelling the six parameters again.
"""


def as_grid(grid_size: int | tuple[int, int] | list[int] | None) -> tuple[int, int] | None:
    """Normalise a grid size argument (``n`` -> ``(n, n)``), checking it is positive."""
    if grid_size is None:
        return None
    if isinstance(grid_size, int):
        grid = (grid_size, grid_size)
    else:
        grid = tuple(int(g) for g in grid_size)
    if len(grid) != 2 or min(grid) < 1:
        raise ValueError(f"grid_size must be a positive int or a (rows, cols) pair, got {grid_size!r}")
    return grid  # type: ignore[return-value]


def check_positive(owner: str, **sizes: float) -> None:
    """Refuse a constructor size (a width, a count, a ratio) that is not positive; the error lists every size
    given, so a user sees the one at fault next to the others."""
    if min(sizes.values()) <= 0:
        listed = ", ".join(f"{name}={value}" for name, value in sizes.items())
        raise ValueError(f"{owner} sizes must be positive, got {listed}")


@dataclass
class GuidanceInputs:
    """Checked inputs: the timestep as a ``(B,)`` float tensor and the token grid ``(rows, cols)``."""

    timestep: torch.Tensor
    grid: tuple[int, int]


class GuidanceNetwork(nn.Module, ABC):
    """A network with the guidance call signature: a guidance model or a critic.

    It records its constructor arguments (:meth:`register_config`), so a checkpoint rebuilds it
    (:meth:`from_config`), and checks an observation against the sizes it expects (:meth:`check_inputs`). The
    class attributes say what it expects; ``None`` accepts anything.

    Attributes:
        latent_channels: channels ``C`` of packed latents ``(B, seq, C)``.
        grid_size: the latent token grid ``(rows, cols)``; ``None`` infers a square grid from ``seq``.
        txt_dim: width of the text token features.
        vec_dim: width of the pooled text embedding.
    """

    latent_channels: int | None = None
    grid_size: tuple[int, int] | None = None
    txt_dim: int | None = None
    vec_dim: int | None = None

    def register_config(self, **kwargs: Any) -> None:
        """Record constructor arguments (JSON-serialisable) so :meth:`from_config` can rebuild."""
        self._config = {"type": type(self).__name__, **copy.deepcopy(kwargs)}

    @property
    def config(self) -> dict[str, Any]:
        """The constructor arguments plus ``"type"`` (the class name); a copy."""
        return copy.deepcopy(getattr(self, "_config", {"type": type(self).__name__}))

    @classmethod
    def constructor_arguments(
        cls, config: dict[str, Any], build: Callable[[dict[str, Any]], BaseGuidanceModel]
    ) -> dict[str, Any]:
        """The constructor arguments ``config`` stands for: its entries but ``"type"``. A composite overrides it to
        rebuild its parts from their configs with ``build``."""
        return {k: v for k, v in config.items() if k != "type"}

    @classmethod
    def from_config(
        cls: type[_Network],
        config: dict[str, Any],
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> _Network:
        """Build the network described by ``config`` (as returned by :attr:`config`)."""
        kwargs = cls.constructor_arguments(config, lambda part: build_guidance_model(part, device, dtype))
        params = inspect.signature(cls.__init__).parameters
        for name, value in (("device", device), ("dtype", dtype)):
            if value is not None and name in params:
                kwargs[name] = value
        try:
            model = cls(**kwargs)
        except TypeError as e:
            raise TypeError(
                f"cannot rebuild {cls.__name__} from config {config}: {e}. A subclass must accept its config "
                f"entries as constructor arguments (call self.register_config(...) with them in __init__)"
            ) from e
        if device is not None and "device" not in params:
            model = model.to(device=device)
        if dtype is not None and "dtype" not in params:
            model = model.to(dtype=dtype)
        return model

    def forward(
        self,
        img: torch.Tensor,
        pred: torch.Tensor,
        txt: torch.Tensor,
        vec: torch.Tensor,
        timestep: torch.Tensor | float,
        step_idx: int | torch.Tensor,
    ) -> torch.Tensor:
        """Return the correction, shaped like ``pred`` ``(B, seq, C)`` (a critic: the value ``(B, 1)``).

        The one declaration of the guidance call, by position or by name. A user's model overrides it (the
        seed's way); the built-in networks and the composites inherit it and implement :meth:`respond`, which
        takes the same arguments in order (:data:`GuidanceArgs`), so they need not spell them again.

        Args:
            img: current latent ``(B, seq, C)``.
            pred: the base model's prediction ``(B, seq, C)``.
            txt: text token features ``(B, L, D_txt)``.
            vec: pooled text embedding ``(B, D_vec)``.
            timestep: time in [0, 1] (1 = noise), ``(B,)`` (a float or ``(B, 1)`` is accepted).
            step_idx: the step index, an int or a ``(B,)`` tensor.
        """
        return self.respond(img, pred, txt, vec, timestep, step_idx)

    def respond(self, *obs: Unpack[GuidanceArgs]) -> torch.Tensor:
        """The output for the guidance call's arguments ``obs``, in :meth:`forward`'s order: what a network that
        does not override :meth:`forward` implements."""
        # Like nn.Module's own missing forward, this fails on the call: a user's model overrides forward instead.
        raise NotImplementedError(
            f"{type(self).__name__} defines no forward: implement forward(img, pred, txt, vec, timestep, step_idx)"
        )

    def check_inputs(self, *obs: Unpack[GuidanceArgs]) -> GuidanceInputs:
        """Check the guidance call's arguments, ``check_inputs(img, pred, txt, vec, timestep, step_idx)`` as
        :meth:`forward` received them, against this network's sizes; return the ``(B,)`` timestep and grid.

        Raises:
            ValueError: naming the expected and the actual shape when anything disagrees.
        """
        img, pred, txt, vec, timestep, step_idx = obs
        owner = type(self).__name__
        if img.ndim != 3:
            raise ValueError(f"{owner}: img must be packed latents (B, seq, C), got shape {tuple(img.shape)}")
        if pred.shape != img.shape:
            raise ValueError(f"{owner}: pred must be shaped like img {tuple(img.shape)}, got {tuple(pred.shape)}")
        b, seq, c = img.shape
        if self.latent_channels is not None and c != self.latent_channels:
            raise ValueError(
                f"{owner} expects latents (B, seq, {self.latent_channels}) (latent_channels={self.latent_channels}),"
                f" got img of shape {tuple(img.shape)}: build the model with latent_channels={c} to match the "
                "env / backbone"
            )
        grid = self.resolve_grid(seq)
        check_text_input(owner, "txt", txt, ("L",), b, self.txt_dim)
        check_text_input(owner, "vec", vec, (), b, self.vec_dim)
        timestep = as_batch_vector(timestep, b, "timestep", owner, img.device)
        if isinstance(step_idx, torch.Tensor) and step_idx.numel() not in (1, b):
            raise ValueError(
                f"{owner}: step_idx must be an int or a (B={b},) tensor, got {tuple(step_idx.shape)}"
            )
        return GuidanceInputs(timestep=timestep, grid=grid)

    def resolve_grid(self, seq: int) -> tuple[int, int]:
        """The token grid ``(rows, cols)`` for ``seq`` tokens (square unless ``grid_size`` is set)."""
        return resolve_grid(type(self).__name__, seq, self.grid_size)


class CheckedNetwork(GuidanceNetwork):
    """A network whose ``forward`` checks the observation (:meth:`check_inputs`) and then computes from it
    (:meth:`compute`): the built-in networks and the critic, which differ only in what they compute."""

    def respond(self, *obs: Unpack[GuidanceArgs]) -> torch.Tensor:
        img, pred, txt, vec, _, _ = obs
        return self.compute(img, pred, txt, vec, self.check_inputs(*obs))

    @abstractmethod
    def compute(
        self, img: torch.Tensor, pred: torch.Tensor, txt: torch.Tensor, vec: torch.Tensor, inputs: GuidanceInputs
    ) -> torch.Tensor:
        """The output for a checked observation (``inputs``: the ``(B,)`` timestep and the token grid)."""


class BaseGuidanceModel(GuidanceNetwork):
    """Base class of guidance models (the seed's ``BaseGuidanceModel``).

    Subclasses implement :meth:`forward` and usually call :meth:`check_inputs` first; the class attributes of
    :class:`GuidanceNetwork` say what the model expects. A subclass is recorded by class name for checkpoints,
    and declares in its class statement what the architecture registry needs:
    ``class MyNet(BaseGuidanceModel, architecture="my-net")`` names it for ``build_policy`` / ``--policy`` (it
    then defines ``for_backbone(cls, backbone, **sizes)``), and :attr:`text_aware` says whether it reads the
    prompt.

    Attributes:
        text_aware: whether the network reads the prompt (``txt`` or ``vec``). A text-blind architecture (an affine
            schedule, a network of ``img`` and ``pred`` only) declares ``False``; one built either way sets it per
            instance (the attention network's ``text_conditioning``); a composite reads its parts'.
    """

    text_aware: bool = True

    def __init_subclass__(cls, *, architecture: str | Sequence[str] = (), **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # Every subclass, the users' included, can be rebuilt from its config by name.
        ARCHITECTURES.declare(cls, [architecture] if isinstance(architecture, str) else list(architecture))


def resolve_grid(owner: str, seq: int, grid_size: tuple[int, int] | None) -> tuple[int, int]:
    """The token grid ``(rows, cols)`` of ``seq`` tokens: ``grid_size`` if given (checked), else square."""
    if grid_size is not None:
        rows, cols = grid_size
        if rows * cols != seq:
            raise ValueError(
                f"{owner} expects seq {rows * cols} ({rows}x{cols} token grid, "
                f"grid_size={tuple(grid_size)}), "
                f"got seq {seq}: build the model with the env's grid_size"
            )
        return rows, cols
    side = math.isqrt(seq)
    if side * side != seq:
        raise ValueError(
            f"{owner}: seq {seq} is not a square token grid; pass grid_size=(rows, cols) with rows*cols={seq}"
        )
    return side, side


def check_text_input(
    owner: str, name: str, x: torch.Tensor, middle: tuple[str, ...], batch: int, width: int | None
) -> None:
    """Check the text input ``name`` (``txt`` ``(B, L, D_txt)`` or ``vec`` ``(B, D_vec)``, the dims between batch
    and width named by ``middle``): its rank and batch, then its width where the network fixes one (its
    ``{name}_dim``), with an error that says which size to build the model with.
    """
    if x.ndim != len(middle) + 2 or x.shape[0] != batch:
        layout = ", ".join([f"B={batch}", *middle, f"D_{name}"])
        raise ValueError(f"{owner}: {name} must be ({layout}), got shape {tuple(x.shape)}")
    if width is not None and x.shape[-1] != width:
        layout = ", ".join(["B", *middle, str(width)])
        raise ValueError(
            f"{owner} expects {name} of shape ({layout}) ({name}_dim={width}), got "
            f"{tuple(x.shape)}: build the model with {name}_dim={x.shape[-1]}"
        )


def as_batch_vector(
    x: torch.Tensor | float, batch: int, what: str, owner: str, device: torch.device
) -> torch.Tensor:
    """A float, a 0-d, ``(B,)`` or ``(B, 1)`` tensor -> a ``(B,)`` float tensor (one value per sample)."""
    if not isinstance(x, torch.Tensor):
        return torch.full((batch,), float(x), device=device)
    if x.numel() == 1:
        return x.reshape(1).expand(batch)
    if x.numel() != batch or (x.ndim == 2 and x.shape[-1] != 1) or x.ndim > 2:
        raise ValueError(
            f"{owner}: {what} must be a float, (B={batch},) or (B, 1), got shape {tuple(x.shape)}"
        )
    return x.reshape(batch)


def build_guidance_model(
    config: dict[str, Any], device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> BaseGuidanceModel:
    """Rebuild a guidance model from its ``model.config`` (``{"type": class name, **constructor args}``)."""
    if "type" not in config:
        raise ValueError(
            f"a guidance model config needs a 'type' entry (the class name), got keys {list(config)}"
        )
    return ARCHITECTURES.guidance_class(config["type"]).from_config(config, device=device, dtype=dtype)
