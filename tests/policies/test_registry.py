"""The one registry of guidance architectures: a class declares its name, text awareness and (for a composite) its
parts once, and is then built by name, rebuilt from a checkpoint by class name, and read by PPO's actors."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from fluxguide.policies import (
    ARCHITECTURES,
    AffineGuidance,
    BaseGuidanceModel,
    CompositeGuidance,
    GuidancePart,
    MultiObjectiveGuidance,
    StepSpecificGuidance,
    TimestepRangeGuidance,
    build_guidance_model,
    coefficient_parts,
    is_coefficient_policy,
    load_guidance_model,
    save_guidance_model,
)
from fluxguide.policies.registry import POLICIES, PolicyOptionError, build_policy


class DeclaredScaledPred(BaseGuidanceModel, architecture="test-scaled-pred"):
    """A text-blind one-parameter network, ``w * pred``, declared by name in its class statement."""

    text_aware = False

    def __init__(self, scale: float = 0.0, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.register_config(scale=scale)
        self.w = nn.Parameter(torch.full((), scale, device=device))

    @classmethod
    def for_backbone(cls, backbone: Any, *, device: torch.device | str) -> DeclaredScaledPred:
        return cls(0.5, device=device)

    def forward(self, img, pred, txt, vec, timestep, step_idx):
        return self.w * pred


class HalvedGuidance(CompositeGuidance):
    """A user's composite: half of its one part's correction, declared as a part of weight 0.5."""

    combine = "sum"

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def parts(self) -> list[GuidancePart]:
        return [GuidancePart(self.model, 0.5)]

    def config_entries(self, child):
        return {"model": child(self.model)}

    @classmethod
    def constructor_arguments(cls, config, build):
        return {"model": build(config["model"])}


def test_one_registry_holds_names_and_classes():
    assert POLICIES is ARCHITECTURES
    assert {"mlp", "attention", "conv", "affine", "test-scaled-pred"} <= set(ARCHITECTURES.names())
    for cls in ("MLPGuidanceModel", "TimestepRangeGuidance", "CoarseGuidance", "DeclaredScaledPred", "HalvedGuidance"):
        assert ARCHITECTURES.guidance_class(cls).__name__ == cls
    with pytest.raises(ValueError, match="unknown guidance model type 'Nope'"):
        ARCHITECTURES.guidance_class("Nope")


def test_declared_architecture_is_built_by_name_and_rebuilt_from_its_file(backbone, tmp_path):
    policy = build_policy("test-scaled-pred", backbone, min_t=0.5)
    assert isinstance(policy, TimestepRangeGuidance) and isinstance(policy.models[0], DeclaredScaledPred)
    loaded = load_guidance_model(save_guidance_model(policy, tmp_path / "p.safetensors"))
    assert float(loaded.models[0].w) == 0.5


def test_text_awareness_is_declared_by_the_architecture(backbone):
    assert ARCHITECTURES.text_blind_names() == ["affine", "attention", "test-scaled-pred"]
    assert not build_policy("test-scaled-pred", backbone, text_conditioning=False).text_aware
    assert not build_policy("attention", backbone, hidden_dim=8, num_layers=1, text_conditioning=False).text_aware
    assert build_policy("attention", backbone, hidden_dim=8, num_layers=1).text_aware
    with pytest.raises(PolicyOptionError, match="policy 'conv' built a ConvGuidanceModel, which reads the prompt"):
        build_policy("conv", backbone, hidden_dim=8, num_layers=1, text_conditioning=False)
    blind, aware = DeclaredScaledPred(), build_policy("mlp", backbone, hidden_dim=8, num_layers=1)
    assert not MultiObjectiveGuidance([blind, AffineGuidance(48, 3)]).text_aware
    assert MultiObjectiveGuidance([blind, aware]).text_aware
    assert StepSpecificGuidance({(0, 2): aware}).text_aware


def test_a_name_is_held_by_one_class():
    with pytest.raises(ValueError, match="'test-scaled-pred' is already registered"):
        type("Other", (DeclaredScaledPred,), {"for_backbone": classmethod(lambda cls, backbone: cls())},
             architecture="test-scaled-pred")
    with pytest.raises(TypeError, match="no for_backbone"):
        type("Nameless", (DeclaredScaledPred,), {}, architecture="test-nameless")


def test_an_entry_point_or_spec_may_name_the_class(backbone):
    assert ARCHITECTURES.factory(f"{__name__}:DeclaredScaledPred") == DeclaredScaledPred.for_backbone
    assert type(build_policy(f"{__name__}:DeclaredScaledPred", backbone)) is DeclaredScaledPred


def test_composite_structure_is_declared_and_runs_the_composite(tmp_path):
    inner = DeclaredScaledPred(0.8)
    halved = HalvedGuidance(inner)
    img = torch.randn(2, 4, 6)
    torch.testing.assert_close(halved(img, img, img, img[:, 0], torch.ones(2), 0), 0.4 * img)
    loaded = load_guidance_model(save_guidance_model(halved, tmp_path / "h.safetensors"))
    assert isinstance(loaded, HalvedGuidance) and loaded.config == halved.config == build_guidance_model(halved.config).config


def test_coefficient_exploration_reads_the_declared_parts():
    affine = AffineGuidance(48, 3)
    body = DeclaredScaledPred()
    assert coefficient_parts(TimestepRangeGuidance([((0.4, 1.0), affine)]))[1:] == (affine, 0.4)
    assert coefficient_parts(MultiObjectiveGuidance([body, affine])) == (body, affine, 0.0)
    assert coefficient_parts(MultiObjectiveGuidance([affine])) == (None, affine, 0.0)  # a sum of one part
    for not_coefficients in (
        TimestepRangeGuidance([((0.0, 0.5), affine)]),       # acts late only: not a min_t wrapper
        StepSpecificGuidance({(0, 3): affine}),              # a step range
        MultiObjectiveGuidance([body, affine], [1.0, 0.5]),  # a weighted head
        TimestepRangeGuidance([((0.0, 1.0), body), ((0.0, 1.0), affine)]),  # routed, not summed
        HalvedGuidance(affine),
    ):
        assert not is_coefficient_policy(not_coefficients), not_coefficients
