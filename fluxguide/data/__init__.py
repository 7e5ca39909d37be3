"""Data for behaviour cloning: episodes, the crash-safe dataset store, teachers, target strategies, the collector.

- :mod:`~fluxguide.data.episodes`: :class:`EpisodeChunk` and the seed's :func:`create_training_pairs`;
- :mod:`~fluxguide.data.store`: :class:`GuidanceDataset`, the append-safe memory-mapped dataset folder;
- :mod:`~fluxguide.data.teachers`: guidance functions whose corrections are targets (CFG, reward gradient, ...);
- :mod:`~fluxguide.data.targets`: the target strategies (:data:`TARGET_STRATEGIES`), on the interface of
  :mod:`~fluxguide.data.strategy`; the distillations (CFG, a trained policy) in :mod:`~fluxguide.data.distillation`;
- :mod:`~fluxguide.data.collector`: the seed's :class:`StateCollectionCallback` and :class:`GuidanceDataCollector`.
"""

from fluxguide.data.collector import GuidanceDataCollector, StateCollectionCallback
from fluxguide.data.episodes import EpisodeChunk, create_training_pairs
from fluxguide.data.store import DatasetError, GuidanceDataset, load_guidance_dataset
from fluxguide.data.targets import TARGET_STRATEGIES, TargetStrategy, make_target_strategy

__all__ = [
    "TARGET_STRATEGIES",
    "DatasetError",
    "EpisodeChunk",
    "GuidanceDataCollector",
    "GuidanceDataset",
    "StateCollectionCallback",
    "TargetStrategy",
    "create_training_pairs",
    "load_guidance_dataset",
    "make_target_strategy",
]
