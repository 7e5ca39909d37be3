"""Data for behaviour cloning: episodes, the crash-safe dataset store, teachers, target strategies, the collector.

The seed's ``StateCollectionCallback``, ``create_training_pairs`` and ``GuidanceDataCollector`` live here.
"""

from fluxguide.data.collection import (
    DatasetError,
    GuidanceDataset,
    StateCollectionCallback,
    create_training_pairs,
    load_guidance_dataset,
)
from fluxguide.data.targets import (
    TARGET_STRATEGIES,
    GuidanceDataCollector,
    TargetStrategy,
    make_target_strategy,
)

__all__ = [
    "TARGET_STRATEGIES",
    "DatasetError",
    "GuidanceDataCollector",
    "GuidanceDataset",
    "StateCollectionCallback",
    "TargetStrategy",
    "create_training_pairs",
    "load_guidance_dataset",
    "make_target_strategy",
]
