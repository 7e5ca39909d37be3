"""The seed's collectors: :class:`StateCollectionCallback` (states of sampler runs you make) and
:class:`GuidanceDataCollector` (whole collections with a target strategy), both appending to a
:class:`~fluxguide.data.store.GuidanceDataset`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from tensordict import TensorDict

from fluxguide.backbones.base import Backbone
from fluxguide.backbones.prompt_check import check_backbone_prompts
from fluxguide.data.episodes import EpisodeChunk, TargetsArg, create_training_pairs
from fluxguide.data.store import GuidanceDataset, check_collection_settings
from fluxguide.data.targets import TARGET_STRATEGIES, CollectionBatch, TargetStrategy, make_target_strategy
from fluxguide.locking import FolderLock
from fluxguide.provenance import backbone_fingerprint


class StateCollectionCallback:
    """Collect and organise the states of many generations, then append them to a dataset (the seed's API).

    ``on_generation_complete(prompt, states, final_image)`` after each
    :func:`~fluxguide.sampling.instrumented.denoise_with_state_collection`, then ``save_to_disk(path)``.
    With ``episodes_per_chunk`` the buffered episodes are appended automatically whenever that many have
    accumulated, so a long collection that crashes loses at most one chunk.

    Args:
        save_dir: the dataset folder (created if needed).
        episodes_per_chunk: append automatically every this many episodes; ``None`` waits for
            :meth:`save_to_disk`.
        metadata: dataset-level metadata (checked against an existing dataset's).
    """

    def __init__(self, save_dir: str | Path, episodes_per_chunk: int | None = None,
                 metadata: dict[str, Any] | None = None) -> None:
        if episodes_per_chunk is not None and episodes_per_chunk < 1:
            raise ValueError(f"episodes_per_chunk must be >= 1 or None, got {episodes_per_chunk}")
        self.save_dir = Path(save_dir)
        self.episodes_per_chunk = episodes_per_chunk
        self.metadata = dict(metadata or {})
        self.pending: list[EpisodeChunk] = []

    @property
    def num_pending(self) -> int:
        """Episodes collected but not yet on disk."""
        return sum(c.num_episodes for c in self.pending)

    def on_generation_complete(
        self,
        prompt: str | Sequence[str],
        states: TensorDict,
        final_image: torch.Tensor | None = None,
        targets: TargetsArg = None,
        rewards: torch.Tensor | None = None,
    ) -> None:
        """Record one generation (a batch of ``B`` samples): see :func:`create_training_pairs`."""
        self.add_chunk(create_training_pairs(states, prompt, targets, final_image=final_image, rewards=rewards))

    def add_chunk(self, chunk: EpisodeChunk) -> None:
        """Record already-built pairs; appends to disk when ``episodes_per_chunk`` are pending."""
        self.pending.append(chunk)
        if self.episodes_per_chunk is not None and self.num_pending >= self.episodes_per_chunk:
            self.save_to_disk()

    def save_to_disk(self, path: str | Path | None = None) -> GuidanceDataset:
        """Append every pending episode to the dataset at ``path`` (default ``save_dir``) as one chunk."""
        dataset = GuidanceDataset.create(Path(path) if path is not None else self.save_dir, self.metadata)
        if self.pending:
            dataset.append(EpisodeChunk.cat(self.pending))
            self.pending = []
        return dataset


class GuidanceDataCollector:
    """Automated data collection from generations (the seed's ``GuidanceDataCollector``).

    Args:
        backbone: the base model.
        strategy: a :class:`TargetStrategy` or its name (built with ``strategy_kwargs``).
        num_steps: sampler steps (default: the backbone's).
        **strategy_kwargs: arguments of the named strategy.
    """

    def __init__(self, backbone: Backbone, strategy: TargetStrategy | str, num_steps: int | None = None,
                 **strategy_kwargs: Any) -> None:
        if isinstance(strategy, str):
            strategy = make_target_strategy(strategy, **strategy_kwargs)
        elif strategy_kwargs:
            raise TypeError(f"strategy kwargs {sorted(strategy_kwargs)} only apply when strategy is a name")
        if not isinstance(strategy, TargetStrategy):
            raise TypeError(
                f"strategy must be a TargetStrategy or one of {sorted(TARGET_STRATEGIES)}, got {type(strategy).__name__}"
            )
        self.backbone, self.strategy = backbone, strategy
        self.timesteps = backbone.schedule(num_steps)  # refuses 0 and negatives; None: the backbone's default
        self.num_steps = len(self.timesteps) - 1

    def metadata(self) -> dict[str, Any]:
        """Dataset-level facts: the strategy's settings, the backbone (class and weights) and the number of steps of
        the sampler the pairs train (``num_steps``; the collection's own is ``collected_steps`` where they differ)."""
        # The fingerprint makes appending to a dataset of another base model's states an error (see create).
        steps = self.strategy.sampling_steps(self.num_steps)
        facts = {**self.strategy.config(), "backbone": type(self.backbone).__name__, "num_steps": steps,
                 "backbone_fingerprint": backbone_fingerprint(self.backbone)}
        return facts if steps == self.num_steps else {**facts, "collected_steps": self.num_steps}

    def batch_generator(self, seed: int, batch_index: int) -> torch.Generator:
        """The generator of batch ``batch_index``: a function of both, so a resumed collection draws the same."""
        return torch.Generator(device="cpu").manual_seed(seed * 1_000_003 + batch_index)

    def collect(self, prompts: Sequence[str], seed: int = 0, batch_index: int = 0) -> EpisodeChunk:
        """Collect one batch: one trajectory per prompt (before the strategy's filtering)."""
        prompts = list(prompts)
        if not prompts:
            raise ValueError("collect needs at least one prompt")
        check_backbone_prompts(self.backbone, prompts)  # before the strategy runs any model on them
        generator = self.batch_generator(seed, batch_index)
        noise = torch.randn((len(prompts), *self.backbone.latent_shape), generator=generator)
        noise = noise.to(self.backbone.device)
        chunk = self.strategy.collect(CollectionBatch(self.backbone, prompts, noise, self.timesteps, generator))
        chunk.metadata.update({"batch_index": batch_index, "seed": seed})
        return chunk

    def collect_to(
        self,
        path: str | Path,
        prompts: Sequence[str],
        batch_size: int = 64,
        seed: int = 0,
        on_chunk: Callable[[int, EpisodeChunk], None] | None = None,
    ) -> GuidanceDataset:
        """Collect ``prompts`` in batches, appending each batch as one chunk of the dataset at ``path``.

        Resumable: batches whose ``(seed, batch_index)`` the dataset already holds are skipped, so rerunning
        after a crash finishes the collection without duplicating episodes.

        Args:
            path: the dataset folder (created, or appended to).
            prompts: every prompt to sample (repeat prompts for several samples per prompt).
            batch_size: prompts per batch (and per chunk).
            seed: the collection's seed.
            on_chunk: called as ``on_chunk(batch_index, chunk)`` after each append (progress, logging).
        """
        prompts = list(prompts)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if prompts:  # all of them, before the first batch
            check_backbone_prompts(self.backbone, list(dict.fromkeys(prompts)))
        with FolderLock(path, "dataset folder"):  # one collection at a time per dataset folder
            dataset = GuidanceDataset.create(path, self.metadata())
            check_collection_settings(dataset, seed, {"batch_size": batch_size})
            done = {(m.get("seed"), m.get("batch_index")) for m in dataset.chunk_metadata}
            for batch_index, start in enumerate(range(0, len(prompts), batch_size)):
                if (seed, batch_index) in done:
                    continue
                chunk = self.collect(prompts[start : start + batch_size], seed=seed, batch_index=batch_index)
                chunk.metadata["batch_size"] = batch_size
                if chunk.num_episodes:
                    dataset.append(chunk)
                if on_chunk is not None:
                    on_chunk(batch_index, chunk)
        return dataset
