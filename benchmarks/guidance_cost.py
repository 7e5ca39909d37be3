"""What guidance costs next to the base model: parameters and forward FLOPs per architecture.

Two configurations:

* the shapes world: the tiny ``FluxTransformer2DModel`` (patch 1, 48 channels, 2 double + 4 single blocks,
  4 heads of 16) on 8x8 tokens, with shapes-world-sized guidance models; FLOPs and CPU wall time;
* Flux-dev: diffusers' default ``FluxTransformer2DModel`` config with ``guidance_embeds=True`` (about 12 B
  parameters) at 1024x1024 (4096 tokens, 512 T5 tokens), against the seed's guidance defaults. Built on the
  ``meta`` device and measured with ``torch.utils.flop_counter.FlopCounterMode``: nothing is allocated.

The MLP and conv guidance must stay below 5% of the Flux transformer's cost; the script exits with status 1
if they do not. FLOPs count matrix products and convolutions (norms and activations are not counted, for
either model). Run: ``.venv/bin/python benchmarks/guidance_cost.py [--no-timing]``.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import FluxTransformer2DModel
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from fluxguide.sampling.packing import make_img_ids, make_txt_ids
from fluxguide.policies import AttentionGuidanceModel, ConvGuidanceModel, MLPGuidanceModel

MAX_FLUX_FRACTION = 0.05
"""The MLP and conv guidance must cost less than this fraction of one Flux transformer forward."""

SHAPES_TRANSFORMER: dict[str, Any] = {
    "patch_size": 1,
    "in_channels": 48,
    "num_layers": 2,
    "num_single_layers": 4,
    "attention_head_dim": 16,
    "num_attention_heads": 4,
    "joint_attention_dim": 64,
    "pooled_projection_dim": 64,
    "axes_dims_rope": (4, 6, 6),
}
SHAPES_GUIDANCE: dict[str, Callable[[], nn.Module]] = {
    "mlp": lambda: MLPGuidanceModel(latent_channels=48, hidden_dim=128, num_layers=3, vec_dim=64),
    "attention": lambda: AttentionGuidanceModel(
        hidden_dim=64, num_heads=4, num_layers=2, latent_channels=48, txt_dim=64, vec_dim=64
    ),
    "conv": lambda: ConvGuidanceModel(
        in_channels=3, hidden_channels=32, num_blocks=2, patch_size=4, vec_dim=64
    ),
}
FLUX_DEV_GUIDANCE: dict[str, Callable[[], nn.Module]] = {
    "mlp": lambda: MLPGuidanceModel(latent_channels=64, hidden_dim=1024, num_layers=3),
    "attention": lambda: AttentionGuidanceModel(hidden_dim=1024, num_heads=8, num_layers=2),
    "conv": lambda: ConvGuidanceModel(in_channels=16, hidden_channels=256, num_blocks=3),
}


@dataclass
class Workload:
    """One sampler step's inputs: batch, token grid, latent channels, text length and widths."""

    batch: int
    grid: int
    channels: int
    txt_len: int
    txt_dim: int
    vec_dim: int
    guidance: bool

    @property
    def seq(self) -> int:
        return self.grid * self.grid


@dataclass
class Row:
    name: str
    params: int
    flops: int
    seconds: float | None = None


def _inputs(w: Workload, device: torch.device | str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return (
            torch.randn(*shape, generator=g).to(device)
            if str(device) != "meta"
            else torch.empty(*shape, device=device)
        )

    return {
        "img": rand(w.batch, w.seq, w.channels),
        "pred": rand(w.batch, w.seq, w.channels),
        "txt": rand(w.batch, w.txt_len, w.txt_dim),
        "vec": rand(w.batch, w.vec_dim),
        "t": torch.full((w.batch,), 0.5, device=device),
    }


def base_forward(
    transformer: FluxTransformer2DModel, w: Workload, device: torch.device | str
) -> Callable[[], Any]:
    """A closure running one transformer forward on ``w`` (the base-model cost of one sampler step)."""
    x = _inputs(w, device)
    img_ids, txt_ids = make_img_ids(w.grid, w.grid, device=device), make_txt_ids(w.txt_len, device=device)
    guidance = torch.full((w.batch,), 3.5, device=device) if w.guidance else None
    return lambda: transformer(
        hidden_states=x["img"],
        encoder_hidden_states=x["txt"],
        pooled_projections=x["vec"],
        timestep=x["t"],
        img_ids=img_ids,
        txt_ids=txt_ids,
        guidance=guidance,
        return_dict=False,
    )


def guidance_forward(model: nn.Module, w: Workload, device: torch.device | str) -> Callable[[], Any]:
    """A closure running one guidance forward on ``w``."""
    x = _inputs(w, device)
    return lambda: model(x["img"], x["pred"], x["txt"], x["vec"], x["t"], 0)


def count_flops(fn: Callable[[], Any]) -> int:
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        fn()
    return counter.get_total_flops()


def median_seconds(fn: Callable[[], Any], repeats: int = 7) -> float:
    with torch.no_grad():
        fn()  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def measure(
    transformer_config: dict[str, Any],
    guidance: dict[str, Callable[[], nn.Module]],
    w: Workload,
    device: torch.device | str,
    timing: bool,
) -> list[Row]:
    """Rows for the base transformer and each guidance model (FLOPs, and CPU time when ``timing``)."""
    with torch.device(device):
        transformer = FluxTransformer2DModel(**transformer_config).eval()
        models = {name: build().eval() for name, build in guidance.items()}
    fns = {"base transformer": base_forward(transformer, w, device)}
    fns.update({name: guidance_forward(m, w, device) for name, m in models.items()})
    rows = []
    for name, fn in fns.items():
        model = transformer if name == "base transformer" else models[name]
        rows.append(Row(name, num_params(model), count_flops(fn), median_seconds(fn) if timing else None))
    return rows


def shapes_world_rows(timing: bool = True, batch: int = 8, txt_len: int = 16) -> list[Row]:
    w = Workload(batch, grid=8, channels=48, txt_len=txt_len, txt_dim=64, vec_dim=64, guidance=False)
    return measure(SHAPES_TRANSFORMER, SHAPES_GUIDANCE, w, "cpu", timing)


def flux_dev_rows(batch: int = 1, txt_len: int = 512) -> list[Row]:
    w = Workload(batch, grid=64, channels=64, txt_len=txt_len, txt_dim=4096, vec_dim=768, guidance=True)
    return measure({"guidance_embeds": True}, FLUX_DEV_GUIDANCE, w, "meta", timing=False)


def print_table(title: str, rows: list[Row]) -> None:
    base = rows[0]
    print(f"\n{title}")
    header = f"{'model':<18}{'params':>14}{'GFLOPs':>14}{'FLOPs / base':>14}"
    if base.seconds is not None:
        header += f"{'ms':>10}{'time / base':>13}"
    print(header)
    for r in rows:
        line = f"{r.name:<18}{r.params:>14,}{r.flops / 1e9:>14.3f}{r.flops / base.flops:>14.4f}"
        if r.seconds is not None and base.seconds is not None:
            line += f"{r.seconds * 1e3:>10.2f}{r.seconds / base.seconds:>13.3f}"
        print(line)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--no-timing", action="store_true", help="FLOPs only (skip CPU timing on the shapes world)"
    )
    args = parser.parse_args()
    torch.manual_seed(0)
    print_table(
        "shapes world: tiny Flux transformer, batch 8, 8x8 tokens x 48 channels, 16 text tokens (CPU)",
        shapes_world_rows(timing=not args.no_timing),
    )
    flux = flux_dev_rows()
    print_table(
        "Flux-dev (diffusers default config, guidance_embeds=True), 1024x1024: 4096 tokens x 64, "
        "512 T5 tokens, batch 1 (meta device, FLOPs)",
        flux,
    )
    base = flux[0].flops
    ok = True
    for r in flux[1:]:
        fraction = r.flops / base
        limited = r.name in ("mlp", "conv")
        status = ("OK" if fraction < MAX_FLUX_FRACTION else "OVER") if limited else "(no limit)"
        ok &= not limited or fraction < MAX_FLUX_FRACTION
        print(f"{r.name}: {100 * fraction:.3f}% of a Flux-dev forward {status}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
