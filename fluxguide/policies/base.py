"""The guidance-model contract: observation in, correction shaped like ``pred`` out.

A guidance model maps the sampler state ``(img, pred, txt, vec, timestep, step_idx)`` to a correction that
the sampler adds to the base prediction (``pred_used = pred + scale * correction``, docs/design.md). Users
subclass :class:`BaseGuidanceModel` and implement ``forward``; :meth:`BaseGuidanceModel.check_inputs` gives
them the shape checks with errors that name expected and actual shapes.

Every built-in model stores its constructor arguments in ``model.config`` so a checkpoint (weights plus
config) rebuilds it with :func:`build_guidance_model`.
"""

from __future__ import annotations

import copy
import inspect
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

_REGISTRY: dict[str, type[BaseGuidanceModel]] = {}


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


@dataclass
class GuidanceInputs:
    """Checked inputs: the timestep as a ``(B,)`` float tensor and the token grid ``(rows, cols)``."""

    timestep: torch.Tensor
    grid: tuple[int, int]


class GuidanceInputChecks:
    """The input checks of a network with the guidance call signature (guidance models and critics).

    The class attributes say what the network expects; ``None`` accepts anything (see
    :class:`BaseGuidanceModel`).
    """

    latent_channels: int | None = None
    grid_size: tuple[int, int] | None = None
    txt_dim: int | None = None
    vec_dim: int | None = None

    def check_inputs(
        self,
        img: torch.Tensor,
        pred: torch.Tensor,
        txt: torch.Tensor,
        vec: torch.Tensor,
        timestep: torch.Tensor | float,
        step_idx: int | torch.Tensor,
    ) -> GuidanceInputs:
        """Check shapes against this model's configuration; return the ``(B,)`` timestep and the token grid.

        Raises:
            ValueError: naming the expected and the actual shape when anything disagrees.
        """
        return check_observation(
            type(self).__name__,
            img,
            pred,
            txt,
            vec,
            timestep,
            step_idx,
            latent_channels=self.latent_channels,
            grid_size=self.grid_size,
            txt_dim=self.txt_dim,
            vec_dim=self.vec_dim,
        )

    def resolve_grid(self, seq: int) -> tuple[int, int]:
        """The token grid ``(rows, cols)`` for ``seq`` tokens (square unless ``grid_size`` is set)."""
        return resolve_grid(type(self).__name__, seq, self.grid_size)


class BaseGuidanceModel(GuidanceInputChecks, nn.Module, ABC):
    """Base class of guidance models (the seed's ``BaseGuidanceModel``).

    Subclasses implement :meth:`forward` and usually call :meth:`check_inputs` first. The class attributes
    below say what the model expects; ``None`` accepts anything.

    Attributes:
        latent_channels: channels ``C`` of packed latents ``(B, seq, C)``.
        grid_size: the latent token grid ``(rows, cols)``; ``None`` infers a square grid from ``seq``.
        txt_dim: width of the text token features.
        vec_dim: width of the pooled text embedding.
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # Every subclass, the users' included, can be rebuilt from its config by name.
        _REGISTRY[cls.__name__] = cls

    def __init__(self) -> None:
        super().__init__()
        self._config: dict[str, Any] = {"type": type(self).__name__}

    def register_config(self, **kwargs: Any) -> None:
        """Record constructor arguments (JSON-serialisable) so :func:`build_guidance_model` can rebuild."""
        self._config = {"type": type(self).__name__, **copy.deepcopy(kwargs)}

    @property
    def config(self) -> dict[str, Any]:
        """The constructor arguments plus ``"type"`` (the class name); a copy."""
        return copy.deepcopy(self._config)

    @classmethod
    def from_config(
        cls,
        config: dict[str, Any],
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> BaseGuidanceModel:
        """Build the model described by ``config`` (as returned by :attr:`config`)."""
        kwargs = {k: v for k, v in config.items() if k != "type"}
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

    @abstractmethod
    def forward(
        self,
        img: torch.Tensor,
        pred: torch.Tensor,
        txt: torch.Tensor,
        vec: torch.Tensor,
        timestep: torch.Tensor,
        step_idx: int | torch.Tensor,
    ) -> torch.Tensor:
        """Return the correction, shaped like ``pred`` ``(B, seq, C)``.

        Args:
            img: current latent ``(B, seq, C)``.
            pred: the base model's prediction ``(B, seq, C)``.
            txt: text token features ``(B, L, D_txt)``.
            vec: pooled text embedding ``(B, D_vec)``.
            timestep: time in [0, 1] (1 = noise), ``(B,)`` (a float or ``(B, 1)`` is accepted).
            step_idx: the step index, an int or a ``(B,)`` tensor.
        """


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


def check_observation(
    owner: str,
    img: torch.Tensor,
    pred: torch.Tensor,
    txt: torch.Tensor,
    vec: torch.Tensor,
    timestep: torch.Tensor | float,
    step_idx: int | torch.Tensor,
    *,
    latent_channels: int | None,
    grid_size: tuple[int, int] | None,
    txt_dim: int | None,
    vec_dim: int | None,
) -> GuidanceInputs:
    """Check an observation against a model's sizes (``None`` accepts any); errors name both shapes."""
    if img.ndim != 3:
        raise ValueError(f"{owner}: img must be packed latents (B, seq, C), got shape {tuple(img.shape)}")
    if pred.shape != img.shape:
        raise ValueError(f"{owner}: pred must be shaped like img {tuple(img.shape)}, got {tuple(pred.shape)}")
    b, seq, c = img.shape
    if latent_channels is not None and c != latent_channels:
        raise ValueError(
            f"{owner} expects latents (B, seq, {latent_channels}) (latent_channels={latent_channels}), "
            f"got img of shape {tuple(img.shape)}: build the model with latent_channels={c} to match the "
            "env / backbone"
        )
    grid = resolve_grid(owner, seq, grid_size)
    if txt.ndim != 3 or txt.shape[0] != b:
        raise ValueError(f"{owner}: txt must be (B={b}, L, D_txt), got shape {tuple(txt.shape)}")
    if txt_dim is not None and txt.shape[-1] != txt_dim:
        raise ValueError(
            f"{owner} expects txt of shape (B, L, {txt_dim}) (txt_dim={txt_dim}), got {tuple(txt.shape)}: "
            f"build the model with txt_dim={txt.shape[-1]}"
        )
    if vec.ndim != 2 or vec.shape[0] != b:
        raise ValueError(f"{owner}: vec must be (B={b}, D_vec), got shape {tuple(vec.shape)}")
    if vec_dim is not None and vec.shape[-1] != vec_dim:
        raise ValueError(
            f"{owner} expects vec of shape (B, {vec_dim}) (vec_dim={vec_dim}), got {tuple(vec.shape)}: "
            f"build the model with vec_dim={vec.shape[-1]}"
        )
    timestep = as_batch_vector(timestep, b, "timestep", owner, img.device)
    if isinstance(step_idx, torch.Tensor) and step_idx.numel() not in (1, b):
        raise ValueError(
            f"{owner}: step_idx must be an int or a (B={b},) tensor, got {tuple(step_idx.shape)}"
        )
    return GuidanceInputs(timestep=timestep, grid=grid)


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
    cls = _REGISTRY.get(config["type"])
    if cls is None:
        raise ValueError(
            f"unknown guidance model type {config['type']!r}; known: {sorted(_REGISTRY)}. "
            "Import the module that defines it before building"
        )
    return cls.from_config(config, device=device, dtype=dtype)
