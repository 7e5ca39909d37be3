"""The seed's ``flux.sampling_instrumented`` module under its fluxguide path (state collection while sampling).

Aliases of :mod:`fluxguide.sampling.instrumented` and :mod:`fluxguide.data.collection`.
"""

from fluxguide.data.collection import StateCollectionCallback, create_training_pairs
from fluxguide.sampling.instrumented import denoise_with_state_collection

__all__ = ["StateCollectionCallback", "create_training_pairs", "denoise_with_state_collection"]
