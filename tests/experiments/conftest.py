"""Fixtures of the script tests: the files a run on Flux weights from disk needs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from fluxguide.backbones.registry import TINY_CLIP_CFG
from fluxguide.rewards import load_open_clip

#: The open_clip name of the tiny random CLIP whose weights :func:`flux_files` saves.
CLIP_NAME = "fluxguide-tiny-random-clip"


@pytest.fixture(scope="module")
def flux_files(tmp_path_factory: pytest.TempPathFactory, flux_folder: Path) -> dict[str, str]:
    """A tiny random FluxPipeline folder, a tiny random open_clip weights file (seed 1) and two prompt files."""
    root = tmp_path_factory.mktemp("flux_files")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        clip, _ = load_open_clip(CLIP_NAME, None, model_cfg=TINY_CLIP_CFG)
    weights = root / "tiny_clip.safetensors"
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(weights))
    (root / "train.txt").write_text("a red circle on the left of a blue square\n\n"
                                    "a photo of a cat sitting on a chair\n")
    (root / "heldout.txt").write_text("a green triangle above a yellow star\nan astronaut riding a horse on the moon\n")
    kwargs = json.dumps({"model_name": CLIP_NAME, "model_cfg": TINY_CLIP_CFG, "pretrained": str(weights)})
    return {"pipeline": str(flux_folder), "weights": str(weights), "reward_kwargs": kwargs,
            "train": str(root / "train.txt"), "heldout": str(root / "heldout.txt")}
