"""Reward-hacking diagnostics: rewards the policy is not trained on, scored at every held-out evaluation.

Reward hacking -- the trained reward rises while what it stands for does not -- is the failure reward fine-tuning
reports most (Flow-GRPO, DanceGRPO and MixGRPO users; GRPO-Guard and Pref-GRPO exist because of it). It shows when
the same held-out images are also scored by rewards the policy never saw: a policy that makes better images raises
them too, one that found a shortcut in its reward leaves them flat or lowers them. So every training run scores its
held-out images with a few *monitored* rewards (:class:`RewardMonitor`, ``--monitor-rewards``; the shapes world
monitors all its rewards by default) and logs each as ``eval/rewards/<name>`` with its standard error
``eval/rewards_stderr/<name>``, the trained reward among them under its own name, so that every run of a reward
study has the same curves whatever it was trained on. :func:`hacking_signs` reads two evaluations of a run and says
what fell while the trained reward rose; ``experiments/report.py`` and ``experiments/reward_study.py`` flag a run
with it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from fluxguide.rewards.base import score_in_batches

#: Each monitored reward's held-out mean is logged as ``eval/rewards/<name>`` ...
REWARD_PREFIX = "eval/rewards/"
#: ... and its standard error over the images as ``eval/rewards_stderr/<name>``.
STDERR_PREFIX = "eval/rewards_stderr/"
#: The held-out verifier's pass rate and the number of images it was measured on.
PASS_RATE, IMAGES = "eval/verifier_pass_rate", "eval/images"
#: How many standard errors a change must exceed to count (2: about a 95% two-sided test per comparison). The
#: errors of two evaluations are combined as if independent; the evaluation noise is the same at every evaluation,
#: so the true error of the difference is smaller and a change flagged here is, if anything, larger than needed.
Z_SCORE = 2.0


def reward_metrics(name: str, values: torch.Tensor) -> dict[str, float]:
    """``eval/rewards/<name>`` (the mean of ``values``) and ``eval/rewards_stderr/<name>`` (its standard error)."""
    values = values.detach().float().cpu()
    stderr = float(values.std() / math.sqrt(len(values))) if len(values) > 1 else 0.0
    return {REWARD_PREFIX + name: float(values.mean()), STDERR_PREFIX + name: stderr}


class RewardMonitor:
    """Score held-out images with rewards the policy is not trained on.

    Args:
        rewards: name -> reward module (``(images, prompts) -> (B,)``); scored without gradients.
        batch_size: images per reward call.
    """

    def __init__(self, rewards: Mapping[str, nn.Module], *, batch_size: int = 64) -> None:
        self.rewards, self.batch_size = dict(rewards), batch_size

    @classmethod
    def build(cls, backbone: nn.Module, names: Sequence[str] | None, *, trained: str | None, seed: int = 0,
              batch_size: int = 64) -> RewardMonitor:
        """The monitor of a run trained on reward ``trained`` (``None``: none, e.g. behaviour cloning): the rewards
        ``names`` (``None``: the backbone's :meth:`~fluxguide.backbones.Backbone.monitor_rewards`), the trained one
        left out, each built by the backbone as a training reward is (``Backbone.build_reward``)."""
        names = list(backbone.monitor_rewards() if names is None else names)
        # Building a reward may draw from the global RNG (a head initialised, then loaded): a resumed run builds
        # its monitor at another point of its random streams than the run it continues, so none is drawn here.
        with torch.random.fork_rng(devices=[]):
            rewards = {name: backbone.build_reward(name, seed=seed) for name in names if name != trained}
        return cls(rewards, batch_size=batch_size)

    @property
    def names(self) -> list[str]:
        """The monitored rewards' names."""
        return list(self.rewards)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> dict[str, float]:
        """Every monitored reward of ``images`` (``(B, 3, H, W)`` in [0, 1]) against ``prompts``: see
        :func:`reward_metrics`."""
        metrics: dict[str, float] = {}
        for name, reward in self.rewards.items():
            device = next((p.device for p in reward.parameters()), images.device)  # where the reward model is
            metrics.update(reward_metrics(name, score_in_batches(reward, images, prompts, batch_size=self.batch_size,
                                                                 device=device)))
        return metrics


def monitored_names(record: Mapping[str, float]) -> list[str]:
    """The rewards an evaluation record (a ``metrics.jsonl`` line) holds as ``eval/rewards/<name>``."""
    return [key.removeprefix(REWARD_PREFIX) for key in record if key.startswith(REWARD_PREFIX)]


@dataclass(frozen=True)
class Change:
    """How a held-out metric moved between two evaluations: ``delta`` with its standard error ``stderr``."""

    name: str
    delta: float
    stderr: float

    @property
    def rose(self) -> bool:
        return self.delta > Z_SCORE * self.stderr

    @property
    def fell(self) -> bool:
        return self.delta < -Z_SCORE * self.stderr

    def __str__(self) -> str:
        return f"{self.name} {self.delta:+.4g} (± {self.stderr:.2g})"


def _reward_change(first: Mapping[str, float], last: Mapping[str, float], name: str) -> Change | None:
    mean, err = REWARD_PREFIX + name, STDERR_PREFIX + name
    if mean not in first or mean not in last:
        return None
    stderr = math.hypot(first.get(err, 0.0), last.get(err, 0.0))
    return Change(name, last[mean] - first[mean], stderr)


def _pass_rate_change(first: Mapping[str, float], last: Mapping[str, float]) -> Change | None:
    if PASS_RATE not in first or PASS_RATE not in last:
        return None

    def var(record: Mapping[str, float]) -> float:  # binomial; no image count recorded: no error claimed
        n, p = record.get(IMAGES, 0), record[PASS_RATE]
        return p * (1 - p) / n if n else 0.0

    return Change("held-out verifier", last[PASS_RATE] - first[PASS_RATE], math.sqrt(var(first) + var(last)))


@dataclass(frozen=True)
class HackingSigns:
    """What moved between a run's first and last held-out evaluation.

    Attributes:
        trained: the trained reward's change on the held-out images (``None``: not recorded).
        fell: the held-out verifier and the untrained rewards that fell beyond :data:`Z_SCORE` standard errors.
        rose: those that rose beyond it.
    """

    trained: Change | None
    fell: tuple[Change, ...]
    rose: tuple[Change, ...]

    @property
    def hacked(self) -> bool:
        """The trained reward rose while the held-out verifier or an untrained reward fell (both beyond noise)."""
        return self.trained is not None and self.trained.rose and bool(self.fell)

    def __str__(self) -> str:
        if self.trained is None:
            return "no trained reward recorded"
        text = f"trained {self.trained}"
        if self.fell:
            text += "; fell: " + ", ".join(map(str, self.fell))
        if self.rose:
            text += "; rose: " + ", ".join(map(str, self.rose))
        return text


def hacking_signs(first: Mapping[str, float], last: Mapping[str, float], trained: str | None) -> HackingSigns:
    """Compare a run's first and last held-out evaluations (records with ``eval/rewards/<name>``, their standard
    errors, ``eval/verifier_pass_rate`` and ``eval/images``): the trained reward ``trained``'s change and which
    of the verifier and the untrained rewards fell or rose beyond :data:`Z_SCORE` standard errors."""
    changes = [c for c in [_pass_rate_change(first, last),
                           *(_reward_change(first, last, n) for n in monitored_names(last) if n != trained)]
               if c is not None]
    return HackingSigns(trained=_reward_change(first, last, trained) if trained else None,
                        fell=tuple(c for c in changes if c.fell), rose=tuple(c for c in changes if c.rose))
