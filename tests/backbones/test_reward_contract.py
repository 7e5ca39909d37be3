"""The reward side of the Backbone contract: a backbone says which rewards it scores, what it gives them and its
default (``default_reward``, ``reward_kwargs``, ``build_reward``), and ``backbones.registry.build_reward`` is the one
builder the scripts, the envs and the collector use."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fluxguide.backbones.base import Backbone, Conditioning, RewardWorldError
from fluxguide.backbones.registry import build_backbone, build_reward
from fluxguide.errors import UserError
from fluxguide.rewards import CallableReward, CLIPScore, RewardModel, register_reward
from fluxguide.rewards.registry import reward_options, reward_world, world_reward
from fluxguide.rewards.verifier import VerifierReward


class OpenWorld(Backbone):
    """The smallest open-world backbone (no world, no verifier): what a plug-in for a real model looks like."""

    latent_seq, latent_channels, image_height, image_width = 4, 12, 4, 4

    def encode(self, prompts: list[str]) -> Conditioning:
        raise NotImplementedError

    def forward(self, img, img_ids, txt, txt_ids, timesteps, y, guidance=None) -> torch.Tensor:
        return img

    def decode(self, img: torch.Tensor) -> torch.Tensor:
        return img.new_zeros(img.shape[0], 3, 4, 4)


class Recorded(RewardModel):
    """A reward that keeps the options it was built with."""

    def __init__(self, **options: object) -> None:
        super().__init__()
        self.options = options

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return images.mean(dim=(1, 2, 3))


@register_reward("test-contract-device", overwrite=True)
def _takes_device(*, device: torch.device | str = "cpu", scale: float = 1.0) -> Recorded:
    return Recorded(device=device, scale=scale)


@register_reward("test-contract-kwargs", overwrite=True)
def _takes_kwargs(**options: object) -> Recorded:
    return Recorded(**options)


@register_reward("test-contract-other-world", overwrite=True)
@world_reward("another-world")
def _other_world(world: object = None) -> Recorded:
    return Recorded(world=world)


def test_a_reward_gets_the_options_its_factory_names_and_the_caller_wins() -> None:
    backbone = OpenWorld()
    assert reward_options("test-contract-device") == {"device", "scale"}
    assert backbone.build_reward("test-contract-device").options == {"device": backbone.device, "scale": 1.0}
    assert backbone.build_reward("test-contract-device", device="meta").options["device"] == "meta"
    # Options a factory takes only through **kwargs may not reach what it builds: none are offered.
    assert backbone.build_reward("test-contract-kwargs").options == {}


def test_the_shapes_world_shares_its_clip_and_verifier_with_its_own_rewards(shapes_random) -> None:
    world = shapes_random
    assert reward_world("shapes-clip") == world.world_name == "shapes"
    assert world.default_reward() == "shapes-clip"
    reward = build_reward(None, world)
    assert isinstance(reward, CLIPScore) and reward.model is world.clip
    assert build_reward("verifier", world).verify is world.verifier
    assert world.reward_kwargs("clip") == {"device": world.device}  # an open_clip reward: no world of its own


def test_a_backbone_refuses_the_rewards_of_another_world(shapes_random) -> None:
    with pytest.raises(RewardWorldError, match="belongs to the another-world world.*ShapesWorld.*--reward shapes-clip"):
        shapes_random.build_reward("test-contract-other-world")
    with pytest.raises(RewardWorldError, match="belongs to the shapes world.*OpenWorld.*--reward clip") as caught:
        build_reward("verifier-partial", OpenWorld())
    assert isinstance(caught.value, UserError) and isinstance(caught.value, ValueError)


def test_verifier_attributes_scores_the_backbones_verifier(shapes_random) -> None:
    from fluxguide.worlds.shapes.scenes import render_prompts

    prompts = ["a red circle on the left of a blue bar", "a green triangle"]
    images, _ = render_prompts(prompts, seed=3)
    reward = build_reward("verifier-attributes", shapes_random)
    assert isinstance(reward, VerifierReward) and not reward.differentiable
    scores = shapes_random.verifier(images, prompts).scores
    torch.testing.assert_close(reward(images, prompts), torch.stack([v.float() for v in scores.values()]).mean(0))
    with pytest.raises(ValueError, match="needs verify="):
        build_reward("verifier-attributes", OpenWorld())


def test_tiny_flux_scores_with_its_tiny_random_clip_whatever_is_asked() -> None:
    backbone = build_backbone("tiny-flux", seed=1)
    assert not hasattr(backbone, "preset_name") and backbone.default_reward() == "tiny-random-clip"
    a = build_reward("shapes-clip-retrieval", backbone, seed=4, model_name="ignored")
    b = build_reward(None, backbone, seed=4)
    assert isinstance(a, CLIPScore) and type(b) is type(a)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
    assert not all(torch.equal(p, q) for p, q in zip(a.parameters(), build_reward(None, backbone, seed=5).parameters()))


def test_the_one_builder_takes_a_module_or_a_callable_as_it_is() -> None:
    backbone, module = OpenWorld(), nn.Identity()
    assert build_reward(module, backbone) is module
    assert isinstance(build_reward(lambda images, prompts: images.mean((1, 2, 3)), backbone), CallableReward)
    with pytest.raises(ValueError, match="only used with a reward registry name"):
        build_reward(module, backbone, scale=2.0)
    with pytest.raises(TypeError, match="reward must be"):
        build_reward(3, backbone)  # type: ignore[arg-type]
