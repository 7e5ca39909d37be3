"""Shared sizes and builders for the policy tests: the shapes world and a tiny random Flux."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from diffusers import FluxTransformer2DModel
from tensordict import TensorDict
from torch import nn

from fluxguide import keys
from fluxguide.backbones.bfl import BFLFlux
from fluxguide.policies import AttentionGuidanceModel, ConvGuidanceModel, MLPGuidanceModel
from fluxguide.sampling.packing import make_img_ids, make_txt_ids


@dataclass(frozen=True)
class World:
    """Latent and conditioning sizes of a backbone, and the unpacked channels / patch behind its tokens."""

    name: str
    channels: int
    grid: int
    txt_dim: int
    vec_dim: int
    txt_len: int
    in_channels: int
    patch: int

    @property
    def seq(self) -> int:
        return self.grid * self.grid


SHAPES_WORLD = World("shapes", channels=48, grid=8, txt_dim=64, vec_dim=64, txt_len=8, in_channels=3, patch=4)
TINY_FLUX = World(
    "tiny_flux", channels=64, grid=4, txt_dim=32, vec_dim=32, txt_len=6, in_channels=16, patch=2
)
ARCHITECTURES = ("mlp", "attention", "conv")


@pytest.fixture(params=[SHAPES_WORLD, TINY_FLUX], ids=lambda w: w.name)
def world(request: pytest.FixtureRequest) -> World:
    return request.param


def build_guidance(name: str, world: World) -> nn.Module:
    """A small guidance model of architecture ``name`` for ``world``."""
    if name == "mlp":
        return MLPGuidanceModel(
            latent_channels=world.channels, hidden_dim=32, num_layers=3, vec_dim=world.vec_dim
        )
    if name == "attention":
        return AttentionGuidanceModel(
            hidden_dim=32,
            num_heads=4,
            num_layers=2,
            latent_channels=world.channels,
            txt_dim=world.txt_dim,
            vec_dim=world.vec_dim,
        )
    if name == "conv":
        return ConvGuidanceModel(
            in_channels=world.in_channels,
            hidden_channels=16,
            num_blocks=2,
            patch_size=world.patch,
            vec_dim=world.vec_dim,
        )
    raise ValueError(name)


@pytest.fixture
def make_guidance() -> Callable[[str, World], nn.Module]:
    return build_guidance


def observation(world: World, batch: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random ``img, pred, txt, vec, t`` for ``world``."""
    g = torch.Generator().manual_seed(seed)
    return {
        "img": torch.randn(batch, world.seq, world.channels, generator=g),
        "pred": torch.randn(batch, world.seq, world.channels, generator=g),
        "txt": torch.randn(batch, world.txt_len, world.txt_dim, generator=g),
        "vec": torch.randn(batch, world.vec_dim, generator=g),
        "t": torch.rand(batch, generator=g),
    }


@pytest.fixture
def make_observation() -> Callable[..., dict[str, torch.Tensor]]:
    return observation


def randomize(model: nn.Module, seed: int = 0, std: float = 0.2) -> nn.Module:
    """Give every parameter (the zero-initialised output layer included) random values: a 'trained' model."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


@pytest.fixture
def perturb() -> Callable[..., nn.Module]:
    return randomize


def tiny_flux(world: World, guidance_embeds: bool = False, seed: int = 0) -> BFLFlux:
    """A tiny random Flux transformer (the shapes world's architecture) for ``world``'s sizes."""
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=world.channels,
        num_layers=2,
        num_single_layers=4,
        attention_head_dim=16,
        num_attention_heads=4,
        joint_attention_dim=world.txt_dim,
        pooled_projection_dim=world.vec_dim,
        axes_dims_rope=(4, 6, 6),
        guidance_embeds=guidance_embeds,
    )
    return BFLFlux(transformer.eval())


@pytest.fixture
def make_flux() -> Callable[..., BFLFlux]:
    return tiny_flux


@pytest.fixture
def sampler_inputs() -> Callable[[World, int], dict[str, torch.Tensor]]:
    """Noise, ids and conditioning for ``denoise`` on ``world``."""

    def build(world: World, batch: int = 2) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(1)
        return {
            "img": torch.randn(batch, world.seq, world.channels, generator=g),
            "img_ids": make_img_ids(world.grid, world.grid),
            "txt": torch.randn(batch, world.txt_len, world.txt_dim, generator=g),
            "txt_ids": make_txt_ids(world.txt_len),
            "vec": torch.randn(batch, world.vec_dim, generator=g),
        }

    return build


@pytest.fixture
def shapes_world() -> World:
    return SHAPES_WORLD


@pytest.fixture
def flux_world() -> World:
    return TINY_FLUX


def obs_td(world, make_observation, batch=3, step=2, seed=0) -> TensorDict:
    """The env's observation as a TensorDict of batch [B]; ``t`` and ``step`` (B, 1) as in TorchRL specs."""
    obs = make_observation(world, batch=batch, seed=seed)
    return TensorDict(
        {
            keys.IMG: obs["img"],
            keys.PRED: obs["pred"],
            keys.TXT: obs["txt"],
            keys.VEC: obs["vec"],
            keys.T: obs["t"][:, None],
            keys.STEP: torch.full((batch, 1), step),
        },
        batch_size=[batch],
    )


@pytest.fixture(scope="module")
def backbone(shapes_random):
    """The random shapes world (``build_backbone("shapes-random", seed=0)``) under the policy tests' name."""
    return shapes_random
