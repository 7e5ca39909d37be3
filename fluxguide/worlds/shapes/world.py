"""The shapes world as a backbone: tiny CLIP text encoder + tiny Flux transformer on packed pixels.

Latents are the image itself: 32x32 RGB in [-1, 1], packed into 4x4 patches (seq 64, C 48), exactly as
Flux packs its VAE latents into 2x2 patches. ``decode`` is therefore the identity up to unpacking and the
map to [0, 1]. The transformer is a diffusers ``FluxTransformer2DModel`` trained by rectified flow
(``experiments/pretrain_shapes_world.py``) with caption dropout, so classifier-free guidance works.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import open_clip
import torch
from diffusers import FluxTransformer2DModel
from safetensors import SafetensorError
from safetensors.torch import load_file

from fluxguide.backbones.base import Backbone, Conditioning, straight_through_clamp
from fluxguide.backbones.bfl import diffusers_flux_velocity
from fluxguide.backbones.weights import WeightsError, WeightsNotFoundError, check_finite_weights
from fluxguide.sampling.packing import make_img_ids, make_txt_ids, pack, unpack
from fluxguide.worlds.shapes.clip import create_shapes_clip, encode_text_tokens, shapes_tokenizer
from fluxguide.worlds.shapes.rewards import WORLD_NAME
from fluxguide.worlds.shapes.scenes import IMAGE_SIZE, parse_prompts
from fluxguide.worlds.shapes.verifier import verify

WEIGHTS_DIR = Path(__file__).with_name("weights")
PATCH = 4
FLUX_CONFIG: dict = {
    "patch_size": 1,
    "in_channels": 3 * PATCH * PATCH,
    "num_layers": 2,
    "num_single_layers": 4,
    "attention_head_dim": 16,
    "num_attention_heads": 4,
    "joint_attention_dim": 64,
    "pooled_projection_dim": 64,
    "guidance_embeds": False,
    "axes_dims_rope": (4, 6, 6),
}
AESTHETIC_HIDDEN: tuple[int, ...] = (128, 64, 16)


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """Load a safetensors file, turning a missing or corrupt file into an error that names it."""
    if not path.is_file():
        raise WeightsNotFoundError(
            f"shapes-world weight file {path} is missing: reinstall fluxguide or rebuild the weights with "
            f"`python experiments/pretrain_shapes_world.py --out-dir {path.parent}`"
        )
    rebuild = f"rebuild it with `python experiments/pretrain_shapes_world.py --out-dir {path.parent}`"
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise WeightsError(f"shapes-world weight file {path} is corrupt ({e}): {rebuild}") from e
    check_finite_weights(tensors, f"shapes-world weight file {path}", rebuild)
    return tensors


def build_transformer(config: dict | None = None) -> FluxTransformer2DModel:
    """The tiny Flux transformer, randomly initialised (``config`` overrides entries of ``FLUX_CONFIG``)."""
    return FluxTransformer2DModel(**{**FLUX_CONFIG, **(config or {})})


def read_flux_config(weights_dir: Path) -> dict:
    """The transformer config stored beside the weights (``flux_config.json``), else the default."""
    path = weights_dir / "flux_config.json"
    if not path.is_file():
        return dict(FLUX_CONFIG)
    try:
        return {**FLUX_CONFIG, **json.loads(path.read_text())}
    except json.JSONDecodeError as e:
        raise WeightsError(f"shapes-world config {path} is corrupt ({e}): rebuild the weights") from e


class ShapesWorld(Backbone):
    """The embedded default backbone. Build with :meth:`pretrained` (shipped weights) or from parts.

    Args:
        clip: the tiny open_clip CLIP (its text tower encodes prompts; the reward uses both towers).
        transformer: the tiny ``FluxTransformer2DModel``.
        weights_dir: folder of the weight files (for the rewards that load the aesthetic head).
    """

    latent_seq = (IMAGE_SIZE // PATCH) ** 2
    latent_channels = 3 * PATCH * PATCH
    image_height = IMAGE_SIZE
    image_width = IMAGE_SIZE
    default_num_steps = 20
    default_guidance = None
    default_cfg_scale = 1.0
    recommended_cfg_scale = 3.0
    schedule_shift = True
    pixel_patch = PATCH
    verifier = staticmethod(verify)
    world_name = WORLD_NAME
    clip_embed_dim = 64
    aesthetic_hidden = AESTHETIC_HIDDEN

    def __init__(self, clip: open_clip.CLIP, transformer: FluxTransformer2DModel, weights_dir: Path | None = None) -> None:
        super().__init__()
        self.clip = clip
        self.transformer = transformer
        self.tokenizer = shapes_tokenizer()
        self.weights_dir = Path(weights_dir) if weights_dir is not None else WEIGHTS_DIR
        grid = IMAGE_SIZE // PATCH
        self.register_buffer("img_ids", make_img_ids(grid, grid), persistent=False)
        self.register_buffer("txt_ids", make_txt_ids(self.tokenizer.context_length), persistent=False)
        self.clip.requires_grad_(False)
        self.transformer.requires_grad_(False)
        self.eval()

    @classmethod
    def pretrained(
        cls,
        weights_dir: str | Path | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> ShapesWorld:
        """Load the shipped weights (or those in ``weights_dir``); no network access."""
        wdir = Path(weights_dir) if weights_dir is not None else WEIGHTS_DIR
        clip = create_shapes_clip()
        clip.load_state_dict({k: v.float() for k, v in load_weights(wdir / "clip.safetensors").items()})
        transformer = build_transformer(read_flux_config(wdir))
        transformer.load_state_dict({k: v.float() for k, v in load_weights(wdir / "flux.safetensors").items()})
        return cls(clip, transformer, wdir).to(device=device, dtype=dtype)

    @property
    def aesthetic_path(self) -> Path:
        return self.weights_dir / "aesthetic.safetensors"

    def metrics(self) -> dict:
        """Quality figures recorded by the pretraining run that produced these weights."""
        path = self.weights_dir / "metrics.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        return self.tokenizer(list(prompts)).to(self.img_ids.device)

    def check_prompts(self, prompts: list[str]) -> None:
        """The contract's checks, then the grammar: the world encodes only its own captions (a prompt outside
        the grammar is refused when an env is built or sampling starts, not at the verifier after sampling)."""
        super().check_prompts(prompts)
        parse_prompts(list(prompts))

    def encode(self, prompts: list[str]) -> Conditioning:
        if isinstance(prompts, str):
            raise TypeError(f"encode takes a list of prompts, got the string {prompts!r}: wrap it in a list")
        txt, vec = encode_text_tokens(self.clip, self.tokenize(prompts))
        dtype = self.dtype
        return Conditioning(txt=txt.to(dtype), vec=vec.to(dtype), txt_ids=self.txt_ids, img_ids=self.img_ids,
                            prompts=list(prompts))

    def forward(
        self,
        img: torch.Tensor,
        img_ids: torch.Tensor,
        txt: torch.Tensor,
        txt_ids: torch.Tensor,
        timesteps: torch.Tensor,
        y: torch.Tensor,
        guidance: torch.Tensor | None = None,
    ) -> torch.Tensor:
        dtype = self.dtype
        out = diffusers_flux_velocity(self, img.to(dtype), img_ids, txt.to(dtype), txt_ids,
                                      timesteps.to(dtype), y.to(dtype), guidance)
        return out.to(img.dtype)

    def decode(self, img: torch.Tensor) -> torch.Tensor:
        return ((unpack(img, IMAGE_SIZE, IMAGE_SIZE, PATCH) + 1) / 2).clamp(0, 1)

    def straight_through_decoder(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """:meth:`decode` with a straight-through final clamp, so the reward's gradient reaches pixels the
        clamp cuts off (shapes can grow into the black background)."""
        return lambda img: straight_through_clamp((unpack(img, IMAGE_SIZE, IMAGE_SIZE, PATCH) + 1) / 2)

    def render_references(self, prompts: list[str], generator: torch.Generator) -> torch.Tensor:
        """A correct scene for each prompt (a random placement drawn from ``generator``, so a resumed collection
        renders the same ones)."""
        from fluxguide.worlds.shapes.scenes import render_prompts

        return render_prompts(prompts, seed=int(torch.randint(2**31 - 1, (1,), generator=generator)))[0]

    def default_reward(self) -> str:
        """The tiny CLIP's text-image similarity (``"shapes-clip"``), which gets this world's loaded CLIP."""
        return "shapes-clip"

    def monitor_rewards(self) -> tuple[str, ...]:
        """Every reward of this world (they share its loaded tiny CLIP, so scoring with them costs little): a run
        trained on one logs the other three at each held-out evaluation."""
        return ("shapes-clip", "shapes-clip-retrieval", "shapes-aesthetic", "verifier-partial")

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] -> clean latents ``x0`` (the inverse of :meth:`decode`)."""
        return pack(images * 2 - 1, PATCH)


def pretrained_world(
    *, weights_dir: str | Path | None = None, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
) -> ShapesWorld:
    """The backbone ``"shapes"``: the pretrained world from ``weights_dir`` (default: the shipped weights)."""
    return ShapesWorld.pretrained(weights_dir, device=device, dtype=dtype or torch.float32)


def random_world(*, seed: int = 0, device: torch.device | str = "cpu") -> ShapesWorld:
    """The backbone ``"shapes-random"``: a randomly initialised world (smoke tests: every code path in seconds),
    initialised from ``seed`` without touching the global RNG."""
    from fluxguide.worlds.shapes.clip import create_shapes_clip

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ShapesWorld(create_shapes_clip(), build_transformer()).to(device)
