"""Pretrain the shapes world from scratch: tiny CLIP, tiny Flux transformer, aesthetic head; then evaluate.

Reproduces every weight file shipped in ``fluxguide/backbones/shapes/weights`` on a 2-core CPU machine:

    python experiments/pretrain_shapes_world.py                       # everything, ~45 min on 2 cores
    python experiments/pretrain_shapes_world.py --stages eval         # figures of the weights in --out-dir

Stages run in order; a skipped stage's weights are read from ``--out-dir``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import tyro
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

from fluxguide.backbones.base import Conditioning
from fluxguide.serialization import save_safetensors_atomic, write_json_atomic
from fluxguide.worlds.shapes import heldout_prompts, train_prompts
from fluxguide.worlds.shapes.clip import (
    contrastive_loss,
    create_shapes_clip,
    encode_text_tokens,
    shapes_tokenizer,
)
from fluxguide.worlds.shapes.evaluation import clip_retrieval_accuracy, sample_prompts, verifier_pass_rate
from fluxguide.worlds.shapes.pretraining import ScenePool, augment_for_clip, rectified_flow_loss
from fluxguide.worlds.shapes.quality import degrade, quality_score
from fluxguide.worlds.shapes.scenes import all_prompts, render_prompts
from fluxguide.worlds.shapes.world import WEIGHTS_DIR, ShapesWorld, build_transformer, load_weights

Stage = Literal["clip", "flux", "aesthetic", "eval"]


@dataclass
class Config:
    out_dir: Path = WEIGHTS_DIR
    """folder the weight files and metrics.json are written to (default: the package's shipped weights)"""
    stages: tuple[Stage, ...] = ("clip", "flux", "aesthetic", "eval")
    """stages to run, in order; skipped stages' weights are read from out_dir"""
    seed: int = 0
    """one seed for data, initialisation and evaluation noise"""
    pool_size: int = 40_000
    """number of rendered (image, caption) pairs to train on"""
    clip_steps: int = 1200
    """tiny-CLIP training steps"""
    clip_batch: int = 128
    """tiny-CLIP batch size (the contrastive loss's negatives)"""
    clip_lr: float = 1e-3
    """tiny-CLIP peak learning rate (warm-up, cosine decay to 10%)"""
    flux_steps: int = 5000
    """tiny-Flux rectified-flow training steps"""
    flux_batch: int = 64
    """tiny-Flux batch size"""
    flux_lr: float = 1e-3
    """tiny-Flux peak learning rate (warm-up, cosine decay to 10%)"""
    flux_heads: int = 6
    """attention heads of the transformer (its width is heads x head dim)"""
    flux_head_dim: int = 16
    """attention head width of the transformer; its RoPE axes are split 1/4, 3/8, 3/8"""
    flux_layers: int = 2
    """double-stream (joint text/image) blocks"""
    flux_single_layers: int = 4
    """single-stream blocks"""
    flux_save_every: int = 500
    """write the EMA weights every this many steps, so an interrupted run leaves usable weights"""
    caption_dropout: float = 0.1
    """probability of training on the empty prompt, so classifier-free guidance works"""
    ema_decay: float = 0.999
    """decay of the exponential moving average of the transformer's weights (the shipped weights)"""
    aesthetic_steps: int = 1000
    """aesthetic-head training steps"""
    aesthetic_batch: int = 128
    """aesthetic-head batch size (half rendered, half generated images; half of each degraded)"""
    aesthetic_generated: int = 512
    """generated images (base sampler) mixed into the aesthetic head's training set"""
    eval_samples_per_prompt: int = 4
    """samples per held-out prompt for the verifier pass rates"""
    eval_num_prompts: int | None = None
    """evaluate on the first N held-out prompts only (default: all 90)"""
    cfg_scale: float = 3.0
    """classifier-free guidance scale evaluated against the base sampler"""
    threads: int = 2
    """torch CPU threads (the budget of about 45 minutes assumes two otherwise idle cores)"""


def lr_at(step: int, total: int, peak: float, warmup: int = 200) -> float:
    """Linear warm-up then cosine decay to 10% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def scheduled_steps(opt: torch.optim.Optimizer, steps: int, peak_lr: float, desc: str) -> Iterator[tuple[int, tqdm]]:
    """``steps`` optimizer steps under a progress bar, each with its learning rate (:func:`lr_at`) set."""
    bar = tqdm(range(steps), desc=desc)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, peak_lr)
        yield step, bar


def train_clip(cfg: Config, pool: ScenePool, gen: torch.Generator) -> torch.nn.Module:
    clip = create_shapes_clip()
    clip.train()
    tokenizer = shapes_tokenizer()
    opt = torch.optim.AdamW(clip.parameters(), lr=cfg.clip_lr, weight_decay=0.05)
    for step, bar in scheduled_steps(opt, cfg.clip_steps, cfg.clip_lr, "clip"):
        images, captions = pool.batch(cfg.clip_batch, gen)
        loss = contrastive_loss(clip, augment_for_clip(images, gen), tokenizer(captions), captions)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    clip.eval()
    # Shipped in half precision to keep the package small; figures are measured on the rounded weights.
    save_safetensors_atomic({k: v.half() for k, v in clip.state_dict().items()}, cfg.out_dir / "clip.safetensors")
    return clip


def text_table(clip: torch.nn.Module, prompts: list[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Frozen text features of every caption (and the empty prompt), computed once."""
    tokenizer = shapes_tokenizer()
    with torch.no_grad():
        txt, vec = encode_text_tokens(clip, tokenizer(prompts))
    return {p: (txt[i], vec[i]) for i, p in enumerate(prompts)}


def train_flux(cfg: Config, pool: ScenePool, clip: torch.nn.Module, gen: torch.Generator) -> None:
    table = text_table(clip, all_prompts() + [""])
    h = cfg.flux_head_dim
    flux_config = {"num_attention_heads": cfg.flux_heads, "attention_head_dim": h, "num_layers": cfg.flux_layers, "num_single_layers": cfg.flux_single_layers,
                   "axes_dims_rope": [h // 4, 3 * h // 8, h - h // 4 - 3 * h // 8]}
    write_json_atomic(flux_config, cfg.out_dir / "flux_config.json")
    world = ShapesWorld(clip, build_transformer(flux_config))
    transformer = world.transformer
    transformer.requires_grad_(True).train()
    ema = AveragedModel(transformer, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay))
    opt = torch.optim.AdamW(transformer.parameters(), lr=cfg.flux_lr, weight_decay=0.01)
    for step, bar in scheduled_steps(opt, cfg.flux_steps, cfg.flux_lr, "flux"):
        images, captions = pool.batch(cfg.flux_batch, gen)
        drop = torch.rand(len(captions), generator=gen) < cfg.caption_dropout
        captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
        cond = Conditioning(
            txt=torch.stack([table[c][0] for c in captions]),
            vec=torch.stack([table[c][1] for c in captions]),
            txt_ids=world.txt_ids, img_ids=world.img_ids, prompts=captions,
        )
        loss = rectified_flow_loss(world, world.encode_images(images), cond, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        opt.step()
        ema.update_parameters(transformer)
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
        if (step + 1) % cfg.flux_save_every == 0 or step + 1 == cfg.flux_steps:
            save_safetensors_atomic(ema.module.state_dict(), cfg.out_dir / "flux.safetensors")


def train_aesthetic(cfg: Config, pool: ScenePool, world: ShapesWorld, gen: torch.Generator) -> None:
    from fluxguide.rewards.aesthetic import AestheticPredictor
    from fluxguide.worlds.shapes.clip import normalize_images

    train = train_prompts()
    generated, _ = sample_prompts(world, [train[i % len(train)] for i in range(cfg.aesthetic_generated)],
                                  samples_per_prompt=1, seed=cfg.seed + 1)
    head = AestheticPredictor(input_dim=world.clip_embed_dim, hidden=world.aesthetic_hidden)
    opt = torch.optim.AdamW(head.parameters(), lr=1e-3)
    bar = tqdm(range(cfg.aesthetic_steps), desc="aesthetic")
    for step in bar:
        images, _ = pool.batch(cfg.aesthetic_batch // 2, gen)
        idx = torch.randint(len(generated), (cfg.aesthetic_batch // 2,), generator=gen)
        images = torch.cat([images, generated[idx]])
        images = torch.where(torch.rand(len(images), 1, 1, 1, generator=gen) < 0.5, degrade(images, gen), images)
        with torch.no_grad():
            emb = torch.nn.functional.normalize(world.clip.encode_image(normalize_images(images)), dim=-1)
        loss = torch.nn.functional.mse_loss(head(emb), quality_score(images))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    save_safetensors_atomic(head.state_dict(), cfg.out_dir / "aesthetic.safetensors")


def evaluate(cfg: Config, world: ShapesWorld) -> dict:
    held = heldout_prompts()[: cfg.eval_num_prompts]
    images, scenes = render_prompts([p for p in held for _ in range(4)], seed=cfg.seed + 2)
    prompts = [s.caption for s in scenes]
    metrics = {
        "clip_retrieval_accuracy_heldout": clip_retrieval_accuracy(world, images, prompts, all_prompts()),
        "clip_retrieval_chance": 1 / len(all_prompts()),
    }
    kw = {"samples_per_prompt": cfg.eval_samples_per_prompt, "seed": cfg.seed + 3}
    t0 = time.perf_counter()
    metrics["base"] = verifier_pass_rate(world, held, **kw)
    metrics["base_seconds"] = time.perf_counter() - t0
    metrics["cfg"] = verifier_pass_rate(world, held, cfg_scale=cfg.cfg_scale, **kw)
    metrics["cfg_scale"] = cfg.cfg_scale
    metrics["num_steps"] = world.default_num_steps
    return metrics


def main(cfg: Config) -> None:
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    pool = ScenePool.generate(cfg.pool_size, cfg.seed) if set(cfg.stages) - {"eval"} else None
    clip = None
    if "clip" in cfg.stages:
        clip = train_clip(cfg, pool, gen)
    if "flux" in cfg.stages:
        if clip is None:
            clip = create_shapes_clip()
        clip.load_state_dict({k: v.float() for k, v in load_weights(cfg.out_dir / "clip.safetensors").items()})
        train_flux(cfg, pool, clip, gen)
    world = ShapesWorld.pretrained(cfg.out_dir)
    if "aesthetic" in cfg.stages:
        train_aesthetic(cfg, pool, world, gen)
    if "eval" in cfg.stages:
        metrics = evaluate(cfg, world)
        metrics["config"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(cfg).items() if k != "out_dir"}
        write_json_atomic(metrics, cfg.out_dir / "metrics.json")
        print(
            f"held-out verifier pass rate: base {metrics['base']['pass_rate']:.3f}, "
            f"CFG {cfg.cfg_scale:g} {metrics['cfg']['pass_rate']:.3f}; "
            f"CLIP retrieval {metrics['clip_retrieval_accuracy_heldout']:.3f} "
            f"(chance {metrics['clip_retrieval_chance']:.4f})"
        )


if __name__ == "__main__":
    main(tyro.cli(Config))
