import dataclasses
from pathlib import Path

import torch
from torch import nn


def leaf_fields(cls) -> list[dataclasses.Field]:
    """The fields of a script's ``Config`` with its nested groups' fields in their place (their flags carry no
    prefix: ``--seed``, not ``--run.seed``)."""
    out = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
        out += leaf_fields(type(default)) if dataclasses.is_dataclass(default) else [f]
    return out


def saved_start_policy(folder: Path) -> tuple[nn.Module, Path]:
    """A small non-zero attention policy for the shapes-random world, as a distilled start is, and the file it is
    saved in (``folder/start.safetensors``): the ``--init-policy`` of the scripts' distilled-start tests."""
    from fluxguide.backbones.registry import build_backbone
    from fluxguide.policies import save_guidance_model
    from fluxguide.policies.registry import build_policy

    start = build_policy("attention", build_backbone("shapes-random", seed=0), hidden_dim=16, num_layers=1,
                         num_heads=2)
    with torch.no_grad():
        for p in start.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return start, save_guidance_model(start, folder / "start.safetensors")
