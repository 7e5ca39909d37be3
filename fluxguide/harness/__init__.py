"""What every experiment script shares: the option groups, the run (folder, resume, loop, budgets, checkpoints),
tracking, held-out evaluation, curves and sample grids (docs/design.md, "harness")."""

from fluxguide.harness.config import BackboneConfig, Flat, PolicyConfig, RewardConfig, RunConfig, TrainConfig
from fluxguide.harness.run import Run

__all__ = ["BackboneConfig", "Flat", "PolicyConfig", "RewardConfig", "Run", "RunConfig", "TrainConfig"]
