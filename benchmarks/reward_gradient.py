"""Peak memory and time of one reward-gradient update for K = 1, K = half and K = all steps, with and
without gradient checkpointing, measured in one run.

Each setting runs real :class:`fluxguide.algos.RewardGradient` updates (guided sampling with a graph through
the last K steps, decoding, the differentiable reward, backward, optimizer step) on the shapes world (or a
tiny random Flux with a tiny random CLIP score). Memory is the peak of the bytes of live tensor storages
created during one update (``LiveTensorMemory`` from ``benchmarks/checkpoint_memory.py``: on CPU torch has no
allocation counter) or ``torch.cuda.max_memory_allocated`` on CUDA. Time is the best of ``repeats`` updates,
measured without the tracker.

Run::

    .venv/bin/python benchmarks/reward_gradient.py                  # shapes world, about a minute on 2 cores
    .venv/bin/python benchmarks/reward_gradient.py --backbone tiny-flux --batch 2
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parent))
from checkpoint_memory import LiveTensorMemory

from fluxguide.algos import RewardGradient, RewardGradientConfig
from fluxguide.backbones.registry import BackboneName, build_backbone, build_reward
from fluxguide.envs.prompts import resolve_prompts
from fluxguide.policies.registry import PolicyName, build_policy


@dataclass
class Config:
    """Size of the benchmark. The defaults keep one run around a minute on a 2-core CPU."""

    backbone: BackboneName = "shapes-random"
    """'shapes' (pretrained weights), 'shapes-random' (same sizes, random weights) or 'tiny-flux'"""
    policy: PolicyName = "attention"
    """guidance architecture"""
    hidden_dim: int = 64
    """policy width"""
    steps: int = 20
    """sampling steps"""
    batch: int = 8
    """images per update"""
    repeats: int = 2
    """timed updates per setting (after one untimed, memory-tracked update)"""
    device: str = "cpu"
    """torch device"""
    threads: int = 1
    """CPU threads (1 is fastest and steadiest on a shared 2-core machine)"""
    seed: int = 0
    """seed of the models, prompts and noise"""


def measure(cfg: Config, algo: RewardGradient, prompts: list[str], k: int, checkpointing: bool) -> tuple[int, float]:
    """Peak extra memory (bytes) of one update and its best time (s) over ``cfg.repeats`` updates."""
    algo.config.grad_last_k = k
    algo.config.gradient_checkpointing = checkpointing
    device = torch.device(cfg.device)

    def update() -> None:
        algo.update(prompts, torch.Generator().manual_seed(cfg.seed))

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        update()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
    else:
        tracker = LiveTensorMemory()
        with tracker:
            update()
        peak = tracker.peak
    times = []
    for _ in range(cfg.repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        update()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return peak, min(times)


def main(cfg: Config) -> list[dict]:
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    backbone = build_backbone(cfg.backbone, seed=cfg.seed, device=cfg.device, num_steps=cfg.steps)
    reward = build_reward("shapes-clip", backbone, seed=cfg.seed)
    policy = build_policy(cfg.policy, backbone, hidden_dim=cfg.hidden_dim)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-4)
    algo = RewardGradient(backbone, policy, reward, optimizer, RewardGradientConfig(num_steps=cfg.steps))
    prompts = resolve_prompts("shapes-train")[: cfg.batch]
    algo.update(prompts, torch.Generator().manual_seed(cfg.seed))  # warm-up (allocator, text cache, lazy init)
    print(
        f"{cfg.backbone}: batch {cfg.batch} x {backbone.latent_seq} tokens x {backbone.latent_channels} ch, "
        f"{cfg.steps} steps, {cfg.policy} policy ({sum(p.numel() for p in policy.parameters()) / 1e3:.0f} k params); "
        f"device {cfg.device}, {torch.get_num_threads()} threads"
    )
    rows = []
    for k in sorted({1, max(1, cfg.steps // 2), cfg.steps}):
        for checkpointing in (False, True):
            peak, seconds = measure(cfg, algo, prompts, k, checkpointing)
            rows.append({"k": k, "checkpointing": checkpointing, "peak_mib": peak / 2**20, "seconds": seconds})
            print(f"K = {k:3d}  checkpointing {'on ' if checkpointing else 'off'}   peak {peak / 2**20:8.2f} MiB   "
                  f"{seconds:6.3f} s / update (best of {cfg.repeats})")
    method = "torch.cuda.max_memory_allocated" if cfg.device.startswith("cuda") else "live tensor storages"
    print(f"(memory: {method}, above what was allocated before the update)")
    return rows


if __name__ == "__main__":
    main(tyro.cli(Config))
