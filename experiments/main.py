"""Sample held-out prompts with the base sampler, CFG and a guidance model; save a PNG grid (the README's).

    bash run.sh py experiments/main.py --out-dir docs      # writes docs/samples.png
    bash run.sh py experiments/main.py --help              # every option

(The README's main job, ``bash run.sh main``, is ``experiments/compare.py``: it trains every algorithm.)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import tyro

from fluxguide.backbones.base import sample_prompts
from fluxguide.backbones.registry import build_backbone
from fluxguide.envs.prompts import resolve_prompts
from fluxguide.harness.grids import save_prompt_grid
from fluxguide.policies import MLPGuidanceModel


@dataclass
class Config:
    out_dir: Path = Path("outputs/main")
    """where the sample grid is written"""
    num_prompts: int = 8
    """held-out prompts to sample (spread evenly over the held-out set)"""
    seed: int = 0
    """seed of the initial noise (shared by every sampler, so columns are paired)"""
    cfg_scale: float = 3.0
    """classifier-free guidance scale of the CFG column"""
    guidance_checkpoint: Path | None = None
    """a guidance model saved with fluxguide.policies.save_guidance_model; default: a fresh MLP (zero output)"""
    guidance_scale: float = 1.0
    """scale of the guidance model's correction"""


def main(cfg: Config) -> None:
    torch.manual_seed(cfg.seed)
    world = build_backbone("shapes")
    held = resolve_prompts("shapes-heldout")
    prompts = [held[i * len(held) // cfg.num_prompts] for i in range(cfg.num_prompts)]
    if cfg.guidance_checkpoint is not None:
        from fluxguide.policies import load_guidance_model

        guidance = load_guidance_model(cfg.guidance_checkpoint)
    else:
        guidance = MLPGuidanceModel(latent_channels=world.latent_channels, hidden_dim=128, num_layers=2,
                                    vec_dim=world.encode([""]).vec.shape[-1])
    guidance.eval()
    columns = {
        "base": sample_prompts(world, prompts, samples_per_prompt=1, seed=cfg.seed)[0],
        f"CFG {cfg.cfg_scale:g}": sample_prompts(world, prompts, samples_per_prompt=1, seed=cfg.seed,
                                                 cfg_scale=cfg.cfg_scale)[0],
        "guided": sample_prompts(world, prompts, samples_per_prompt=1, seed=cfg.seed, guidance_model=guidance,
                                 guidance_scale=cfg.guidance_scale)[0],
    }
    for name, images in columns.items():
        print(f"{name:>8}: verifier passes {int(world.verifier(images, prompts).passed.sum())}/{len(prompts)}")
    path = save_prompt_grid(columns, prompts, cfg.out_dir / "samples.png")
    print(f"wrote {path}")


if __name__ == "__main__":
    main(tyro.cli(Config))
