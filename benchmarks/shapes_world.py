"""Speed of the shapes world: one base-model forward pass and one full episode at batch 32 (issue 3).

Timed, best of ``--repeats`` (each after one warm-up call):

* ``forward``: one call of the tiny Flux transformer on a batch of packed latents (one sampling step's model
  call, prompts already encoded);
* ``episode``: ``ShapesWorld.sample`` of a batch of prompts: encode, draw noise, ``--num-steps`` Euler steps,
  decode -- what one env episode costs before the reward;
* ``episode (CFG)``: the same with classifier-free guidance (two model calls per step, batched);
* ratios: episode / forward (about the number of steps: the sampler adds little around the model) and CFG /
  base episode.

Run::

    .venv/bin/python benchmarks/shapes_world.py --batch 32 --repeats 5
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import tyro

from fluxguide.worlds.shapes import ShapesWorld, train_prompts


@dataclass
class Config:
    batch: int = 32
    """images per call"""
    num_steps: int = ShapesWorld.default_num_steps
    """sampling steps of an episode"""
    repeats: int = 5
    """timed calls per measurement (the best is reported)"""
    threads: int = 1
    """torch CPU threads (1: two threads oversubscribe a shared 2-core machine)"""
    device: str = "cpu"
    """torch device"""


def best_time(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return min(times)


@torch.no_grad()
def main(cfg: Config) -> dict[str, float]:
    torch.set_num_threads(cfg.threads)
    device = torch.device(cfg.device)
    world = ShapesWorld.pretrained(device=device)
    prompts = [train_prompts()[i % len(train_prompts())] for i in range(cfg.batch)]
    cond = world.encode(prompts)
    img = world.noise(cfg.batch, torch.Generator().manual_seed(0)).to(device)
    t = torch.full((cfg.batch,), 0.5, device=device)

    def forward() -> torch.Tensor:
        return world(img=img, img_ids=cond.img_ids, txt=cond.txt, txt_ids=cond.txt_ids, timesteps=t, y=cond.vec)

    def episode(cfg_scale: float = 1.0) -> torch.Tensor:
        return world.sample(prompts, num_steps=cfg.num_steps, generator=torch.Generator().manual_seed(0),
                            cfg_scale=cfg_scale)

    out = {
        "forward": best_time(forward, cfg.repeats, device),
        "episode": best_time(episode, cfg.repeats, device),
        "episode_cfg": best_time(lambda: episode(world.recommended_cfg_scale), cfg.repeats, device),
    }
    params = sum(p.numel() for p in world.transformer.parameters())
    print(f"shapes world on {device} ({torch.get_num_threads()} thread(s)), transformer {params / 1e6:.2f} M params, "
          f"batch {cfg.batch}, {cfg.num_steps} steps, best of {cfg.repeats}")
    print(f"  one base-model forward      {out['forward'] * 1e3:8.1f} ms")
    print(f"  one full episode            {out['episode'] * 1e3:8.1f} ms   ({out['episode'] / out['forward']:.1f} forwards)")
    print(f"  one full episode, CFG {world.recommended_cfg_scale:g}     {out['episode_cfg'] * 1e3:8.1f} ms   "
          f"({out['episode_cfg'] / out['episode']:.2f}x the base episode)")
    return out


if __name__ == "__main__":
    main(tyro.cli(Config))
