"""Every script's named presets (``--preset``): each parses, sets what it names, lets flags override it, and runs
at its smoke size; an unknown name exits with 2 and lists the presets.

The shapes presets run on the shapes world as they are, with tiny budgets; the flux-dev presets run on a tiny
random FluxPipeline folder (``--model-path``) with a tiny local open_clip file for their CLIP reward, on the CPU:
the real FLUX.1-dev weights and a GPU are the only things swapped out.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import tyro

from fluxguide.algos.registry import EXPERIMENTS, algorithm_names, get_algorithm
from fluxguide.harness.cli import cli
from fluxguide.harness.config import ConfigError, flat_config, validate
from fluxguide.harness.presets import DISTILLED_POLICY, FLUX_DEV_MODEL, preset_name
from tests.scripts import ROOT, load_script

#: Every script an algorithm of the registry runs (its training stage; collect_data is BC's first stage).
SCRIPTS = tuple(dict.fromkeys(stage.path.stem for name in algorithm_names() for stage in get_algorithm(name).stages
                              if stage.path.parent == EXPERIMENTS))
TRAINING = tuple(name for name in SCRIPTS if name != "collect_data")
TINY = ["--num-steps", "3", "--hidden-dim", "16", "--num-heads", "2", "--num-layers", "1", "--total-updates", "1",
        "--eval-every", "1", "--checkpoint-every", "1", "--eval-num-prompts", "2", "--eval-samples-per-prompt", "1",
        "--grid-prompts", "1", "--wandb-mode", "disabled"]


def smoke_budget(script: str) -> list[str]:
    """The registry's smoke arguments of the algorithm stage that runs ``script`` (batch and group sizes that fit)."""
    return next(list(stage.budgets["smoke"]) for name in algorithm_names() for stage in get_algorithm(name).stages
                if stage.path.stem == script and not stage.args)


COLLECT = ["--episodes", "2", "--batch-size", "2", "--num-steps", "3", "--wandb-mode", "disabled"]


def parse(script, args: list[str]):
    name = preset_name(args, script.PRESETS)
    return tyro.cli(type(script.PRESETS[name]()), default=script.PRESETS[name](), args=args)


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_preset_parses_and_names_itself(name: str) -> None:
    script = load_script(name)
    assert list(script.PRESETS)[:2] == ["shapes", "flux-dev"], "the shapes preset is the default"
    for preset in script.PRESETS:
        cfg = flat_config(parse(script, ["--preset", preset]))
        assert cfg["preset"] == preset
        expected = FLUX_DEV_MODEL["backbone"] if preset.startswith("flux") else "shapes"
        assert cfg["backbone"] == expected
    # No --preset is the first preset, and a flag overrides the preset's value.
    assert flat_config(parse(script, []))["preset"] == "shapes"
    assert flat_config(parse(script, ["--preset", "flux-dev", "--height", "64"]))["height"] == 64


def test_script_defaults_are_the_shapes_recipes() -> None:
    """What docs/results.md's headline rows name: the defaults are the recipe, not a flag combination."""
    rg = flat_config(load_script("train_reward_gradient").Config())
    assert (rg["policy"], rg["reward"], rg["policy_min_t"], rg["reward_target"], rg["reward_shift"]) == (
        "affine", "shapes-clip-retrieval", 0.64, -0.1, 2)
    ppo = flat_config(load_script("train_ppo").Config())
    assert (ppo["policy"], ppo["reward"], ppo["mode"], ppo["shared_group_noise"], ppo["batch_size"]) == (
        "affine", "verifier-partial", "ode", True, 64)
    bc = flat_config(load_script("train_bc").Config())
    assert bc["policy"] == "attention" and bc["text_conditioning"]


def test_unknown_preset_exits_2_listing_the_presets() -> None:
    done = subprocess.run([sys.executable, str(ROOT / "experiments" / "train_ppo.py"), "--preset", "flux-schnell"],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 2
    assert "'flux-schnell'" in done.stderr and "shapes, flux-dev" in done.stderr
    assert "Traceback" not in done.stderr
    with pytest.raises(ConfigError, match="needs a name"):
        preset_name(["--preset"], {"shapes": dict})


def test_help_lists_the_presets(capsys) -> None:
    script = load_script("train_reward_gradient")
    with pytest.raises(SystemExit):
        cli(script.main, script.Config, ["--help"], presets=script.PRESETS)
    out = capsys.readouterr().out
    assert "shapes:" in out and "flux-dev:" in out and "backbone flux" in out


@pytest.mark.parametrize("name", TRAINING)
def test_shapes_preset_runs_at_smoke_size(name: str, tmp_path) -> None:
    script = load_script(name)
    args = ["--preset", "shapes", "--run-dir", str(tmp_path / "run"), *smoke_budget(name), *TINY]  # TINY wins
    if name == "train_bc":
        collect = load_script("collect_data")
        collect.main(parse(collect, ["--out-dir", str(tmp_path / "data"), *COLLECT]))
        args += ["--dataset", str(tmp_path / "data")]
    result = script.main(parse(script, args))
    assert (tmp_path / "run" / "guidance.safetensors").is_file()
    assert any(k.startswith("eval/") for k in result)


def test_shapes_distilled_preset_starts_from_the_bc_policy(tmp_path) -> None:
    """RL from a distilled start: the preset loads train_bc.py's default output under an affine head; without
    that file it stops with a message naming it and the script that writes it."""
    from fluxguide.backbones.registry import build_backbone
    from fluxguide.policies import MultiObjectiveGuidance, load_guidance_model, save_guidance_model
    from fluxguide.policies.registry import build_policy

    script = load_script("train_reward_gradient")
    cfg = flat_config(parse(script, ["--preset", "shapes-distilled"]))
    assert (cfg["init_policy"], cfg["head"], cfg["body_lr_scale"]) == (str(DISTILLED_POLICY), "affine", 0.1)
    assert cfg["total_updates"] == script.DISTILLED_UPDATES and cfg["policy"] == "affine"
    with pytest.raises(ConfigError, match="train_bc.py"):
        validate(parse(script, ["--preset", "shapes-distilled", "--init-policy", str(tmp_path / "none.safetensors")]))
    start = build_policy("attention", build_backbone("shapes-random", seed=0), hidden_dim=16, num_layers=1,
                         num_heads=2)
    path = save_guidance_model(start, tmp_path / "bc.safetensors")
    script.main(parse(script, ["--preset", "shapes-distilled", "--init-policy", str(path),
                               "--run-dir", str(tmp_path / "run"), *smoke_budget("train_reward_gradient"), *TINY]))
    trained = load_guidance_model(tmp_path / "run" / "guidance.safetensors")
    assert isinstance(trained, MultiObjectiveGuidance) and type(trained.models[0]) is type(start)


@pytest.mark.parametrize("name", TRAINING)
def test_flux_dev_preset_runs_at_smoke_size(name: str, flux_files, tmp_path) -> None:
    """The flux-dev recipe on a tiny random FluxPipeline folder and a tiny CLIP file, on the CPU."""
    script = load_script(name)
    tiny_flux = ["--model-path", flux_files["pipeline"], "--height", "64", "--width", "64",
                 "--max-sequence-length", "16", "--device", "cpu"]
    args = ["--preset", "flux-dev", "--run-dir", str(tmp_path / "run"), *tiny_flux, *smoke_budget(name), *TINY]
    if name != "train_bc":
        args += ["--reward-kwargs", flux_files["reward_kwargs"]]
    else:
        collect = load_script("collect_data")
        data = parse(collect, ["--preset", "flux-dev", "--out-dir", str(tmp_path / "data"), *tiny_flux, *COLLECT])
        assert data.train_prompts == "animals-train"
        collect.main(data)
        args += ["--dataset", str(tmp_path / "data")]
    cfg = parse(script, args)
    assert flat_config(cfg)["preset"] == "flux-dev" and flat_config(cfg)["backbone"] == "flux"
    script.main(cfg)
    assert (tmp_path / "run" / "guidance.safetensors").is_file()
    assert json.loads((tmp_path / "run" / "tracking.json").read_text()) is not None


@pytest.mark.parametrize("name", ["train_reward_gradient", "train_ppo"])
def test_evaluation_options_do_not_change_training(name: str, tmp_path) -> None:
    """compare.py's budgets pass evaluation sizes and cadence to the scripts: the trained weights must be those
    of the script run with its defaults (evaluation draws its own noise, never the training streams)."""
    from safetensors.torch import load_file

    script = load_script(name)
    small = [*smoke_budget(name), "--num-steps", "3", "--total-updates", "2", "--checkpoint-every", "2",
             "--grid-prompts", "1", "--wandb-mode", "disabled"]
    script.main(parse(script, [*small, "--run-dir", str(tmp_path / "a"), "--eval-every", "1",
                               "--eval-num-prompts", "3", "--eval-samples-per-prompt", "2"]))
    script.main(parse(script, [*small, "--run-dir", str(tmp_path / "b"), "--eval-every", "2",
                               "--eval-num-prompts", "1", "--eval-samples-per-prompt", "1"]))
    a, b = (load_file(str(tmp_path / run / "guidance.safetensors")) for run in ("a", "b"))
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    assert any(a[k].abs().sum() > 0 for k in a), "the policy trained (it starts at zero)"


@pytest.mark.parametrize("steps", [4, 2])
def test_few_step_presets_fine_tune_the_coarse_distillation_at_their_steps(steps: int) -> None:
    """shapes-K-step: the network distilled for K steps (few_step_policy) under an affine head on every step,
    trained through the K-step sampler on the shapes preset's reward; the registered chain passes its own BC."""
    from fluxguide.harness.presets import few_step_policy

    script = load_script("train_reward_gradient")
    cfg = flat_config(parse(script, ["--preset", f"shapes-{steps}-step"]))
    assert (cfg["num_steps"], cfg["policy_min_t"], cfg["init_policy"], cfg["head"]) == (
        steps, 0.0, str(few_step_policy(steps)), "affine")
    assert (cfg["reward"], cfg["reward_target"], cfg["lr"], cfg["total_updates"], cfg["policy_average"]) == {
        4: ("shapes-clip-retrieval", -0.1, 2e-2, 150, 0.98), 2: ("shapes-clip-retrieval", None, 1e-2, 300, 0.98)}[steps]
    with pytest.raises(ConfigError, match="train_bc.py"):
        validate(parse(script, ["--preset", f"shapes-{steps}-step"]))  # no distilled policy there yet
    (stage,) = [s for s in get_algorithm(f"reward-gradient-{steps}-step").stages if s.folder == "rl"]
    assert stage.args[:2] == ("--preset", f"shapes-{steps}-step") and stage.inputs == {
        "--init-policy": "bc/guidance.safetensors"}


def test_the_learned_reward_preset_trains_the_distilled_start_on_the_verifier_as_a_black_box() -> None:
    """shapes-learned-reward: the shapes-distilled recipe on the partial-credit verifier through a surrogate on the
    tiny CLIP's embeddings, 640 updates (10,240 images); the registered chain passes its own distillation."""
    from fluxguide.harness.presets import DISTILLED_POLICY

    script = load_script("train_reward_gradient")
    cfg = flat_config(parse(script, ["--preset", "shapes-learned-reward"]))
    assert (cfg["reward"], cfg["surrogate"], cfg["init_policy"], cfg["head"], cfg["lr"], cfg["total_updates"],
            cfg["policy_average"], cfg["surrogate_warmup"], cfg["surrogate_ramp"], cfg["reward_target"]) == (
        "verifier-partial", "shapes-clip", str(DISTILLED_POLICY), "affine", 2e-2, 640, 0.98, 256, 512, None)
    (stage,) = [s for s in get_algorithm("learned-reward-gradient").stages if s.folder == "rl"]
    assert stage.args[:2] == ("--preset", "shapes-learned-reward") and stage.inputs == {
        "--init-policy": "bc/guidance.safetensors"}
