"""Training throughput of data-parallel reward-gradient updates: 1 process versus N gloo CPU processes at the same
per-rank batch, measured in one run.

Each setting starts its processes with ``torch.multiprocessing`` (a gloo process group for N > 1, none for 1, as
``torchrun`` would), builds the same backbone, reward and policy on every rank and runs real
:class:`fluxguide.algos.RewardGradient` updates through the policy wrapped by
:func:`fluxguide.distributed.data_parallel` (guided sampling with a graph, decoding, the reward, backward with the
gradient all-reduce, clipping, the optimizer step). After ``warmup`` untimed updates, the ranks meet at a barrier
and rank 0 times ``updates`` updates up to a final barrier. Samples per second count every rank's images:
``world * batch * updates / seconds``; the ratio to one process is the scaling (ideal: N, on N free cores).

Run::

    .venv/bin/python benchmarks/distributed_throughput.py                 # 1 and 2 CPU processes, ~1 minute
    .venv/bin/python benchmarks/distributed_throughput.py --worlds 1 2 4 --steps 20 --batch 8
"""

from __future__ import annotations

import os
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import tyro

from fluxguide import distributed
from fluxguide.algos import RewardGradient, RewardGradientConfig
from fluxguide.backbones.registry import BackboneName, build_backbone, build_reward
from fluxguide.envs.prompts import resolve_prompts
from fluxguide.policies.registry import PolicyName, build_policy


@dataclass
class Config:
    """Size of the benchmark. The defaults keep one run around a minute on a 2-core CPU."""

    worlds: tuple[int, ...] = (1, 2)
    """process counts to measure (the first is the reference of the ratio)"""
    backbone: BackboneName = "shapes-random"
    """'shapes' (pretrained weights), 'shapes-random' (same sizes, random weights) or 'tiny-flux'"""
    reward: str = "shapes-clip"
    """differentiable reward (registry name)"""
    policy: PolicyName = "attention"
    """guidance architecture"""
    hidden_dim: int = 64
    """policy width"""
    steps: int = 8
    """sampling steps"""
    batch: int = 4
    """images per update per process"""
    updates: int = 4
    """timed updates per setting"""
    warmup: int = 1
    """untimed updates first (allocations, DDP's first-iteration bucketing)"""
    threads: int = 1
    """torch CPU threads per process (1 per core is the usual data-parallel setting)"""
    seed: int = 0
    """seed of the models; rank r draws prompts and noise from seed + 1000 r"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(r: int, world: int, port: int, cfg: Config, out: str) -> None:
    """One rank: build everything, warm up, time ``cfg.updates`` updates between barriers (rank 0 writes them)."""
    torch.set_num_threads(cfg.threads)
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=r, world_size=world)
    try:
        torch.manual_seed(cfg.seed)
        backbone = build_backbone(cfg.backbone, seed=cfg.seed, num_steps=cfg.steps)
        reward = build_reward(cfg.reward, backbone, seed=cfg.seed)
        policy = build_policy(cfg.policy, backbone, hidden_dim=cfg.hidden_dim)
        optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-4)
        algo = RewardGradient(backbone, distributed.data_parallel(policy), reward, optimizer,
                              RewardGradientConfig(num_steps=cfg.steps))
        gen = torch.Generator().manual_seed(distributed.rank_seed(cfg.seed))
        prompts = resolve_prompts("shapes-train")

        def update() -> None:
            idx = torch.randint(len(prompts), (cfg.batch,), generator=gen).tolist()
            algo.update([prompts[i] for i in idx], gen)

        for _ in range(cfg.warmup):
            update()
        distributed.barrier()
        start = time.perf_counter()
        for _ in range(cfg.updates):
            update()
        distributed.barrier()
        elapsed = time.perf_counter() - start
        distributed.check_in_sync(policy)  # the ranks trained one policy
        if r == 0:
            (Path(out) / f"world{world}.txt").write_text(str(elapsed))
    finally:
        distributed.cleanup()


def main(cfg: Config) -> dict[int, float]:
    results: dict[int, float] = {}
    with tempfile.TemporaryDirectory() as out:
        for world in cfg.worlds:
            mp.spawn(worker, args=(world, free_port(), cfg, out), nprocs=world, join=True)
            seconds = float((Path(out) / f"world{world}.txt").read_text())
            results[world] = world * cfg.batch * cfg.updates / seconds
    print(f"\nreward-gradient updates: {cfg.backbone}, {cfg.policy} policy (hidden {cfg.hidden_dim}), {cfg.steps} "
          f"steps, batch {cfg.batch} per process, {cfg.updates} timed updates, {cfg.threads} thread(s) per process, "
          f"{os.cpu_count()} CPUs visible")
    print(f"{'processes':>9}  {'samples/s':>9}  {'s/update':>8}  {'vs 1st':>6}")
    first = results[cfg.worlds[0]]
    for world, sps in results.items():
        print(f"{world:>9}  {sps:>9.2f}  {world * cfg.batch / sps:>8.3f}  {sps / first:>6.2f}x")
    return results


if __name__ == "__main__":
    main(tyro.cli(Config))
