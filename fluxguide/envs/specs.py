"""TorchRL specs of the guidance env that do not allocate full-size bound tensors.

TorchRL's ``Unbounded`` spec stores its box as two ``torch.full(shape, ±finfo.max)`` tensors (torchrl 0.14),
so a spec for Flux's ``txt`` at batch 32 (``32 x 512 x 4096``) would hold 512 MiB of bounds on the env's
device. :class:`LeanUnbounded` keeps the same values as stride-0 views of one scalar each: the bounds
read the same to every consumer and cost nothing, whatever the shape.
"""

from __future__ import annotations

import abc

import torch
from torchrl.data import Bounded, Composite, UnboundedContinuous
from torchrl.data.tensor_specs import ContinuousBox, TensorSpec

from fluxguide import keys


def _kept_bound(attribute: str) -> property:
    """A bound of :class:`BroadcastBox`, read and set as it is: ``ContinuousBox``'s own property would move it to
    the box's device and expand it per batch, materialising the view. Setting it moves the box to its device."""

    def get(box: ContinuousBox) -> torch.Tensor:
        return getattr(box, attribute)

    def set_(box: ContinuousBox, value: torch.Tensor) -> None:
        setattr(box, attribute, value)
        box.device = value.device

    return property(get, set_)


class BroadcastBox(ContinuousBox):
    """A :class:`ContinuousBox` whose ``low`` / ``high`` are expanded (stride-0) views of scalars.

    ``ContinuousBox`` clones its bounds on construction, which would materialise the expansion; this box
    keeps the views and rebuilds them (never materialises) on ``clone`` / ``to`` / ``unbind``.
    """

    def __post_init__(self) -> None:
        self.device = self._low.device
        self._batch_size = None

    @staticmethod
    def make(value_low: float, value_high: float, shape: torch.Size, device: torch.device, dtype: torch.dtype) -> BroadcastBox:
        low = torch.full((), value_low, device=device, dtype=dtype).expand(shape)
        high = torch.full((), value_high, device=device, dtype=dtype).expand(shape)
        return BroadcastBox(low, high)

    low = _kept_bound("_low")
    high = _kept_bound("_high")

    def _rebuild(self, shape: torch.Size, device: torch.device, dtype: torch.dtype) -> BroadcastBox:
        lo = self._low.reshape(-1)[0].item() if self._low.numel() else 0.0
        hi = self._high.reshape(-1)[0].item() if self._high.numel() else 0.0
        return BroadcastBox.make(lo, hi, shape, device, dtype)

    def to(self, dest: torch.dtype | torch.device | str) -> BroadcastBox:
        if isinstance(dest, torch.dtype):
            return self._rebuild(self._low.shape, self._low.device, dest)
        return self._rebuild(self._low.shape, torch.device(dest), self._low.dtype)

    def clone(self) -> BroadcastBox:
        return BroadcastBox(self._low, self._high)  # the views are read-only by construction

    def unbind(self, dim: int = 0) -> tuple[BroadcastBox, ...]:
        shape = list(self._low.shape)
        n = shape.pop(dim)
        return tuple(self._rebuild(torch.Size(shape), self._low.device, self._low.dtype) for _ in range(n))


class _KeepSubclass(type(UnboundedContinuous)):
    """TorchRL's ``Unbounded`` metaclass re-types every instance to ``UnboundedContinuous``; keep ours."""

    def __call__(cls, *args: object, **kwargs: object) -> object:
        return abc.ABCMeta.__call__(cls, *args, **kwargs)


class LeanUnbounded(UnboundedContinuous, metaclass=_KeepSubclass):
    """``Unbounded`` (continuous) whose bounds are broadcast views: no ``shape``-sized allocation.

    Behaves as :class:`torchrl.data.Unbounded` everywhere (TorchRL builds derived specs through
    ``self.__class__``, so expanded, indexed and cloned copies stay lean).
    """

    def __init__(
        self,
        shape: torch.Size | int | tuple[int, ...] = (),
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        **kwargs: object,
    ) -> None:
        shape = torch.Size([shape]) if isinstance(shape, int) else torch.Size(shape)
        dtype = torch.get_default_dtype() if dtype is None else dtype
        device = torch.device("cpu") if device is None else torch.device(device)
        if not dtype.is_floating_point:
            raise ValueError(f"LeanUnbounded is for floating tensors, got dtype {dtype}")
        finfo = torch.finfo(dtype)
        box = BroadcastBox.make(finfo.min, finfo.max, torch.Size([max(s, 0) for s in shape]), device, dtype)
        domain = kwargs.pop("domain", "continuous")
        TensorSpec.__init__(self, shape=shape, space=box, device=device, dtype=dtype, domain=domain, **kwargs)
        self.encode = self._encode_eager

    def to(self, dest: torch.dtype | torch.device | str | None) -> LeanUnbounded:  # type: ignore[override]
        if dest is None:
            return self
        dtype = dest if isinstance(dest, torch.dtype) else self.dtype
        device = self.device if isinstance(dest, torch.dtype) else torch.device(dest)
        if dtype == self.dtype and device == self.device:
            return self
        return self.__class__(shape=self.shape, device=device, dtype=dtype)


def observation_spec(
    batch_size: int,
    latent_shape: tuple[int, int],
    txt_shape: tuple[int, int],
    vec_shape: tuple[int],
    cond_dtype: torch.dtype,
    num_steps: int,
    device: torch.device,
    sde: bool,
) -> Composite:
    """The observation ``Composite``: ``img``, ``pred``, ``txt``, ``vec``, ``t``, ``step`` (+ ``sde_std``).

    Large entries are :class:`LeanUnbounded`; ``t`` is bounded in [0, 1] and ``step`` in [0, num_steps],
    both ``(B, 1)``.
    """
    b = batch_size
    specs: dict[str, TensorSpec] = {
        keys.IMG: LeanUnbounded((b, *latent_shape), device=device, dtype=torch.float32),
        keys.PRED: LeanUnbounded((b, *latent_shape), device=device, dtype=torch.float32),
        keys.TXT: LeanUnbounded((b, *txt_shape), device=device, dtype=cond_dtype),
        keys.VEC: LeanUnbounded((b, *vec_shape), device=device, dtype=cond_dtype),
        keys.T: Bounded(0.0, 1.0, shape=(b, 1), device=device, dtype=torch.float32),
        keys.STEP: Bounded(0, num_steps, shape=(b, 1), device=device, dtype=torch.int64),
    }
    if sde:
        specs[keys.SDE_STD] = LeanUnbounded((b, 1), device=device, dtype=torch.float32)
    return Composite(specs, shape=(b,), device=device)
