"""The learned reward (fluxguide.rewards.learned): a surrogate head on a frozen tiny open_clip, its memory, its fit."""

from __future__ import annotations

import pytest
import torch

from fluxguide.rewards import CLIPScore
from fluxguide.rewards.learned import LearnedReward, RewardHead, RewardMemory


@pytest.fixture
def learned(tiny_clip) -> LearnedReward:
    model, tokenizer = tiny_clip
    torch.manual_seed(0)
    return LearnedReward(CLIPScore(model, tokenizer), hidden=32, capacity=64)


def test_an_unfitted_head_scores_every_image_alike_and_passes_gradients_to_the_pixels(learned, images, prompts) -> None:
    assert torch.equal(learned(images, prompts), torch.zeros(4))
    learned.head.prior_weight.data.fill_(0.3)
    torch.nn.init.normal_(learned.head.net[-1].weight, std=0.5)
    pixels = images.clone().requires_grad_(True)
    learned(pixels, prompts).sum().backward()
    assert pixels.grad is not None and pixels.grad.abs().sum() > 0


def test_only_the_head_and_the_memory_are_state(learned) -> None:
    keys = set(learned.state_dict())
    assert keys and all(k.startswith(("head.", "memory.")) for k in keys)  # the CLIP is neither saved nor trained
    assert all(not p.requires_grad for p in learned.clip.parameters())
    assert {id(p) for p in learned.parameters()} == {id(p) for p in learned.head.parameters()}


def test_the_memory_is_a_ring_that_round_trips_through_its_state_dict() -> None:
    memory = RewardMemory(embed_dim=2, capacity=3)
    for value in range(5):
        memory.add(torch.full((1, 2), float(value)), torch.zeros(1, 2), torch.zeros(1), torch.tensor([float(value)]))
    assert len(memory) == 3 and int(memory.count) == 5
    assert sorted(memory.target.tolist()) == [2.0, 3.0, 4.0]  # the two oldest were overwritten
    copy = RewardMemory(embed_dim=2, capacity=3)
    copy.load_state_dict(memory.state_dict())
    assert len(copy) == 3 and torch.equal(copy.image, memory.image)
    with pytest.raises(ValueError, match="empty"):
        RewardMemory(embed_dim=2).sample(4)


def test_fitting_learns_a_black_box_score_of_the_images(learned, tiny_clip) -> None:
    """The black box here is the tiny CLIP's own cosine score (a function of the embeddings the head sees): after
    fitting on 64 images, the head predicts 32 new ones far better than before (correlation, error)."""
    model, tokenizer = tiny_clip
    truth = CLIPScore(model, tokenizer, scale=5.0)
    gen = torch.Generator().manual_seed(3)
    words = ["a red circle", "a blue bar", "a green triangle on the left of a red bar", "a yellow circle"]

    def draw(n: int) -> tuple[torch.Tensor, list[str]]:
        idx = torch.randint(len(words), (n,), generator=gen).tolist()
        return torch.rand(n, 3, 32, 32, generator=gen), [words[i] for i in idx]

    train_images, train_prompts = draw(64)
    with torch.no_grad():
        learned.remember(train_images, train_prompts, truth(train_images, train_prompts))
    test_images, test_prompts = draw(32)
    with torch.no_grad():
        target = truth(test_images, test_prompts)
        before = float((learned(test_images, test_prompts) - target).square().mean())
    optimizer = torch.optim.Adam(learned.head.parameters(), lr=3e-3)
    fit = learned.fit(optimizer, steps=300, batch_size=32, generator=gen)
    with torch.no_grad():
        after = learned.remember(test_images, test_prompts, target)
    assert fit["surrogate_fit_loss"] < before
    assert after["surrogate_rmse"] ** 2 < 0.5 * before and after["surrogate_corr"] > 0.6


def test_refuses_a_reward_without_embeddings() -> None:
    from fluxguide.rewards.brightness import MeanBrightness

    with pytest.raises(TypeError, match="CLIPScore"):
        LearnedReward(MeanBrightness())
    with pytest.raises(ValueError, match="hidden"):
        RewardHead(4, hidden=0)
