"""Peak memory and time of backpropagating through every step of ``denoise``, with and without checkpointing.

One run measures both settings of ``gradient_checkpointing`` for the same reward-gradient pass: a loss on
the final latent of ``denoise(..., guidance_requires_grad=True)`` backpropagated into a guidance model,
with a random diffusers ``FluxTransformer2DModel`` as the base model. It prints the peak memory of each
(forward + backward, above what was allocated before the pass), their ratio, the time per forward and per
backward, and the largest difference between the two settings' gradients (which should be ~0).

Memory: on CUDA, ``torch.cuda.max_memory_allocated``. On CPU, torch has no allocation counter, so a
``TorchDispatchMode`` counts the bytes of every tensor storage created during the pass and subtracts them
when the storage is freed (a weak reference's callback); the peak of that count is the memory the pass
needs, independent of the allocator's caching and of other processes. Adapted from the approach of
pytorch/pytorch ``torch/distributed/_tools/mem_tracker.py``. Times are measured without the tracker.

Run::

    .venv/bin/python benchmarks/checkpoint_memory.py            # defaults: under a minute on 2 CPU cores
    .venv/bin/python benchmarks/checkpoint_memory.py --steps 16 --device cuda
"""

from __future__ import annotations

import time
import weakref
from dataclasses import dataclass
from typing import Any

import torch
import tyro
from diffusers import FluxTransformer2DModel
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from fluxguide.backbones.bfl import BFLFlux
from fluxguide.sampling import denoise, get_schedule
from fluxguide.sampling.packing import make_img_ids, make_txt_ids


@dataclass
class Config:
    """Size of the benchmark. The defaults keep one run under a minute on a 2-core CPU."""

    steps: int = 8
    """Sampling steps, all backpropagated through."""
    batch: int = 2
    """Latents per pass."""
    grid: int = 16
    """Latent grid side in tokens: ``grid * grid`` image tokens (Flux at 256x256 px has 16)."""
    channels: int = 64
    """Packed latent channels (Flux: 16 channels x 2x2 patches = 64)."""
    txt_len: int = 32
    """Text tokens."""
    num_layers: int = 2
    """Double-stream transformer blocks."""
    num_single_layers: int = 4
    """Single-stream transformer blocks."""
    num_heads: int = 4
    """Attention heads."""
    head_dim: int = 32
    """Width of one head (the transformer width is ``num_heads * head_dim``)."""
    repeats: int = 3
    """Timed passes per setting (after one untimed, memory-tracked pass)."""
    device: str = "cpu"
    """Torch device, e.g. ``cpu`` or ``cuda``."""
    threads: int | None = 1
    """CPU intra-op threads (``torch.set_num_threads``); ``None`` keeps torch's default. On a CPU shared with
    other jobs, more threads than free cores make OpenMP spin-wait: the 2-core development machine ran this
    benchmark 5-40x slower, and with 20x the run-to-run variance, at 2 threads than at 1."""
    seed: int = 0
    """Seed of the random model, guidance model and inputs."""


class TokenMLPGuidance(nn.Module):
    """Per-token MLP correction ``f(img, pred, t)`` (randomly initialised so every weight gets a gradient)."""

    def __init__(self, channels: int, hidden: int = 128) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2 * channels + 1, hidden), nn.SiLU(), nn.Linear(hidden, channels))

    def forward(self, img, pred, txt, vec, t, step_idx):
        t_tok = t.to(img.dtype)[:, None, None].expand(-1, img.shape[1], 1)
        return self.net(torch.cat([img, pred, t_tok], dim=-1))


class LiveTensorMemory(TorchDispatchMode):
    """Bytes of tensor storages created inside this mode and still alive, and their peak."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._refs: dict[int, weakref.ref] = {}

    def _freed(self, key: int, nbytes: int) -> None:
        self._refs.pop(key, None)
        self.live -= nbytes

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.device.type != "cpu":
                continue
            storage = t.untyped_storage()
            key = id(storage)
            if key in self._refs and self._refs[key]() is storage:
                continue  # a view or an in-place result: no new memory
            nbytes = storage.nbytes()
            # torch keeps a storage's Python object alive as long as the storage, so this callback fires
            # exactly when the memory is released.
            self._refs[key] = weakref.ref(storage, lambda _, key=key, n=nbytes: self._freed(key, n))
            self.live += nbytes
            self.peak = max(self.peak, self.live)
        return out


def one_pass(
    cfg: Config, model: nn.Module, guide: nn.Module, inputs: dict[str, torch.Tensor], checkpointing: bool
) -> tuple[float, float]:
    """Forward through ``denoise`` and backward of a loss on the final latent; returns both times (s)."""
    device = torch.device(cfg.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    guide.zero_grad(set_to_none=True)
    sync()
    t0 = time.perf_counter()
    out = denoise(
        model,
        timesteps=get_schedule(cfg.steps, cfg.grid * cfg.grid),
        guidance=None,
        guidance_model=guide,
        guidance_requires_grad=True,
        gradient_checkpointing=checkpointing,
        **inputs,
    )
    loss = out.square().mean()
    sync()
    t1 = time.perf_counter()
    loss.backward()
    sync()
    return t1 - t0, time.perf_counter() - t1


def peak_bytes(cfg: Config, model: nn.Module, guide: nn.Module, inputs: dict, checkpointing: bool) -> int:
    """Peak extra memory of one forward + backward pass (the gradients it leaves included)."""
    guide.zero_grad(set_to_none=True)
    if cfg.device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        one_pass(cfg, model, guide, inputs, checkpointing)
        return torch.cuda.max_memory_allocated() - before
    tracker = LiveTensorMemory()
    with tracker:
        one_pass(cfg, model, guide, inputs, checkpointing)
    return tracker.peak


def main(cfg: Config) -> None:
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    device = torch.device(cfg.device)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=cfg.channels,
        num_layers=cfg.num_layers,
        num_single_layers=cfg.num_single_layers,
        attention_head_dim=cfg.head_dim,
        num_attention_heads=cfg.num_heads,
        joint_attention_dim=cfg.num_heads * cfg.head_dim,
        pooled_projection_dim=cfg.num_heads * cfg.head_dim,
        axes_dims_rope=(cfg.head_dim // 4, 3 * cfg.head_dim // 8, 3 * cfg.head_dim // 8),
    )
    model = BFLFlux(transformer).to(device).eval().requires_grad_(False)
    guide = TokenMLPGuidance(cfg.channels).to(device)
    g = torch.Generator().manual_seed(cfg.seed)
    width = cfg.num_heads * cfg.head_dim
    inputs = {
        "img": torch.randn(cfg.batch, cfg.grid * cfg.grid, cfg.channels, generator=g).to(device),
        "img_ids": make_img_ids(cfg.grid, cfg.grid, device=device),
        "txt": torch.randn(cfg.batch, cfg.txt_len, width, generator=g).to(device),
        "txt_ids": make_txt_ids(cfg.txt_len, device=device),
        "vec": torch.randn(cfg.batch, width, generator=g).to(device),
    }
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"base model {n_params / 1e6:.2f} M params, width {width}, {cfg.num_layers}+{cfg.num_single_layers} blocks; "
        f"batch {cfg.batch} x {cfg.grid * cfg.grid} tokens x {cfg.channels} ch, {cfg.txt_len} text tokens; "
        f"{cfg.steps} steps; device {device}, {torch.get_num_threads()} CPU threads"
    )
    method = "torch.cuda.max_memory_allocated" if device.type == "cuda" else "live tensor storages (dispatch mode)"
    results = {}
    grads = {}
    for checkpointing in (False, True):
        peak = peak_bytes(cfg, model, guide, inputs, checkpointing)
        grads[checkpointing] = [p.grad.clone() for p in guide.parameters()]
        times = [one_pass(cfg, model, guide, inputs, checkpointing) for _ in range(cfg.repeats)]
        fwd = min(t[0] for t in times)
        bwd = min(t[1] for t in times)
        results[checkpointing] = (peak, fwd, bwd)
        name = "with checkpointing   " if checkpointing else "without checkpointing"
        print(f"{name}: peak {peak / 2**20:8.2f} MiB   forward {fwd:6.3f} s   backward {bwd:6.3f} s (best of {cfg.repeats})")
    diff = max((a - b).abs().max().item() for a, b in zip(grads[False], grads[True]))
    (p0, _, b0), (p1, _, b1) = results[False], results[True]
    print(f"memory ratio without/with checkpointing: {p0 / p1:.2f}x   backward time ratio with/without: {b1 / b0:.2f}x")
    print(f"max |grad difference| between the settings: {diff:.2e}   (memory: {method})")


if __name__ == "__main__":
    main(tyro.cli(Config))
