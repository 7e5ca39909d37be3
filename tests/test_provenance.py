"""Backbone fingerprints: equal for equal weights, different after any retraining; resume checks name the fix."""

from __future__ import annotations

import pytest
import torch

from fluxguide.backbones.registry import build_backbone
from fluxguide.provenance import backbone_fingerprint, check_resume_fingerprint


def test_fingerprint_follows_the_weights() -> None:
    a, b = build_backbone("shapes-random", seed=0), build_backbone("shapes-random", seed=0)
    assert backbone_fingerprint(a) == backbone_fingerprint(b)
    assert backbone_fingerprint(a) != backbone_fingerprint(build_backbone("shapes-random", seed=1))
    with torch.no_grad():  # one sampled value of one tensor (index 0 is always sampled)
        next(b.transformer.parameters()).view(-1)[0] += 1e-3
    assert backbone_fingerprint(a) != backbone_fingerprint(b)


def test_resume_check() -> None:
    check_resume_fingerprint("abc", "abc", "run/checkpoints/step_000000003")
    check_resume_fingerprint(None, "abc", "run/checkpoints/step_000000003")  # written before fingerprints
    with pytest.raises(RuntimeError, match=r"fingerprint old; the one loaded now is new.*delete run to restart"):
        check_resume_fingerprint("old", "new", "run/checkpoints/step_000000003")


def test_digest_of_a_module_with_a_scalar_parameter() -> None:
    # PPO's --learn-std and BC's gaussian_nll hold a 0-dim log-std; check_in_sync digests it at the end of a run.
    from torch import nn

    from fluxguide.provenance import state_dict_digest

    a, b = nn.Module(), nn.Module()
    a.log_std, b.log_std = nn.Parameter(torch.tensor(0.5)), nn.Parameter(torch.tensor(0.5))
    assert state_dict_digest(a) == state_dict_digest(b) == state_dict_digest(a, values_per_tensor=4)
    with torch.no_grad():
        b.log_std += 1e-3
    assert state_dict_digest(a) != state_dict_digest(b)
