"""The Flux-scale benchmark (issue 22): ``--size tiny`` runs on the CPU and reports every figure, finite; the
Flux-dev configurations build on the meta device with the published parameter counts."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import torch

from tests.scripts import ROOT, load_script

BENCHMARK = ROOT / "benchmarks" / "flux_scale.py"
COMPONENTS = ("transformer", "vae", "t5", "clip_text", "clip_reward")
FIGURES = {
    *(f"{kind}_{c}" for kind in ("params", "weights") for c in COMPONENTS),
    *(f"saved_per_image_{c}" for c in ("transformer", "vae_decode", "clip_reward")),
    "build", "base_forward", "episode_unguided",
    *(f"{kind}_{p}" for kind in ("episode", "episode_ratio", "guidance_forward_fraction")
      for p in ("mlp", "attention", "conv", "affine")),
    *(f"rg_update_{kind}_k{k}_{ckpt}" for kind in ("time", "peak") for k in (1, 4, 28)
      for ckpt in ("stepckpt", "nockpt")),
    "rg_update_time_k28_stepckpt+block", "rg_update_peak_k28_stepckpt+block", "rg_activations_per_step_measured",
    "ppo_update_time", "ppo_collect_time", "ppo_loss_time", "ppo_update_peak",
    "torchrl_episode", "bare_episode_with_reward", "torchrl_ratio",
}


def test_tiny_size_reports_every_figure_finite():
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    done = subprocess.run([sys.executable, str(BENCHMARK), "--size", "tiny"], capture_output=True, text=True,
                          env=env, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    names = {r["figure"] for r in rows}
    assert FIGURES <= names, sorted(FIGURES - names)
    for r in rows:
        assert {"figure", "value", "unit"} <= set(r), r
        assert isinstance(r["value"], (int, float)) and math.isfinite(r["value"]), r
    tiny = {r["figure"]: r["value"] for r in rows if r.get("size") == "tiny"}
    assert tiny["rg_update_peak_k28_nockpt"] > tiny["rg_update_peak_k28_stepckpt"]  # checkpointing saves memory
    assert "figure" in done.stdout.split("flux_scale --size tiny", 1)[1]  # the final table


def test_dev_configurations_have_the_published_sizes():
    bench = load_script("flux_scale", "benchmarks")
    modules, _ = bench.build_modules(bench.DEV, "meta", torch.bfloat16)  # shapes only: nothing allocated
    params = {name: sum(p.numel() for p in m.parameters()) for name, m in modules.items()}
    assert 11.85e9 < params["transformer"] < 11.95e9  # FLUX.1-dev: ~11.9 B
    assert 4.70e9 < params["t5"] < 4.80e9  # T5-XXL encoder: ~4.76 B
    assert 80e6 < params["vae"] < 90e6  # Flux's AutoencoderKL: ~84 M
    assert 120e6 < params["clip_text"] < 125e6  # CLIP-L text: ~123 M
    assert 420e6 < params["clip_reward"] < 435e6  # open_clip ViT-L-14 (both towers): ~428 M
    tcfg = modules["transformer"].config
    assert (tcfg.num_layers, tcfg.num_single_layers, tcfg.num_attention_heads, tcfg.attention_head_dim) == (19, 38, 24, 128)
    assert modules["vae"].config.latent_channels == 16 and modules["t5"].config.d_model == 4096
