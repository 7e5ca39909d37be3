"""A learned reward: a differentiable surrogate of a black-box reward, fitted online to its scores.

Most rewards that matter give no gradient (a verifier, OCR, a VLM judge, a human). The standard way to still
train by reward gradient is a *reward model*: a differentiable network on a frozen vision-language backbone,
fitted to the black box's scores, through which the sampler is then backpropagated (ImageReward and ReFL, Xu et
al. 2023, fit BLIP features to human preferences; SEIKO, Uehara et al. 2024, refits the model online on the
policy's own samples so that it is right where the policy goes). Here:

- :class:`LearnedReward` scores an image and its prompt as ``head(e_i, e_t, s)`` with ``e_i``, ``e_t`` the
  L2-normalised image and text embeddings of a frozen CLIP and ``s`` that CLIP reward's own score (a
  :class:`~fluxguide.rewards.clip_score.CLIPScore`, e.g. its caption log-probability, gives the model,
  preprocessing, text cache and score) and ``head`` a small MLP plus a learned weight on ``s``
  (:class:`RewardHead`);
- :class:`RewardMemory` keeps the embeddings and black-box scores of the last ``capacity`` images (a ring, fixed
  shapes, so it is checkpointed like any module);
- :meth:`LearnedReward.fit` takes Adam steps of the squared error on minibatches of the memory.

Only the head and the memory are state: the CLIP stays frozen and is not saved with them
(:class:`fluxguide.algos.learned_reward.LearnedRewardGradient` checkpoints ``reward_head`` and ``reward_memory``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from fluxguide.rewards.base import RewardModel
from fluxguide.rewards.clip_score import CLIPScore
from fluxguide.rewards.open_clip_models import image_embeddings, text_embeddings

__all__ = ["LearnedReward", "RewardHead", "RewardMemory"]


class RewardHead(nn.Module):
    """``w * prior + MLP([e_i * e_t, e_i, e_t, prior]) -> (B,)``: two hidden GELU layers, and the CLIP's own score
    ``prior`` as an input and through a learned weight ``w`` (Residual learning on a zero-shot prior: what the
    black box agrees with in CLIP's judgement is one weight away). ``w`` and the output layer start at zero, so
    an unfitted head scores every image alike and gives the policy no gradient."""

    def __init__(self, embed_dim: int, hidden: int = 256) -> None:
        super().__init__()
        if embed_dim < 1 or hidden < 1:
            raise ValueError(f"RewardHead: embed_dim={embed_dim} and hidden={hidden} must be >= 1")
        self.net = nn.Sequential(nn.Linear(3 * embed_dim + 1, hidden), nn.GELU(), nn.Linear(hidden, hidden),
                                 nn.GELU(), nn.Linear(hidden, 1))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)
        self.prior_weight = nn.Parameter(torch.zeros(()))

    def forward(self, image: torch.Tensor, text: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
        features = torch.cat([image * text, image, text, prior[:, None]], dim=-1)
        return self.prior_weight * prior + self.net(features).squeeze(-1)


class RewardMemory(nn.Module):
    """The embeddings and black-box scores of the last ``capacity`` scored images (a ring buffer).

    Its buffers have fixed shapes (``capacity`` rows, ``count`` the rows written so far), so ``state_dict`` /
    ``load_state_dict`` and the run's checkpoints keep it exactly.
    """

    def __init__(self, embed_dim: int, capacity: int = 10240) -> None:
        super().__init__()
        if capacity < 1:
            raise ValueError(f"RewardMemory: capacity must be >= 1, got {capacity}")
        self.capacity = int(capacity)
        self.register_buffer("image", torch.zeros(capacity, embed_dim))
        self.register_buffer("text", torch.zeros(capacity, embed_dim))
        self.register_buffer("prior", torch.zeros(capacity))
        self.register_buffer("target", torch.zeros(capacity))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))

    def __len__(self) -> int:
        return min(int(self.count), self.capacity)

    @torch.no_grad()
    def add(self, image: torch.Tensor, text: torch.Tensor, prior: torch.Tensor, target: torch.Tensor) -> None:
        """Append ``B`` rows (the oldest are overwritten once the memory is full)."""
        rows = (int(self.count) + torch.arange(len(target))) % self.capacity
        self.image[rows] = image.detach().to(self.image)
        self.text[rows] = text.detach().to(self.text)
        self.prior[rows] = prior.detach().to(self.prior)
        self.target[rows] = target.detach().to(self.target)
        self.count += len(target)

    def sample(self, size: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, ...]:
        """``size`` rows drawn uniformly with replacement: ``(image, text, prior, target)``."""
        if len(self) == 0:
            raise ValueError("RewardMemory.sample: the memory is empty; add scored images first")
        rows = torch.randint(len(self), (size,), generator=generator).to(self.target.device)
        return self.image[rows], self.text[rows], self.prior[rows], self.target[rows]


class LearnedReward(RewardModel):
    """A differentiable surrogate of a black-box reward on a frozen CLIP's embeddings (module docstring).

    Args:
        clip: the frozen feature model: a :class:`CLIPScore` (its open_clip model, preprocessing and text cache;
            its own score is not used). Not a submodule: it is neither trained nor saved with the head.
        hidden: width of the head's hidden layers.
        capacity: rows of the memory (scored images kept for fitting).
    """

    differentiable = True

    def __init__(self, clip: CLIPScore, *, hidden: int = 256, capacity: int = 10240) -> None:
        super().__init__()
        if not isinstance(clip, CLIPScore):
            raise TypeError(f"LearnedReward needs a CLIPScore reward for its embeddings, got {type(clip).__name__} "
                            "(e.g. the shapes world's 'shapes-clip', or 'clip' with its weights)")
        self._clip = (clip.requires_grad_(False).eval(),)  # a tuple: kept out of this module's parameters and state
        device = next(clip.model.parameters()).device
        with torch.no_grad():
            dim = int(text_embeddings(clip.model, clip.tokenizer, [""], device).shape[-1])
        self.head = RewardHead(dim, hidden)
        self.memory = RewardMemory(dim, capacity)

    @property
    def clip(self) -> CLIPScore:
        return self._clip[0]

    def embed(self, images: torch.Tensor, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The head's inputs, differentiable in ``images``: the normalised image and (cached) text embeddings
        ``(B, D)`` and the CLIP reward's own score ``(B,)`` (the prior)."""
        clip = self.clip
        image = image_embeddings(clip.model, clip.preprocess, images)
        return image, clip.text_features(prompts, image.device), clip.score_embeddings(image, prompts)

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return self.head(*self.embed(images, prompts))

    @torch.no_grad()
    def remember(self, images: torch.Tensor, prompts: list[str], targets: torch.Tensor,
                 embedded: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> dict[str, float]:
        """Store the black box's scores ``targets`` of ``images``; returns the head's error on them *before*
        it sees them (``surrogate_rmse``: its error on new samples of the policy) and their correlation
        (``surrogate_corr``, 0 when either side is constant). ``embedded``: :meth:`embed`'s output for these
        images when the caller has it (the image tower then runs once for remembering and scoring)."""
        image, text, prior = (t.detach() for t in embedded) if embedded is not None else self.embed(images, prompts)
        predicted = self.head(image, text, prior)
        self.memory.add(image, text, prior, targets)
        error = float((predicted - targets.float()).square().mean().sqrt())
        both = torch.stack([predicted, targets.float()])
        corr = torch.corrcoef(both)[0, 1] if both.std(dim=1).min() > 0 else torch.zeros(())
        return {"surrogate_rmse": error, "surrogate_corr": float(corr)}

    def fit(self, optimizer: torch.optim.Optimizer, steps: int, batch_size: int,
            generator: torch.Generator | None = None,
            before_step: Callable[[list[nn.Parameter]], None] | None = None) -> dict[str, float]:
        """``steps`` optimizer steps of the squared error on minibatches of the memory; returns the mean loss.

        ``before_step(parameters)`` runs between each backward pass and its step (e.g.
        :func:`fluxguide.distributed.average_gradients`: every process then keeps the same head)."""
        losses = []
        self.head.train()
        with torch.enable_grad():
            for _ in range(steps):
                image, text, prior, target = self.memory.sample(batch_size, generator)
                loss = (self.head(image, text, prior) - target).square().mean()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if before_step is not None:
                    before_step(list(self.head.parameters()))
                optimizer.step()
                losses.append(float(loss.detach()))
        return {"surrogate_fit_loss": sum(losses) / len(losses) if losses else 0.0}

    def extra_repr(self) -> str:
        return f"clip={type(self.clip.model).__name__}, memory={len(self.memory)}/{self.memory.capacity}"
