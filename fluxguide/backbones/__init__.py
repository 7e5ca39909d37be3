"""Base models behind one contract: Flux (diffusers), any BFL-signature module, a tiny random Flux.

Worlds (``fluxguide.worlds``) implement the same contract and register themselves by entry point:
``build_backbone("shapes")``.

Exports are lazy: importing the Flux backbone pulls in diffusers and transformers, which shapes-world users
need not pay for.
"""

from __future__ import annotations

from fluxguide.backbones.base import Backbone, Conditioning
from fluxguide.backbones.prompt_check import PromptError, check_backbone_prompts
from fluxguide.lazy import lazy_attributes

_LAZY = {
    "FluxBackbone": "fluxguide.backbones.flux",
    "REQUIRED_SUBFOLDERS": "fluxguide.backbones.flux_source",
    "BFLBackbone": "fluxguide.backbones.bfl",
    "BFLFlux": "fluxguide.backbones.bfl",
    "TinyFluxBackbone": "fluxguide.backbones.tiny_flux",
    "save_tiny_flux_pipeline": "fluxguide.backbones.tiny_flux",
    "tiny_flux_components": "fluxguide.backbones.tiny_flux",
    "tiny_flux_transformer": "fluxguide.backbones.tiny_flux",
}

__all__ = [  # noqa: RUF022 - contract first, then the lazy exports
    "Backbone",
    "Conditioning",
    "PromptError",
    "check_backbone_prompts",
    "FluxBackbone",
    "REQUIRED_SUBFOLDERS",
    "BFLBackbone",
    "BFLFlux",
    "TinyFluxBackbone",
    "save_tiny_flux_pipeline",
    "tiny_flux_components",
    "tiny_flux_transformer",
]


__getattr__, __dir__ = lazy_attributes(__name__, _LAZY)
