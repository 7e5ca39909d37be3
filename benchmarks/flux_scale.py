"""What every algorithm costs at FLUX.1-dev size: time and peak memory of sampling, guidance, reward-gradient
and PPO updates, with random components built from the published configurations (issue 22).

Nothing is downloaded: the ``FluxTransformer2DModel`` (FLUX.1-dev: 19 double + 38 single blocks, 24 heads of
128, guidance embedding), the ``AutoencoderKL`` (16 latent channels), the T5-XXL encoder, the CLIP-L text model
and a ViT-L/14 open_clip reward are built from their configurations with random weights, directly on
``--device`` in ``--dtype``. A random model costs the same time and memory as the trained one. The tokenizers
are stand-ins (:class:`StandInTokenizer`: words hashed into the real vocabulary size, padded to the real
length: 77 CLIP tokens, 512 T5 tokens), so the encoders see inputs of the real shape.

Measured, one JSON line per figure (``{"figure", "value", "unit", ...}``) and a table at the end:

1. parameters and weight bytes of every Flux-dev component (built on the ``meta`` device: exact, no memory);
2. activations one sampling step keeps for backward, per image (a ``meta``-device forward whose saved tensors
   are counted with ``torch.autograd.graph.saved_tensors_hooks``), for the transformer, the VAE decoder and
   the CLIP reward: the inputs of the memory model in docs/scaling.md;
3. one base forward at ``--height`` x ``--width``; a ``--steps`` episode without guidance and with each
   guidance architecture (``build_policy``), its ratio to the unguided episode, and one guidance forward as a
   fraction of a base forward;
4. one :class:`~fluxguide.algos.RewardGradient` update (sampling with a graph through the last K steps,
   decoding, the CLIP reward, backward, optimizer step) for each K in ``--ks``, with and without per-step
   gradient checkpointing (and K = steps with the transformer's per-block checkpointing on top): time and
   peak memory (``torch.cuda.max_memory_allocated`` on CUDA, absolute, weights included; on the CPU the peak
   of live tensor storages created during the update, ``LiveTensorMemory``, weights excluded);
5. one :class:`~fluxguide.algos.PPO` update at ``--ppo-batch`` trajectories (collection and loss);
6. one ``GuidanceTorchRLEnv`` episode against the bare loop plus decoding and the reward.

An update that runs out of GPU memory is reported with ``"value": null, "status": "oom"``.

Run::

    .venv/bin/python benchmarks/flux_scale.py --size tiny                 # CPU, seconds (the test suite runs it)
    python benchmarks/flux_scale.py --size dev --device cuda              # one 80 GB GPU, bf16, < 8 minutes
"""

from __future__ import annotations

import gc
import json
import math
import sys
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal

import torch
import torch.nn.functional as F
import tyro
from diffusers import AutoencoderKL, FluxTransformer2DModel
from torch import nn
from torch.overrides import TorchFunctionMode
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from checkpoint_memory import LiveTensorMemory

from fluxguide import keys
from fluxguide.algos import PPO, PPOConfig, RewardGradient, RewardGradientConfig
from fluxguide.backbones.flux import FluxBackbone
from fluxguide.backbones.registry import TINY_CLIP_CFG
from fluxguide.envs import GuidanceTorchRLEnv
from fluxguide.policies import make_probabilistic_actor
from fluxguide.policies.registry import build_policy
from fluxguide.rewards import CLIPScore, load_open_clip
from fluxguide.sampling import denoise
from fluxguide.sampling.packing import make_img_ids, make_txt_ids

# ------------------------------------------------------------------------------------ published configurations


@dataclass(frozen=True)
class Sizes:
    """The configurations of every component, as their ``config.json`` files spell them."""

    transformer: dict[str, Any]
    vae: dict[str, Any]
    t5: dict[str, Any]
    clip_text: dict[str, Any]
    reward_name: str
    reward_cfg: dict[str, Any] | None
    height: int
    width: int
    max_sequence_length: int


DEV = Sizes(
    # black-forest-labs/FLUX.1-dev transformer/config.json
    transformer={"patch_size": 1, "in_channels": 64, "num_layers": 19, "num_single_layers": 38,
                 "attention_head_dim": 128, "num_attention_heads": 24, "joint_attention_dim": 4096,
                 "pooled_projection_dim": 768, "guidance_embeds": True, "axes_dims_rope": (16, 56, 56)},
    # vae/config.json
    vae={"in_channels": 3, "out_channels": 3, "down_block_types": ("DownEncoderBlock2D",) * 4,
         "up_block_types": ("UpDecoderBlock2D",) * 4, "block_out_channels": (128, 256, 512, 512),
         "layers_per_block": 2, "latent_channels": 16, "norm_num_groups": 32, "sample_size": 1024,
         "scaling_factor": 0.3611, "shift_factor": 0.1159, "use_quant_conv": False, "use_post_quant_conv": False},
    # text_encoder_2/config.json (google/t5-v1_1-xxl's encoder)
    t5={"vocab_size": 32128, "d_model": 4096, "d_kv": 64, "d_ff": 10240, "num_layers": 24, "num_heads": 64,
        "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128,
        "feed_forward_proj": "gated-gelu", "tie_word_embeddings": False, "pad_token_id": 0, "eos_token_id": 1},
    # text_encoder/config.json (openai/clip-vit-large-patch14's text tower)
    clip_text={"vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
               "num_attention_heads": 12, "max_position_embeddings": 77, "projection_dim": 768,
               "hidden_act": "quick_gelu", "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 1},
    reward_name="ViT-L-14",
    reward_cfg=None,
    height=1024,
    width=1024,
    max_sequence_length=512,
)

TINY = Sizes(  # the shapes of fluxguide/backbones/tiny_flux.py and the "tiny-flux" backbone
    transformer={"patch_size": 1, "in_channels": 16, "num_layers": 1, "num_single_layers": 1,
                 "attention_head_dim": 16, "num_attention_heads": 2, "joint_attention_dim": 32,
                 "pooled_projection_dim": 32, "guidance_embeds": True, "axes_dims_rope": (4, 6, 6)},
    vae={**DEV.vae, "block_out_channels": (8,) * 4, "layers_per_block": 1, "latent_channels": 4,
         "norm_num_groups": 4, "sample_size": 64},
    t5={**DEV.t5, "vocab_size": 1000, "d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 2, "num_heads": 4,
        "relative_attention_num_buckets": 8, "relative_attention_max_distance": 32},
    clip_text={**DEV.clip_text, "vocab_size": 1000, "hidden_size": 32, "intermediate_size": 64,
               "num_hidden_layers": 2, "num_attention_heads": 4, "projection_dim": 32, "hidden_act": "gelu",
               "bos_token_id": 998, "eos_token_id": 999},
    reward_name="fluxguide-tiny-random-clip",
    reward_cfg=TINY_CLIP_CFG,
    height=64,
    width=64,
    max_sequence_length=16,
)


class StandInTokenizer:
    """Token ids of the real length and vocabulary without a vocabulary file (nothing to download).

    Each word maps to ``crc32(word) % vocab`` (clear of the special ids), between an optional BOS and an EOS,
    padded or truncated to ``max_length``. Speed and memory depend on the ids' shape, not on their meaning.
    """

    def __init__(self, vocab_size: int, model_max_length: int, eos_id: int, pad_id: int, bos_id: int | None = None):
        self.vocab_size, self.model_max_length = vocab_size, model_max_length
        self.eos_id, self.pad_id, self.bos_id = eos_id, pad_id, bos_id

    def __len__(self) -> int:
        return self.vocab_size

    def __call__(self, prompts: list[str], *, max_length: int | None = None, **_: Any) -> SimpleNamespace:
        length = max_length or self.model_max_length
        special = {self.eos_id, self.pad_id, self.bos_id}
        rows = []
        for prompt in prompts:
            words = [zlib.crc32(w.encode()) % self.vocab_size for w in prompt.split()]
            ids = ([self.bos_id] if self.bos_id is not None else []) + [w for w in words if w not in special]
            ids = ids[: length - 1] + [self.eos_id]
            rows.append(ids + [self.pad_id] * (length - len(ids)))
        return SimpleNamespace(input_ids=torch.tensor(rows, dtype=torch.long))


@contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Create floating-point parameters in ``dtype`` (no float32 copy of a 12 B model on the way)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def build_modules(sizes: Sizes, device: str, dtype: torch.dtype, seed: int = 0) -> tuple[dict[str, nn.Module], Any]:
    """Every component with random weights, created on ``device`` in ``dtype`` (``"meta"``: shapes only), and
    the reward's open_clip tokenizer (its BPE vocabulary ships inside open_clip)."""
    torch.manual_seed(seed)
    with torch.device(device), default_dtype(dtype):
        modules = {
            "transformer": FluxTransformer2DModel(**sizes.transformer),
            "vae": AutoencoderKL(**sizes.vae),
            "t5": T5EncoderModel(T5Config(**sizes.t5)),
            "clip_text": CLIPTextModel(CLIPTextConfig(**sizes.clip_text)),
        }
    precision = {torch.bfloat16: "pure_bf16", torch.float16: "pure_fp16"}.get(dtype, "fp32")
    modules["clip_reward"], tokenizer = load_open_clip(sizes.reward_name, None, model_cfg=sizes.reward_cfg,
                                                       device=device, precision=precision)
    return {name: m.eval().requires_grad_(False) for name, m in modules.items()}, tokenizer


def build_backbone(sizes: Sizes, modules: dict[str, nn.Module], height: int, width: int, steps: int) -> FluxBackbone:
    clip_cfg, t5_cfg = modules["clip_text"].config, modules["t5"].config
    return FluxBackbone(
        modules["transformer"], modules["vae"],
        modules["clip_text"], StandInTokenizer(clip_cfg.vocab_size, clip_cfg.max_position_embeddings,
                                               clip_cfg.eos_token_id, clip_cfg.pad_token_id, clip_cfg.bos_token_id),
        modules["t5"], StandInTokenizer(t5_cfg.vocab_size, sizes.max_sequence_length, t5_cfg.eos_token_id,
                                        t5_cfg.pad_token_id),
        height=height, width=width, max_sequence_length=sizes.max_sequence_length, num_steps=steps,
    )


# ----------------------------------------------------------------------------------------------- measurement


class Report:
    """Figures as JSON lines as they are measured, and a table at the end."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def add(self, figure: str, value: float | None, unit: str, **extra: Any) -> None:
        if isinstance(value, float):
            value = float(f"{value:.6g}")
        row = {"figure": figure, "value": value, "unit": unit, **extra}
        print(json.dumps(row), flush=True)
        self.rows.append(row)

    def table(self) -> str:
        lines = [f"{'figure':<44} {'value':>14} unit"]
        for r in self.rows:
            value = r.get("status", "n/a") if r["value"] is None else f"{r['value']:.6g}"
            lines.append(f"{r['figure']:<44} {value:>14} {r['unit']}")
        return "\n".join(lines)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_time(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """The best wall time of ``repeats`` calls, synchronised on CUDA."""
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return min(times)


def time_and_peak(fn: Callable[[], object], device: torch.device, repeats: int) -> tuple[float, float | None]:
    """Best time (s) and peak memory (MiB) of ``fn``: absolute ``max_memory_allocated`` on CUDA (weights
    included); on the CPU the peak of live tensor storages created during one call (weights excluded);
    ``(nan, None)`` if CUDA runs out of memory."""
    try:
        if device.type == "cuda":
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            seconds = best_time(fn, device, 1)
            peak = torch.cuda.max_memory_allocated(device)
            if repeats > 1:
                seconds = min(seconds, best_time(fn, device, repeats - 1))
            return seconds, peak / 2**20
        tracker = LiveTensorMemory()
        with tracker:
            fn()
        return best_time(fn, device, repeats), tracker.peak / 2**20
    except torch.OutOfMemoryError:
        gc.collect()
        torch.cuda.empty_cache()
        return math.nan, None


class FlashAttentionOnMeta(TorchFunctionMode):
    """Route ``scaled_dot_product_attention`` to the flash kernel's ``meta`` implementation, so a ``meta`` count
    keeps what flash attention keeps on a GPU (q, k, v, the output and the log-sum-exp) instead of the math
    backend's float32 attention matrix. Heads wider than 256 (the VAE's one 512-wide head), which flash does
    not take, stay on the math backend."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            named = dict(zip(("query", "key", "value", "attn_mask", "dropout_p", "is_causal"), args), **kwargs)
            q, k, v = named["query"], named["key"], named["value"]
            if named.get("attn_mask") is None and not named.get("is_causal") and q.shape[-1] <= 256:
                return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False,
                                                                          scale=named.get("scale"))[0]
        return func(*args, **kwargs)


def saved_for_backward(fn: Callable[[], torch.Tensor], params: set[int]) -> int:
    """Bytes of the tensors autograd keeps for backward while running ``fn`` on the ``meta`` device (nothing is
    allocated), with flash attention. Parameters (and views of them) are not counted; a tensor saved by several
    autograd nodes counts once."""
    seen: dict[int, torch.Tensor] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        base = t if t._base is None else t._base
        if id(base) not in params:
            seen[id(base)] = base
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), FlashAttentionOnMeta():
        out = fn()
    del out
    return sum(t.numel() * t.element_size() for t in seen.values())


def memory_model_inputs(report: Report, sizes: Sizes, label: str, height: int, width: int, dtype: torch.dtype) -> None:
    """Parameters and weight bytes of every component, and the activations one image keeps for backward in
    one transformer forward, one VAE decode and one CLIP reward, counted on the ``meta`` device."""
    modules, _ = build_modules(sizes, "meta", dtype)
    for name, module in modules.items():
        n = sum(p.numel() for p in module.parameters())
        report.add(f"params_{name}", n, "parameters", size=label)
        report.add(f"weights_{name}", n * torch.finfo(dtype).bits / 8 / 2**30, "GiB", size=label, dtype=str(dtype))
    transformer, vae, clip = modules["transformer"], modules["vae"], modules["clip_reward"]
    tcfg = transformer.config
    grid_h, grid_w = height // 16, width // 16
    seq, txt_len = grid_h * grid_w, sizes.max_sequence_length
    meta = {"device": "meta", "dtype": dtype}
    img = torch.empty(1, seq, tcfg.in_channels, **meta, requires_grad=True)

    def transformer_forward() -> torch.Tensor:
        return transformer(hidden_states=img, encoder_hidden_states=torch.empty(1, txt_len, tcfg.joint_attention_dim, **meta),
                           pooled_projections=torch.empty(1, tcfg.pooled_projection_dim, **meta),
                           timestep=torch.ones(1, **meta), guidance=torch.ones(1, **meta),
                           img_ids=make_img_ids(grid_h, grid_w, device="meta"),
                           txt_ids=make_txt_ids(txt_len, device="meta"), return_dict=False)[0]

    latent = torch.empty(1, vae.config.latent_channels, height // 8, width // 8, **meta, requires_grad=True)
    size = clip.visual.image_size
    pixels = torch.empty(1, 3, *(size if isinstance(size, tuple) else (size, size)), **meta, requires_grad=True)
    counts = {
        "transformer": (transformer, transformer_forward),
        "vae_decode": (vae, lambda: vae.decode(latent, return_dict=False)[0]),
        "clip_reward": (clip, lambda: clip.encode_image(pixels)),
    }
    for name, (module, fn) in counts.items():
        saved = saved_for_backward(fn, {id(p) for p in module.parameters()})
        report.add(f"saved_per_image_{name}", saved / 2**20, "MiB", size=label, height=height, width=width,
                   dtype=str(dtype))


# ----------------------------------------------------------------------------------------------------- config


@dataclass
class Config:
    """What to measure and at which size. ``--size dev --device cuda`` is the real thing (< 8 minutes on one
    H100); ``--size tiny`` runs the same code on the CPU in seconds."""

    size: Literal["tiny", "dev"] = "tiny"
    """'dev': FLUX.1-dev's configurations (GPU); 'tiny': the tiny_flux shapes (CPU, seconds)"""
    device: str = "cpu"
    """torch device"""
    dtype: Literal["bf16", "fp32"] | None = None
    """model dtype (default: bf16 on CUDA, fp32 elsewhere); the sampler and the policies stay float32"""
    height: int | None = None
    """image height in pixels (default: 1024 for dev, 64 for tiny)"""
    width: int | None = None
    """image width in pixels (default: as height)"""
    steps: int = 28
    """sampling steps per episode"""
    batch: int = 1
    """images per episode and per reward-gradient update"""
    ppo_batch: int = 4
    """trajectories per PPO update (two prompts, two samples each at the default)"""
    ks: tuple[int, ...] = (1, 4, 28)
    """reward-gradient truncations K (clipped to steps)"""
    policies: tuple[str, ...] = ("mlp", "attention", "conv", "affine")
    """guidance architectures of the episode figures"""
    train_policy: str = "mlp"
    """guidance architecture of the reward-gradient and PPO updates"""
    hidden_dim: int = 64
    """policy width (build_policy's default)"""
    repeats: int = 1
    """timed repeats per figure (best of); each setting also runs once untimed as warm-up where cheap"""
    threads: int = 1
    """CPU threads (1 is steadiest on a shared machine)"""
    seed: int = 0
    """seed of the random weights, the prompts' noise and the policies"""
    skip_memory_model: bool = False
    """skip the meta-device parameter and activation counts"""


# ------------------------------------------------------------------------------------------------------- main


def main(cfg: Config) -> list[dict[str, Any]]:
    torch.set_num_threads(cfg.threads)
    device = torch.device(cfg.device)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32, None: None}[cfg.dtype]
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    sizes = DEV if cfg.size == "dev" else TINY
    height = cfg.height or sizes.height
    width = cfg.width or height if cfg.height else sizes.width
    report = Report()
    setting = {"size": cfg.size, "device": str(device), "dtype": str(dtype), "height": height, "width": width}
    if device.type == "cuda":
        setting["card"] = torch.cuda.get_device_name(device)

    # 1-2. The memory model's inputs, counted on the meta device: Flux-dev always, and this size to compare.
    if not cfg.skip_memory_model:
        memory_model_inputs(report, DEV, "dev", DEV.height, DEV.width, torch.bfloat16)
        if cfg.size == "tiny":
            memory_model_inputs(report, TINY, "tiny", height, width, dtype)

    start = time.perf_counter()
    modules, clip_tokenizer = build_modules(sizes, cfg.device, dtype, cfg.seed)
    backbone = build_backbone(sizes, modules, height, width, cfg.steps)
    reward = CLIPScore(modules["clip_reward"], clip_tokenizer)
    report.add("build", time.perf_counter() - start, "s", **setting)
    prompts = [f"a photo of object number {i} on a table" for i in range(max(cfg.batch, cfg.ppo_batch))]
    cond = backbone.encode(prompts[: cfg.batch])
    timesteps = backbone.schedule(cfg.steps)
    noise = backbone.noise(cfg.batch, torch.Generator(device).manual_seed(cfg.seed))
    guidance = backbone.default_guidance

    # 3. Base forward, episodes with and without guidance, one guidance forward.
    t_vec = torch.full((cfg.batch,), timesteps[0], device=device)
    g_vec = torch.full((cfg.batch,), guidance, device=device)

    def base_forward() -> torch.Tensor:
        return backbone(noise, cond.img_ids, cond.txt, cond.txt_ids, t_vec, cond.vec, g_vec)

    def episode(policy: nn.Module | None = None) -> torch.Tensor:
        return denoise(backbone, noise, cond.img_ids, cond.txt, cond.txt_ids, cond.vec, timesteps,
                       guidance=guidance, guidance_model=policy)

    with torch.no_grad():
        pred = base_forward()  # warm-up
        base_s = best_time(base_forward, device, max(cfg.repeats, 2))
        report.add("base_forward", base_s, "s", batch=cfg.batch, tokens=backbone.latent_seq, **setting)
        unguided_s = best_time(episode, device, cfg.repeats)
        report.add("episode_unguided", unguided_s, "s", steps=cfg.steps, batch=cfg.batch, **setting)
        for name in cfg.policies:
            policy = build_policy(name, backbone, hidden_dim=cfg.hidden_dim).eval()
            params = sum(p.numel() for p in policy.parameters())
            policy_s = best_time(lambda p=policy: p(noise, pred, cond.txt, cond.vec, t_vec, 0), device,
                                 max(cfg.repeats, 3))
            guided_s = best_time(lambda p=policy: episode(p), device, cfg.repeats)
            extra = {"policy": name, "policy_params": params, **setting}
            report.add(f"episode_{name}", guided_s, "s", steps=cfg.steps, batch=cfg.batch, **extra)
            report.add(f"episode_ratio_{name}", guided_s / unguided_s, "x unguided episode", **extra)
            report.add(f"guidance_forward_fraction_{name}", policy_s / base_s, "x base forward", **extra)
            del policy

    # 4. Reward-gradient updates: K last steps with a graph, with and without per-step checkpointing.
    policy = build_policy(cfg.train_policy, backbone, hidden_dim=cfg.hidden_dim)
    algo = RewardGradient(backbone, policy, reward, torch.optim.AdamW(policy.parameters(), lr=1e-5),
                          RewardGradientConfig(num_steps=cfg.steps))
    rg_prompts = prompts[: cfg.batch]
    algo.encode(rg_prompts)  # the text cache, outside the timings
    unit = "MiB (peak allocated, weights included)" if device.type == "cuda" else "MiB (live tensors created)"
    no_ckpt_peaks: dict[int, float] = {}
    settings = [(k, ckpt, False) for k in sorted({min(k, cfg.steps) for k in cfg.ks}) for ckpt in (True, False)]
    for k, step_ckpt, block_ckpt in [*settings, (cfg.steps, True, True)]:
        algo.config.grad_last_k, algo.config.gradient_checkpointing = k, step_ckpt
        if block_ckpt:
            backbone.transformer.enable_gradient_checkpointing()
        seconds, peak = time_and_peak(lambda: algo.update(rg_prompts, torch.Generator().manual_seed(cfg.seed)),
                                      device, cfg.repeats)
        backbone.transformer.disable_gradient_checkpointing()
        label = f"k{k}_{'step' if step_ckpt else 'no'}ckpt" + ("+block" if block_ckpt else "")
        extra = {"k": k, "step_checkpointing": step_ckpt, "block_checkpointing": block_ckpt,
                 "policy": cfg.train_policy, "batch": cfg.batch, **setting}
        status = {} if peak is not None else {"status": "oom"}
        report.add(f"rg_update_time_{label}", None if math.isnan(seconds) else seconds, "s", **extra, **status)
        report.add(f"rg_update_peak_{label}", peak, unit, **extra, **status)
        if not step_ckpt and peak is not None:
            no_ckpt_peaks[k] = peak
    if len(no_ckpt_peaks) >= 2:  # what one more differentiated step adds: the memory model's A_step (+ policy)
        (k0, p0), (k1, p1) = min(no_ckpt_peaks.items()), max(no_ckpt_peaks.items())
        report.add("rg_activations_per_step_measured", (p1 - p0) / (k1 - k0), "MiB", batch=cfg.batch,
                   from_k=(k0, k1), **setting)

    # 5. A PPO update: collect ppo_batch trajectories of `steps` SDE steps, then one epoch on them.
    env = GuidanceTorchRLEnv(backbone, reward=reward, prompts=prompts[: max(1, cfg.ppo_batch // 2)],
                             batch_size=cfg.ppo_batch, samples_per_prompt=2, num_steps=cfg.steps, mode="sde")
    env.set_seed(cfg.seed)
    actor = make_probabilistic_actor(policy, std=0.1, use_sde_std=True)
    ppo = PPO(env, actor, torch.optim.Adam(actor.parameters(), lr=1e-5),
              PPOConfig(epochs=1, minibatch_trajectories=cfg.ppo_batch))
    collect, collected = ppo.collect, []

    def timed_collect() -> Any:
        sync(device)
        t0 = time.perf_counter()
        batch = collect()
        sync(device)
        collected.append(time.perf_counter() - t0)
        return batch

    ppo.collect = timed_collect  # the update's own collection, timed inside it
    total_s, peak = time_and_peak(ppo.update, device, 1)
    extra = {"batch": cfg.ppo_batch, "steps": cfg.steps, "policy": cfg.train_policy, **setting}
    if peak is None:
        report.add("ppo_update_time", None, "s", status="oom", **extra)
    else:
        report.add("ppo_update_time", total_s, "s", **extra)
        report.add("ppo_collect_time", collected[-1], "s", **extra)
        report.add("ppo_loss_time", total_s - collected[-1], "s", epochs=1, **extra)
        report.add("ppo_update_peak", peak, unit, **extra)
    ppo.shutdown()

    # 6. The TorchRL env's episode (reset, `steps` steps with zero actions, decode, reward) against the bare
    #    loop plus decoding and the reward on the same batch.
    env = GuidanceTorchRLEnv(backbone, reward=reward, prompts=prompts[: cfg.batch], batch_size=cfg.batch,
                             num_steps=cfg.steps)
    env.set_seed(cfg.seed)
    zero = torch.zeros(cfg.batch, *backbone.latent_shape, device=device)

    def bare_with_reward() -> None:
        reward(backbone.decode(episode()), cond.prompts)

    def rollout() -> None:
        env.rollout(cfg.steps, lambda td: td.set(keys.ACTION, zero), return_contiguous=False)

    with torch.no_grad():
        env_s = best_time(rollout, device, cfg.repeats)
        bare_s = best_time(bare_with_reward, device, cfg.repeats)
    report.add("torchrl_episode", env_s, "s", steps=cfg.steps, batch=cfg.batch, **setting)
    report.add("bare_episode_with_reward", bare_s, "s", steps=cfg.steps, batch=cfg.batch, **setting)
    report.add("torchrl_ratio", env_s / bare_s, "x bare loop + decode + reward", **setting)

    print(f"\nflux_scale --size {cfg.size}: {setting}")
    print(report.table())
    return report.rows


if __name__ == "__main__":
    main(tyro.cli(Config))
