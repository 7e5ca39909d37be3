"""Wall time of one full episode through each env face, divided by the bare ``denoise`` loop (issue 5).

All runs use the same model (the shapes world: pretrained if its weights are there, else randomly
initialised), the same batch and the same schedule, and zero actions (so every face computes exactly the
base sampler's trajectory). Timed per episode:

* ``bare``: :func:`fluxguide.sampling.denoise` alone (prompts already encoded, noise already drawn);
* ``bare+reward``: the same plus ``decode``, the env's reward (``"shapes-clip"``) and the verifier;
* ``torchrl``: ``GuidanceTorchRLEnv.rollout(num_steps, policy, return_contiguous=False)`` from reset, with
  the env's defaults (reward ``"shapes-clip"`` and the verifier in ``info``);
* ``torchrl-noverify``: the same with ``verify=False`` (the verifier is logging, not the reward);
* ``vector`` / ``vector-noverify``: ``GuidanceVectorEnv.reset`` + ``num_steps`` ``step`` calls (numpy);
* ``gym@1``: ``GuidanceEnv`` (one trajectory), against ``bare@1``, the bare loop at batch 1.

Every env episode includes what the bare loop leaves out: encoding the prompts, drawing the noise, decoding,
and the reward. Faces run round-robin, ``--repeats`` rounds; ``ratio`` is the median over rounds of the
face's time divided by the reference's time in the same round (robust to load from other processes that
drifts over a run), with the spread of those paired ratios in brackets. torch runs on ``--threads``
threads (default 1: on a shared 2-core machine two threads oversubscribe and make timings swing ~10x).
Run::

    .venv/bin/python benchmarks/env_overhead.py --batch 32 --num-steps 20 --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from fluxguide.backbones.base import Backbone
from fluxguide.backbones.registry import build_backbone
from fluxguide.envs.prompts import resolve_prompts
from fluxguide.envs import GuidanceCore, GuidanceEnv, GuidanceTorchRLEnv, GuidanceVectorEnv
from fluxguide import keys
from fluxguide.sampling import denoise


def load_world(device: str, weights_dir: Path | None) -> tuple[Backbone, str]:
    try:
        return build_backbone("shapes", weights_dir=weights_dir, device=device), f"pretrained, {weights_dir or 'shipped'}"
    except FileNotFoundError:
        return build_backbone("shapes-random", device=device), "random (weights not built yet)"


def timed(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--num-steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--weights-dir", type=Path, default=None, help="shapes-world weights (default: shipped)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    world, source = load_world(args.device, args.weights_dir)
    b, n = args.batch, args.num_steps

    core_kwargs = {"num_steps": n}  # env defaults otherwise: reward "shapes-clip", verifier on
    torchrl_env = GuidanceTorchRLEnv(world, batch_size=b, **core_kwargs)
    torchrl_env_nv = GuidanceTorchRLEnv(world, batch_size=b, verify=False, **core_kwargs)
    vector_env = GuidanceVectorEnv(b, world, **core_kwargs)
    vector_env_nv = GuidanceVectorEnv(b, world, verify=False, **core_kwargs)
    gym_env = GuidanceEnv(world, **core_kwargs)
    reward_core = GuidanceCore(world, batch_size=b, **core_kwargs)  # for the bare+reward reference

    train = resolve_prompts("shapes-train")
    prompts = [train[i % len(train)] for i in range(b)]
    cond = world.encode(prompts)
    cond1 = world.encode(prompts[:1])
    timesteps = world.schedule(n)
    gen = torch.Generator().manual_seed(0)
    noise = world.noise(b, gen)
    noise1 = world.noise(1, gen)
    zero_td_action = torch.zeros(b, *world.latent_shape, device=device)
    zero_np = np.zeros((b, *world.latent_shape), np.float32)
    zero_np1 = np.zeros(world.latent_shape, np.float32)

    def bare(c=cond, x=noise) -> torch.Tensor:
        return denoise(world, x, c.img_ids, c.txt, c.txt_ids, c.vec, timesteps, guidance=None)

    def bare_reward() -> None:
        with torch.no_grad():
            images = world.decode(bare())
            reward_core.reward(images, prompts)
            world.verifier(images.cpu(), prompts)

    def torchrl_episode(env: GuidanceTorchRLEnv = torchrl_env) -> None:
        env.rollout(n, lambda td: td.set(keys.ACTION, zero_td_action), return_contiguous=False)

    def vector_episode(env: GuidanceVectorEnv = vector_env) -> None:
        env.reset()
        for _ in range(n):
            env.step(zero_np)

    def gym_episode() -> None:
        gym_env.reset()
        for _ in range(n):
            gym_env.step(zero_np1)

    faces = {
        "bare": bare,
        "bare+reward": bare_reward,
        "torchrl": torchrl_episode,
        "torchrl-noverify": lambda: torchrl_episode(torchrl_env_nv),
        "vector": vector_episode,
        "vector-noverify": lambda: vector_episode(vector_env_nv),
        "bare@1": lambda: bare(cond1, noise1),
        "gym@1": gym_episode,
    }
    torchrl_env.set_seed(0)
    torchrl_env_nv.set_seed(0)
    vector_env.reset(seed=0)
    vector_env_nv.reset(seed=0)
    gym_env.reset(seed=0)
    with torch.no_grad():  # warm up kernels and caches (one model call per batch size, the text cache)
        world.velocity(noise, 1.0, cond)
        world.velocity(noise1, 1.0, cond1)
    bare_reward()
    times: dict[str, list[float]] = {name: [] for name in faces}
    for _ in range(args.repeats):
        for name, fn in faces.items():
            times[name].append(timed(fn, device))

    print(f"shapes world ({source}), device {device}, batch {b}, {n} steps, {args.repeats} repeats, "
          f"{torch.get_num_threads()} threads")
    print(f"{'face':<17} {'best s':>8} {'median s':>9}  {'ratio':>6}  [paired ratios: min .. max]")
    for name, ts in times.items():
        ref = times["bare@1" if name.endswith("@1") else "bare"]
        paired = [t / r for t, r in zip(ts, ref)]  # same round: the same load on the machine
        print(
            f"{name:<17} {min(ts):8.3f} {statistics.median(ts):9.3f}  {statistics.median(paired):6.3f}  "
            f"[{min(paired):.3f} .. {max(paired):.3f}]"
        )


if __name__ == "__main__":
    main()
