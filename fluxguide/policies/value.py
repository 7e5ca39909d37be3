"""A small critic for PPO with GAE: a per-token MLP pooled over the latent tokens to one value."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tensordict.utils import NestedKey
from torch import nn
from torchrl.modules import ValueOperator

from fluxguide import keys
from fluxguide.policies.actors import ObservationAdapter
from fluxguide.policies.base import GuidanceInputs
from fluxguide.policies.mlp import TokenMLPTrunk


class GuidanceValueModel(TokenMLPTrunk):
    """State value of a sampler state ``(img, pred, txt, vec, t, step) -> (B, 1)``.

    Tokens go through the trunk of :class:`~fluxguide.policies.MLPGuidanceModel` (channels, position, timestep,
    pooled text; :class:`~fluxguide.policies.mlp.TokenMLPTrunk`, whose arguments it takes), are mean-pooled over
    the sequence, and read out by a linear head. :func:`make_value_network` sizes a small one.
    """

    def build_head(self, hidden_dim: int, device: torch.device | str | None, dtype: torch.dtype | None) -> None:
        self.head = nn.Linear(hidden_dim, 1, device=device, dtype=dtype)

    def compute(
        self, img: torch.Tensor, pred: torch.Tensor, txt: torch.Tensor, vec: torch.Tensor, inputs: GuidanceInputs
    ) -> torch.Tensor:
        return self.head(nn.functional.silu(self.trunk(img, pred, vec, inputs)).mean(dim=1)).float()


def make_value_network(
    latent_channels: int = 64,
    hidden_dim: int = 256,
    num_layers: int = 2,
    vec_dim: int = 768,
    grid_size: int | tuple[int, int] | None = None,
    *,
    model: nn.Module | None = None,
    observation_keys: Sequence[NestedKey] = keys.OBSERVATION_KEYS,
    value_key: NestedKey = keys.STATE_VALUE,
    device: torch.device | str | None = None,
) -> ValueOperator:
    """A TorchRL ``ValueOperator`` reading the observation keys and writing ``"state_value"`` ``(*batch, 1)``.

    Args:
        latent_channels, hidden_dim, num_layers, vec_dim, grid_size: sizes of a new critic.
        model: use this critic (same call signature, output ``(B, 1)``) instead of building one.
        observation_keys: the six observation keys, in the order ``img, pred, txt, vec, t, step``.
        value_key: where to write the value.
        device: where to create the parameters.
    """
    if model is None:
        model = GuidanceValueModel(latent_channels, hidden_dim, num_layers, vec_dim, grid_size, device=device)
    return ValueOperator(ObservationAdapter(model), in_keys=list(observation_keys), out_keys=[value_key])
