"""The shapes world's rewards: tiny CLIP score, aesthetic head and verifier."""

from __future__ import annotations

import pytest
import torch


from fluxguide.rewards import NotDifferentiableError, make_reward, reward_with_grad
from fluxguide.worlds import shapes
from fluxguide.worlds.shapes.rewards import VerifierReward, shapes_aesthetic, shapes_clip_score


@pytest.fixture(scope="module")
def heldout_renders() -> tuple[torch.Tensor, list[str]]:
    """One fresh render of each of (up to) 64 held-out prompts."""
    from fluxguide.worlds.shapes.scenes import render_prompts

    prompts = shapes.heldout_prompts()[:64]
    images, _ = render_prompts(prompts, seed=1234)
    return images, prompts


def test_clip_score_ranks_right_caption_above_wrong(shapes_pretrained, heldout_renders) -> None:
    images, prompts = heldout_renders
    reward = shapes_clip_score(shapes_pretrained)
    # The wrong caption of image i is the prompt of image i + 7 (a different held-out prompt).
    wrong = [prompts[(i + 7) % len(prompts)] for i in range(len(prompts))]
    with torch.no_grad():
        right_scores, wrong_scores = reward(images, prompts), reward(images, wrong)
    accuracy = (right_scores > wrong_scores).float().mean().item()
    print(f"shapes CLIP score: right caption above wrong on {accuracy:.1%} of {len(prompts)} held-out pairs")
    assert accuracy >= 0.9


def test_clip_and_aesthetic_are_differentiable(shapes_pretrained, heldout_renders) -> None:
    images, prompts = heldout_renders
    for reward in (
        shapes_clip_score(shapes_pretrained),
        shapes_aesthetic(shapes_pretrained),
        make_reward("shapes-aesthetic", world=shapes_pretrained),
    ):
        x = images[:8].clone().requires_grad_(True)
        out = reward_with_grad(reward, x, prompts[:8])
        assert out.shape == (8,) and torch.isfinite(out).all()
        out.sum().backward()
        assert x.grad.abs().sum() > 0


def test_aesthetic_head_prefers_clean_renders(shapes_pretrained, heldout_renders) -> None:
    images, prompts = heldout_renders
    noisy = (images + 0.3 * torch.randn(images.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    reward = shapes_aesthetic(shapes_pretrained)
    with torch.no_grad():
        clean_score, noisy_score = reward(images, prompts).mean(), reward(noisy, prompts).mean()
    print(f"shapes aesthetic: clean renders {clean_score:.3f}, noisy {noisy_score:.3f}")
    assert clean_score > noisy_score


def test_verifier_reward_equals_pass_rate_with_components(heldout_renders) -> None:
    images, prompts = heldout_renders
    # Half true captions, half wrong ones, so the pass rate is neither 0 nor 1.
    mixed = [p if i % 2 == 0 else prompts[(i + 7) % len(prompts)] for i, p in enumerate(prompts)]
    reward = VerifierReward()
    assert not reward.differentiable
    values = reward(images, mixed)
    result = shapes.verify(images, mixed)
    torch.testing.assert_close(values, result.passed.float())
    assert values.mean().item() == pytest.approx(result.passed.float().mean().item())
    assert set(reward.last_components) == {"count", "kind", "color", "position"}
    for name, scores in result.scores.items():
        torch.testing.assert_close(reward.last_components[name], scores.float())
    with pytest.raises(NotDifferentiableError, match="VerifierReward is not differentiable.*PPO"):
        reward_with_grad(reward, images, mixed)


def test_verifier_partial_credit_adds_the_mean_attribute_score(heldout_renders) -> None:
    images, prompts = heldout_renders
    mixed = [p if i % 2 == 0 else prompts[(i + 7) % len(prompts)] for i, p in enumerate(prompts)]
    result = shapes.verify(images, mixed)
    attributes = torch.stack([result.scores[k].float() for k in ("count", "color", "kind", "position")]).mean(0)
    values = make_reward("verifier-partial")(images, mixed)
    torch.testing.assert_close(values, result.passed.float() + 0.5 * attributes)
    # A wrong caption that still gets some attributes right ranks above one that gets none.
    failed = ~result.passed
    assert bool((values[failed] > 0).any()) and bool((values[failed] < 0.5).all())
    torch.testing.assert_close(VerifierReward(partial_credit=0.0)(images, mixed), result.passed.float())
    with pytest.raises(ValueError, match="partial_credit"):
        VerifierReward(partial_credit=-1.0)


def test_clip_retrieval_reward_is_the_caption_log_probability(shapes_pretrained, heldout_renders) -> None:
    from fluxguide.worlds.shapes.scenes import all_prompts
    from fluxguide.rewards import reward_with_grad

    images, prompts = heldout_renders
    reward = make_reward("shapes-clip-retrieval", world=shapes_pretrained)
    assert reward.differentiable
    values = reward(images, prompts)
    # Direct: log-softmax over every caption of the grammar of CLIP's scaled cosine similarities.
    clip, captions = shapes_pretrained.clip, all_prompts()
    from fluxguide.worlds.shapes.clip import normalize_images

    with torch.no_grad():
        img = torch.nn.functional.normalize(clip.encode_image(normalize_images(images)), dim=-1)
        txt = torch.nn.functional.normalize(clip.encode_text(shapes_pretrained.tokenize(captions)), dim=-1)
        logp = torch.log_softmax(clip.logit_scale.exp() * img @ txt.T, dim=-1)
    expected = logp[torch.arange(len(prompts)), torch.tensor([captions.index(p) for p in prompts])]
    torch.testing.assert_close(values, expected, atol=1e-4, rtol=1e-4)
    assert bool((values <= 0).all())
    wrong = [prompts[(i + 7) % len(prompts)] for i in range(len(prompts))]
    assert (values > reward(images, wrong)).float().mean() > 0.9
    x = images.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(reward_with_grad(reward, x, prompts).sum(), x)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
