"""Episodes of behaviour-cloning data: (observation, target correction) pairs before they reach the store.

:func:`create_training_pairs` (the seed's) turns the states of
:func:`~fluxguide.sampling.instrumented.denoise_with_state_collection` into an :class:`EpisodeChunk`: per-episode
constants (``txt``, ``vec``, final image, reward) stored once, and flat per-step transitions that point at their
episode. :mod:`fluxguide.data.store` appends chunks to a dataset folder.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from tensordict import TensorDict

from fluxguide import keys
from fluxguide.sampling.instrumented import PRED_USED, T_PREV

TARGET = "target"
"""The target correction of a transition, shaped like ``pred``."""
EPISODE = "episode"
"""Index of a transition's episode (into the chunk's episodes on disk, into the dataset once loaded)."""
REWARD = "reward"
"""Per-episode reward of the final image, when the collector computed one."""
FINAL_IMAGE = "final_image"
"""Per-episode decoded final image ``(3, H, W)`` in [0, 1], when given."""

EPISODE_CONSTANTS: tuple[str, ...] = (keys.TXT, keys.VEC)
"""Episode entries joined onto each sampled transition (the observation needs them)."""
TRANSITION_KEYS: tuple[str, ...] = (keys.IMG, keys.PRED, TARGET, keys.T, T_PREV, keys.STEP, EPISODE)


@dataclass
class EpisodeChunk:
    """Episodes ready to be appended: per-episode constants, flat per-step transitions and the prompts.

    Attributes:
        episodes: TensorDict ``[E]`` with at least ``txt`` and ``vec``.
        transitions: TensorDict ``[N]`` with ``img``, ``pred``, ``target``, ``t``, ``t_prev``, ``step`` and
            ``episode`` (in ``[0, E)``).
        prompts: the ``E`` prompts.
        metadata: JSON-serialisable facts about the chunk (how it was collected), kept in the manifest.
    """

    episodes: TensorDict
    transitions: TensorDict
    prompts: list[str]
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        e = self.episodes.batch_size
        if len(e) != 1 or len(self.transitions.batch_size) != 1:
            raise ValueError(
                f"episodes and transitions must have one batch dim, got {tuple(e)} and "
                f"{tuple(self.transitions.batch_size)}"
            )
        missing = [k for k in EPISODE_CONSTANTS if k not in self.episodes]
        missing += [k for k in TRANSITION_KEYS if k not in self.transitions]
        if missing:
            raise ValueError(f"an episode chunk is missing the entries {missing}")
        if len(self.prompts) != e[0]:
            raise ValueError(f"{e[0]} episodes but {len(self.prompts)} prompts: give one prompt per episode")
        target, pred = self.transitions[TARGET], self.transitions[keys.PRED]
        if target.shape != pred.shape:
            raise ValueError(
                f"targets have shape {tuple(target.shape)} but predictions {tuple(pred.shape)}: a target "
                "correction must be shaped like the prediction"
            )
        ep = self.transitions[EPISODE]
        if ep.numel() and (int(ep.min()) < 0 or int(ep.max()) >= e[0]):
            raise ValueError(f"episode indices must lie in [0, {e[0]}), got [{int(ep.min())}, {int(ep.max())}]")

    @property
    def num_episodes(self) -> int:
        return self.episodes.batch_size[0]

    @property
    def num_transitions(self) -> int:
        return self.transitions.batch_size[0]

    @classmethod
    def cat(cls, chunks: Sequence[EpisodeChunk], metadata: dict[str, Any] | None = None) -> EpisodeChunk:
        """One chunk holding ``chunks`` in order (episode indices shifted accordingly)."""
        if not chunks:
            raise ValueError("EpisodeChunk.cat needs at least one chunk")
        offsets = torch.tensor([0] + [c.num_episodes for c in chunks[:-1]]).cumsum(0)
        transitions = []
        for chunk, offset in zip(chunks, offsets.tolist(), strict=True):
            t = chunk.transitions.clone()
            t[EPISODE] = t[EPISODE] + offset
            transitions.append(t)
        return cls(
            episodes=torch.cat([c.episodes for c in chunks]),
            transitions=torch.cat(transitions),
            prompts=[p for c in chunks for p in c.prompts],
            metadata=dict(metadata if metadata is not None else chunks[0].metadata),
        )

    def select_episodes(self, keep: torch.Tensor) -> EpisodeChunk:
        """The chunk restricted to the episodes where the boolean ``keep`` ``(E,)`` is true (renumbered)."""
        keep = keep.to(torch.bool).cpu()
        if keep.shape != (self.num_episodes,):
            raise ValueError(f"keep must be a boolean ({self.num_episodes},) mask, got {tuple(keep.shape)}")
        new_index = torch.full((self.num_episodes,), -1, dtype=torch.long)
        new_index[keep] = torch.arange(int(keep.sum()))
        ep = self.transitions[EPISODE].cpu()
        transitions = self.transitions[keep[ep].to(self.transitions.device)].clone()
        transitions[EPISODE] = new_index[transitions[EPISODE].cpu()].to(transitions.device)
        return EpisodeChunk(
            episodes=self.episodes[keep.to(self.episodes.device)],
            transitions=transitions,
            prompts=[p for p, k in zip(self.prompts, keep.tolist(), strict=True) if k],
            metadata=dict(self.metadata),
        )


TargetsArg = torch.Tensor | Callable[[TensorDict], torch.Tensor] | None


def create_training_pairs(
    states: TensorDict,
    prompts: str | Sequence[str],
    targets: TargetsArg = None,
    *,
    final_image: torch.Tensor | None = None,
    rewards: torch.Tensor | None = None,
    metadata: dict[str, Any] | None = None,
) -> EpisodeChunk:
    """Turn the states of :func:`~fluxguide.sampling.instrumented.denoise_with_state_collection` into pairs.

    Args:
        states: the collected states, batch ``[B]`` with a step dimension ``T`` on per-step entries.
        prompts: one prompt per sample (a single string is allowed for ``B == 1``).
        targets: the target corrections ``(B, T, seq, C)``, or a function of ``states`` returning them.
            ``None`` uses the correction the sampler actually applied, ``pred_used - pred`` (at guidance
            scale 1): collect with a teacher as the guidance model and the student learns to imitate it.
        final_image: decoded final images ``(B, 3, H, W)`` in [0, 1], stored once per episode.
        rewards: a reward per episode ``(B,)``, stored once per episode.
        metadata: JSON-serialisable facts about how the chunk was collected.

    Returns:
        An :class:`EpisodeChunk` with ``B`` episodes and ``B * T`` transitions (episode-major order).
    """
    if not isinstance(states, TensorDict) or len(states.batch_size) != 1:
        raise TypeError(
            "states must be the TensorDict [B] returned by denoise_with_state_collection(..., save_states=True), "
            f"got {type(states).__name__}"
        )
    b = states.batch_size[0]
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if len(prompts) != b:
        raise ValueError(f"states hold {b} samples but {len(prompts)} prompts were given: pass one per sample")
    img, pred = states[keys.IMG], states[keys.PRED]
    if targets is None:
        if PRED_USED not in states:
            raise ValueError("states carry no 'pred_used'; pass targets= explicitly")
        targets = states[PRED_USED] - pred
    elif callable(targets):
        targets = targets(states)
    if not isinstance(targets, torch.Tensor) or targets.shape != pred.shape:
        got = tuple(targets.shape) if isinstance(targets, torch.Tensor) else type(targets).__name__
        raise ValueError(
            f"targets must be shaped like the per-step predictions {tuple(pred.shape)} (B, T, seq, C), got {got}"
        )
    num_steps = img.shape[1]
    flat = {
        keys.IMG: img,
        keys.PRED: pred,
        TARGET: targets.to(pred.dtype),
        keys.T: states[keys.T].float(),
        T_PREV: states[T_PREV].float(),
        keys.STEP: states[keys.STEP].long(),
        EPISODE: torch.arange(b, device=img.device)[:, None].expand(b, num_steps),
    }
    transitions = TensorDict(
        {k: v.detach().reshape(b * num_steps, *v.shape[2:]).contiguous() for k, v in flat.items()},
        batch_size=[b * num_steps],
    )
    episode = {keys.TXT: states[keys.TXT].detach(), keys.VEC: states[keys.VEC].detach()}
    if final_image is not None:
        if final_image.shape[0] != b:
            raise ValueError(f"final_image holds {final_image.shape[0]} images for {b} episodes")
        episode[FINAL_IMAGE] = final_image.detach().float()
    if rewards is not None:
        if rewards.shape != (b,):
            raise ValueError(f"rewards must be ({b},), one per episode, got {tuple(rewards.shape)}")
        episode[REWARD] = rewards.detach().float()
    return EpisodeChunk(TensorDict(episode, batch_size=[b]), transitions, prompts, dict(metadata or {}))
