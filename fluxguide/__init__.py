"""fluxguide: reinforcement learning for learned guidance of Flux (rectified-flow) image sampling."""

__version__ = "0.1.0"
