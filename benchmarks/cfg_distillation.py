"""What CFG distillation buys: sampling time per episode of the distilled guidance policy against CFG's.

One run samples the same held-out prompts, with the same noise, with three samplers on the shapes world:

- ``base``:   the base model, one call per step;
- ``CFG``:    classifier-free guidance, two model evaluations per step (one batched call of twice the size);
- ``guided``: the base model plus the guidance policy (one base call and one small network per step).

Times are wall-clock per episode (one image), measured round-robin (base, CFG, guided, base, ...) so load
changes on a shared machine hit all three alike; the median over repeats is reported, with the ratio
``guided / CFG``. With a trained policy (``--guidance-checkpoint``, default the output of
``experiments/train_bc.py``) it also prints the held-out verifier pass rate of each sampler and the fraction
of CFG's gain over the base sampler that the policy recovers. Without one, a fresh policy of the same
architecture gives the same timing (its weights do not change its cost).

Run::

    .venv/bin/python benchmarks/cfg_distillation.py
    .venv/bin/python benchmarks/cfg_distillation.py --guidance-checkpoint runs/bc/cfg_distillation/guidance.safetensors
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import tyro

from fluxguide.backbones.base import Backbone, sample_prompts
from fluxguide.backbones.registry import build_backbone
from fluxguide.envs.prompts import resolve_prompts
from fluxguide.policies import AttentionGuidanceModel, BaseGuidanceModel, load_guidance_model


@dataclass
class Config:
    guidance_checkpoint: Path = Path("runs/bc/cfg_distillation/guidance.safetensors")
    """the distilled policy (fluxguide.policies.save_guidance_model); if missing, a fresh one (timing only)"""
    weights_dir: Path | None = None
    """folder of the shapes world's weights (default: the ones shipped in the package)"""
    cfg_scale: float | None = None
    """CFG scale (the one the policy was distilled from; default: the world's recommended scale, 3)"""
    guidance_scale: float = 1.0
    """scale of the distilled policy's correction (an MSE-trained student under-shoots its targets a little;
    a scale above 1 makes up for it at no extra cost)"""
    num_steps: int = 20
    """sampling steps"""
    batch: int = 64
    """episodes sampled together in one timed call"""
    repeats: int = 5
    """timed calls per sampler (after one warm-up call each)"""
    eval_samples_per_prompt: int = 4
    """samples per held-out prompt for the pass rates (0 skips them)"""
    threads: int = 1
    """torch CPU threads"""
    seed: int = 0
    """seed of the noise"""


def load_world(weights_dir: Path | None) -> tuple[Backbone, bool]:
    """The pretrained shapes world, or (when its weights are absent) a random one for timing only."""
    try:
        return build_backbone("shapes", weights_dir=weights_dir), True
    except FileNotFoundError:
        return build_backbone("shapes-random"), False


def load_policy(cfg: Config, world: Backbone) -> tuple[BaseGuidanceModel, bool]:
    if cfg.guidance_checkpoint.is_file():
        return load_guidance_model(cfg.guidance_checkpoint).eval(), True
    cond = world.encode(["a red circle"])
    side = int(world.latent_seq**0.5)
    fresh = AttentionGuidanceModel(hidden_dim=64, num_heads=4, num_layers=2, latent_channels=world.latent_channels,
                                   txt_dim=cond.txt.shape[-1], vec_dim=cond.vec.shape[-1], mlp_ratio=2.0,
                                   grid_size=(side, side))
    return fresh.eval(), False


def main(cfg: Config) -> dict[str, float]:
    torch.set_num_threads(cfg.threads)
    world, pretrained = load_world(cfg.weights_dir)
    policy, trained = load_policy(cfg, world)
    held = resolve_prompts("shapes-heldout")
    if cfg.cfg_scale is None:
        cfg.cfg_scale = float(world.recommended_cfg_scale)
    prompts = [held[i % len(held)] for i in range(cfg.batch)]
    noise = torch.randn((cfg.batch, *world.latent_shape), generator=torch.Generator().manual_seed(cfg.seed))
    samplers = {
        "base": {},
        f"CFG {cfg.cfg_scale:g}": {"cfg_scale": cfg.cfg_scale},
        "guided": {"guidance_model": policy, "guidance_scale": cfg.guidance_scale},
    }
    times: dict[str, list[float]] = {name: [] for name in samplers}
    for name, kw in samplers.items():  # warm-up
        world.sample(prompts, num_steps=cfg.num_steps, noise=noise, **kw)
    for _ in range(cfg.repeats):
        for name, kw in samplers.items():
            t0 = time.perf_counter()
            world.sample(prompts, num_steps=cfg.num_steps, noise=noise, **kw)
            times[name].append((time.perf_counter() - t0) / cfg.batch)
    per_episode = {name: statistics.median(v) for name, v in times.items()}
    cfg_name = f"CFG {cfg.cfg_scale:g}"
    policy_params = sum(p.numel() for p in policy.parameters())
    print(f"shapes world ({'pretrained' if pretrained else 'random weights'}), {cfg.num_steps} steps, batch "
          f"{cfg.batch}, {torch.get_num_threads()} thread(s); policy {type(policy).__name__} "
          f"({policy_params:,} parameters, {'trained: ' + str(cfg.guidance_checkpoint) if trained else 'untrained'}"
          f", guidance scale {cfg.guidance_scale:g})")
    print(f"{'sampler':>10} | ms / episode | vs CFG")
    for name, t in per_episode.items():
        print(f"{name:>10} | {1000 * t:12.2f} | {t / per_episode[cfg_name]:.3f}")
    out = {f"ms_per_episode/{k}": 1000 * v for k, v in per_episode.items()}
    out["guided_over_cfg_time"] = per_episode["guided"] / per_episode[cfg_name]
    print(f"guided sampler time per episode / CFG's: {out['guided_over_cfg_time']:.3f}")
    if pretrained and trained and cfg.eval_samples_per_prompt > 0:
        per_image = {}
        for name, kw in samplers.items():
            images, all_prompts = sample_prompts(world, held, samples_per_prompt=cfg.eval_samples_per_prompt,
                                                 seed=cfg.seed + 12345, num_steps=cfg.num_steps, **kw)
            result = world.verifier(images, all_prompts)
            per_image[name] = {
                "pass rate": result.passed.float(),
                "attribute accuracy": torch.stack([v.float() for v in result.scores.values()]).mean(0),
            }
        n = len(held) * cfg.eval_samples_per_prompt
        print(f"held-out verifier, {n} images (same noise for every sampler); attribute accuracy is the mean of "
              f"count, colour, kind and position")
        # Paired bootstrap over images: the three samplers share noise, so resample the same images for all.
        g = torch.Generator().manual_seed(cfg.seed)
        boot = torch.randint(n, (1000, n), generator=g)
        for label in ("pass rate", "attribute accuracy"):
            values = {k: float(v[label].mean()) for k, v in per_image.items()}
            print(f"  {label}: " + ", ".join(f"{k} {v:.3f}" for k, v in values.items()))
            out.update({f"{label}/{k}": v for k, v in values.items()})
            gain = values[cfg_name] - values["base"]
            if gain <= 0:
                print(f"  CFG does not raise the {label} over the base sampler ({gain:+.3f}): no gain to recover")
                continue
            recovered = (values["guided"] - values["base"]) / gain
            b = {k: v[label][boot].mean(1) for k, v in per_image.items()}
            ratios = (b["guided"] - b["base"]) / (b[cfg_name] - b["base"])
            lo, hi = torch.quantile(ratios[torch.isfinite(ratios)], torch.tensor([0.05, 0.95])).tolist()
            out[f"cfg_gain_recovered/{label}"] = recovered
            print(f"  fraction of CFG's {label} gain recovered by the guided sampler: {recovered:.3f} "
                  f"(paired bootstrap 90% interval {lo:.2f} to {hi:.2f})")
    return out


if __name__ == "__main__":
    main(tyro.cli(Config))
