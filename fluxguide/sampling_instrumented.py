"""The seed's ``flux.sampling_instrumented`` module under its fluxguide path (state collection while sampling).

Aliases of :mod:`fluxguide.sampling.instrumented`, :mod:`fluxguide.data.episodes` and :mod:`fluxguide.data.collector`.
"""

from fluxguide.data.collector import StateCollectionCallback
from fluxguide.data.episodes import create_training_pairs
from fluxguide.sampling.instrumented import denoise_with_state_collection

__all__ = ["StateCollectionCallback", "create_training_pairs", "denoise_with_state_collection"]
