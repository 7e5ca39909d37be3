"""Issue 21, the library half: every bad input to a backbone, an env, the sampler, a reward or a saved policy
is refused before compute is spent, with an error that names the bad value and the fix; normal weight loads
log nothing misleading."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from fluxguide.backbones.weights import check_finite_weights
from fluxguide.envs import GuidanceCore, resolve_prompts
from fluxguide.policies import create_mlp_guidance_model, load_guidance_model, save_guidance_model
from fluxguide.policies.checkpoint import CONFIG_METADATA_KEY
from fluxguide.rewards.aesthetic import AestheticPredictor
from fluxguide.rewards.open_clip_models import load_open_clip, quiet_random_init_warning
from fluxguide.sampling import denoise, get_schedule
from fluxguide.worlds.shapes.clip import SHAPES_CLIP_NAME
from fluxguide.worlds.shapes.world import WEIGHTS_DIR, ShapesWorld
from tests.reliability import fail_if_called

LONG = "a red circle " * 800  # 10,400 characters


# --------------------------------------------------------------------------------- 1. bare strings, []
@pytest.mark.parametrize("call", ["sample", "sample_prompts"])
def test_a_bare_string_is_refused_not_sampled_per_character(shapes_random: ShapesWorld, call: str, monkeypatch) -> None:
    from fluxguide.backbones.base import sample_prompts

    monkeypatch.setattr(shapes_random, "encode", fail_if_called)
    fn = shapes_random.sample if call == "sample" else (lambda p: sample_prompts(shapes_random, p))
    with pytest.raises(TypeError, match=r"got the string 'a red circle': wrap it in a list"):
        fn("a red circle")
    with pytest.raises(ValueError, match="at least one prompt, got an empty list"):
        fn([])


# ------------------------------------------------------------------- 2. prompts the backbone cannot encode
def test_prompts_outside_the_grammar_are_refused_when_the_env_is_built(shapes_random: ShapesWorld, monkeypatch) -> None:
    monkeypatch.setattr(shapes_random, "encode", fail_if_called)
    with pytest.raises(ValueError, match=r"outside the shapes world's grammar: prompt 1: 'a purple dog'.*colors"):
        GuidanceCore(shapes_random, reward=lambda im, p: torch.zeros(len(p)), prompts=["a red circle", "a purple dog"])
    with pytest.raises(ValueError, match=r"prompt 1 is 10400 characters long") as info:
        shapes_random.sample(["a red circle", LONG])
    message = str(info.value)
    assert f"({len(LONG)} characters)" in message and len(message) < 600, message


def test_the_default_hook_refuses_empty_and_over_long_prompts(shapes_random: ShapesWorld) -> None:
    from fluxguide.backbones.base import Backbone

    with pytest.raises(ValueError, match=r"prompt 0 is 10400 characters long.*\(10400 characters\); shorten it") as info:
        Backbone.check_prompts(shapes_random, [LONG])
    assert len(str(info.value)) < 300
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        Backbone.check_prompts(shapes_random, ["a red circle", "  "])
    Backbone.check_prompts(shapes_random, ["anything a tokenizer can encode"])  # no grammar in the contract's default


def test_the_verifier_names_bad_prompts_briefly() -> None:
    from fluxguide.worlds.shapes.verifier import verify

    with pytest.raises(ValueError, match=r"\(10400 characters\)") as info:
        verify(torch.zeros(1, 3, 32, 32), [LONG])
    assert len(str(info.value)) < 600


def test_reset_with_explicit_prompts_checks_them(shapes_random: ShapesWorld) -> None:
    core = GuidanceCore(shapes_random, reward=lambda im, p: torch.zeros(len(p)), prompts=["a red circle"], batch_size=2,
                        num_steps=2)
    with pytest.raises(ValueError, match="'a purple dog'"):
        core.reset(seed=0, prompts=["a red circle", "a purple dog"])
    core.reset(seed=0, prompts=["a red circle", "a red circle"])  # two groups may share a prompt in one episode


# ---------------------------------------------------------------------------------- 3. duplicate prompts
def test_duplicate_training_prompts_are_refused_by_name(shapes_random: ShapesWorld, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"repeats 1 prompt\(s\): 'a red circle' \(2 times\).*Remove the repeats"):
        GuidanceCore(shapes_random, reward=lambda im, p: torch.zeros(len(p)),
                     prompts=["a red circle", "a blue bar", "a red circle"])
    path = tmp_path / "prompts.txt"
    path.write_text("a red circle\na blue bar\na blue bar\n")
    with pytest.raises(ValueError, match=r"prompt file .*prompts.txt.* repeats 1 prompt\(s\): 'a blue bar'"):
        resolve_prompts(path)
    assert resolve_prompts(["a red circle", "a red circle"], unique=False) == ["a red circle"] * 2


# ------------------------------------------------------------------------------------------ 4. num_steps
@pytest.mark.parametrize("steps", [0, -3])
def test_zero_or_negative_steps_are_refused_not_replaced_by_the_default(shapes_random: ShapesWorld, steps: int) -> None:
    with pytest.raises(ValueError, match=f"num_steps must be a positive integer .*got {steps}"):
        shapes_random.schedule(steps)
    with pytest.raises(ValueError, match=f"num_steps must be a positive integer .*got {steps}"):
        GuidanceCore(shapes_random, reward=lambda im, p: torch.zeros(len(p)), prompts=["a red circle"], num_steps=steps)
    assert len(shapes_random.schedule(None)) == shapes_random.default_num_steps + 1
    assert len(shapes_random.schedule(3)) == 4


# ----------------------------------------------------------------------------------------- 5. timesteps
def test_reversed_or_nan_timesteps_are_refused(shapes_random: ShapesWorld, monkeypatch) -> None:
    cond = shapes_random.encode(["a red circle"])
    x = shapes_random.noise(1, torch.Generator().manual_seed(0))
    args = (x, cond.img_ids, cond.txt, cond.txt_ids, cond.vec)
    schedule = get_schedule(4, shapes_random.latent_seq)
    with pytest.raises(ValueError, match=r"decrease strictly.*They increase.*reverse the list"):
        denoise(fail_if_called, *args, schedule[::-1], guidance=None)
    with pytest.raises(ValueError, match=r"timesteps\[2\]=0.5 is not below timesteps\[1\]=0.5"):
        denoise(fail_if_called, *args, [1.0, 0.5, 0.5, 0.0], guidance=None)
    with pytest.raises(ValueError, match=r"timesteps\[1\] is nan"):
        denoise(fail_if_called, *args, [1.0, float("nan"), 0.0], guidance=None)
    out = denoise(shapes_random, *args, schedule, guidance=None)
    assert torch.isfinite(out).all()


# ------------------------------------------------------------------------------------- 6. guidance_scale
def guide(img, pred, txt, vec, t, i):
    return torch.zeros_like(pred)


@pytest.mark.parametrize("scale", ["2", b"2", object(), [1.0, "x", 1.0]])
def test_a_non_number_guidance_scale_names_the_accepted_forms(shapes_random: ShapesWorld, scale: object) -> None:
    match = r"(guidance_scale must be a float, a list with one float per step, or a callable|must hold numbers)"
    with pytest.raises(TypeError, match=match):
        shapes_random.sample(["a red circle"], num_steps=3, guidance_model=guide, guidance_scale=scale)
    with pytest.raises(TypeError, match=match):
        GuidanceCore(shapes_random, reward=lambda im, p: torch.zeros(len(p)), prompts=["a red circle"], num_steps=3,
                     guidance_scale=scale)


def test_the_string_scale_message_suggests_the_number(shapes_random: ShapesWorld) -> None:
    with pytest.raises(TypeError, match=r"got the string '2'; pass a number \(guidance_scale=2.0, not '2'\)"):
        shapes_random.sample(["a red circle"], num_steps=3, guidance_model=guide, guidance_scale="2")
    for ok in (2, 2.0, torch.tensor(2.0), [1.0, 2.0, 3.0], lambda i: 1.0):
        shapes_random.sample(["a red circle"], num_steps=3, guidance_model=guide, guidance_scale=ok)


# ---------------------------------------------------------------------------------- 7. NaN base weights
def test_nan_in_the_shapes_world_weights_names_the_file(tmp_path: Path) -> None:
    for f in WEIGHTS_DIR.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    flux = load_file(str(tmp_path / "flux.safetensors"))
    name = sorted(flux)[3]
    flux[name] = flux[name].clone()
    flux[name].view(-1)[0] = float("nan")
    save_file(flux, str(tmp_path / "flux.safetensors"))
    with pytest.raises(ValueError, match=rf"flux.safetensors hold NaN/inf values: {name} \(1 of .*rebuild it"):
        ShapesWorld.pretrained(tmp_path)


def test_nan_in_flux_components_names_the_component(tmp_path: Path) -> None:
    from diffusers import FluxPipeline

    from fluxguide.backbones.flux import FluxBackbone
    from fluxguide.backbones.tiny_flux import save_tiny_flux_pipeline, tiny_flux_components

    pipe = FluxPipeline(**tiny_flux_components())
    with torch.no_grad():
        next(pipe.transformer.parameters()).view(-1)[0] = float("inf")
    with pytest.raises(ValueError, match=r"weights in pipe.transformer hold NaN/inf"):
        FluxBackbone.from_pipeline(pipe, height=32, width=32, max_sequence_length=16)

    folder = save_tiny_flux_pipeline(tmp_path / "pipe")
    (weights,) = (folder / "vae").glob("*.safetensors")
    tensors = load_file(str(weights))
    key = min(tensors)
    tensors[key] = torch.full_like(tensors[key], float("nan"))
    save_file(tensors, str(weights))
    with pytest.raises(ValueError, match=rf"weights in {folder}/vae hold NaN/inf values: {key}"):
        FluxBackbone.from_pretrained(folder, height=32, width=32, max_sequence_length=16)


def test_check_finite_weights_passes_finite_and_meta_tensors() -> None:
    check_finite_weights({"a": torch.ones(3), "b": torch.empty(3, device="meta"), "i": torch.ones(2, dtype=torch.long)},
                         "here")


# ------------------------------------------------------------------------------ 8. garbage aesthetic file
@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_a_garbage_aesthetic_file_is_named(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"head{suffix}"
    path.write_bytes(b"\x00\xffnot weights at all" * 10)
    with pytest.raises(ValueError, match=r"(?s)head\.(safetensors|pth)' is not a (readable|plain).*safetensors") as info:
        AestheticPredictor.from_file(path, input_dim=8, hidden=(4,), dropouts=())
    assert str(path) in str(info.value) and "weights_only` set to `False" not in str(info.value)
    assert len(str(info.value)) < 600


# ------------------------------------------------------------------------- 9. policy config vs weights
def test_a_policy_whose_config_disagrees_with_its_weights_is_named(tmp_path: Path) -> None:
    path = save_guidance_model(create_mlp_guidance_model(48, 32, 2, vec_dim=64), tmp_path / "policy.safetensors")
    tensors = load_file(str(path))
    config = create_mlp_guidance_model(48, 16, 2, vec_dim=64).config
    save_file(tensors, str(path), metadata={CONFIG_METADATA_KEY: json.dumps(config)})
    with pytest.raises(ValueError, match=r"policy.safetensors'.*stored config \(architecture 'MLPGuidanceModel'\) "
                                         r"and its weights disagree .*: file \(32, .*\) vs config \(16, ") as info:
        load_guidance_model(path)
    assert len(str(info.value)) < 1200
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"garbage" * 20)
    with pytest.raises(ValueError, match=r"garbage.safetensors' is not a readable safetensors file"):
        load_guidance_model(garbage)


# --------------------------------------------------------------------------------------- 10. quiet logs
def test_normal_weight_loads_log_no_random_init_warning(caplog: pytest.LogCaptureFixture) -> None:
    from fluxguide.rewards import make_reward

    caplog.set_level(logging.INFO)
    ShapesWorld.pretrained()
    make_reward("clip", model_name=SHAPES_CLIP_NAME, pretrained=str(WEIGHTS_DIR / "clip.safetensors"))
    assert not [r for r in caplog.records if "initialized randomly" in r.getMessage()]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], [r.getMessage() for r in caplog.records]


def test_the_filter_hides_only_that_warning(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    with quiet_random_init_warning():
        logging.warning("No pretrained weights loaded for model 'x'. Model initialized randomly.")  # noqa: LOG015 - as open_clip logs it
        logging.warning("a real warning")  # noqa: LOG015
    assert [r.getMessage() for r in caplog.records] == ["a real warning"]
    caplog.clear()
    load_open_clip(SHAPES_CLIP_NAME, None)  # a model that really is random still says so
    assert any("initialized randomly" in r.getMessage() for r in caplog.records)
