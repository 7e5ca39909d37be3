"""Every experiment script documents every option in --help, and the evaluation / comparison scripts run
end to end on a tiny budget (the other scripts' smoke tests sit beside their own tests)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import tyro

from fluxguide.algos.registry import algorithm_names, get_algorithm
from fluxguide.checkpointing import latest_checkpoint, read_manifest
from fluxguide.errors import UserError
from fluxguide.harness.monitoring import monitored_names
from fluxguide.harness.tracking import read_metrics
from tests.experiments import leaf_fields
from tests.scripts import ROOT, load_script

SCRIPTS = sorted(p for p in (ROOT / "experiments").glob("*.py") if "class Config" in p.read_text())


def undocumented_fields(path: Path) -> list[str]:
    """Fields of the script's ``Config`` dataclass not followed by a docstring (what tyro shows as help)."""
    tree = ast.parse(path.read_text())
    config = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Config")
    missing = []
    for i, node in enumerate(config.body):
        if isinstance(node, ast.AnnAssign):
            nxt = config.body[i + 1] if i + 1 < len(config.body) else None
            documented = (isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                          and isinstance(nxt.value.value, str) and nxt.value.value.strip())
            group = isinstance(node.value, ast.Call) and getattr(node.value.func, "id", None) == "field"
            if not documented and not group:  # a nested group's fields are documented where it is defined
                missing.append(node.target.id)
    return missing


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.stem)
def test_help_documents_every_option(path: Path, capsys) -> None:
    assert undocumented_fields(path) == []
    script = load_script(path)
    with pytest.raises(SystemExit) as exit_info:
        tyro.cli(script.Config, args=["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for field in leaf_fields(script.Config):
        assert "--" + field.name.replace("_", "-") in text, field.name


def test_scripts_are_covered() -> None:
    names = {p.stem for p in SCRIPTS}
    assert {"train_reward_gradient", "train_ppo", "train_bc", "collect_data", "evaluate", "compare",
            "pretrain_shapes_world", "main", "report"} <= names


def test_compare_smoke_budget_trains_every_algorithm_and_writes_the_results(tmp_path, capsys) -> None:
    compare = load_script(ROOT / "experiments" / "compare.py")
    out = tmp_path / "compare"
    cfg = compare.Config(out_dir=out, budget="smoke", eval_num_prompts=2, eval_samples_per_prompt=1, best_of=(2,),
                         pareto_steps=(2,), wandb_mode="offline")
    rows = compare.main(cfg)
    # the smoke budget trains every registered algorithm (fluxguide.algos.registry), Adjoint Matching included;
    # --pareto-steps adds the references at 2 steps and the plot of pass rate against calls
    assert [r["sampler"] for r in rows] == ["base", "CFG 3", "best-of-2 (shapes-clip)", "base, 2 steps",
                                            "CFG 3, 2 steps", "best-of-2 (shapes-clip), 2 steps", *algorithm_names()]
    assert (out / "pareto.png").is_file()
    assert {"reward-gradient", "ppo", "bc", "grpo", "adjoint-matching"} <= set(algorithm_names())
    # every sampler's pass rate with its 90% interval; every other one's paired gain over the base sampler
    for row in rows:
        assert row["pass_rate"] == row["verifier_pass_rate"] and row["images"] == 2
        assert row["pass_rate_lo"] <= row["pass_rate"] <= row["pass_rate_hi"]
        if row["sampler"] == "base":
            assert "gain_vs_base" not in row
        else:
            assert row["gain_vs_base"] == pytest.approx(row["pass_rate"] - rows[0]["pass_rate"])
            assert row["gain_lo"] <= row["gain_vs_base"] <= row["gain_hi"]
    printed = capsys.readouterr().out
    for algorithm in algorithm_names():
        assert f"  {algorithm}: " in printed and " points over base, 90% interval [" in printed
    assert "note: 2 held-out images per sampler: 90% intervals at this size are wide" in printed
    assert "gain_vs_base" in (out / "evaluation.csv").read_text().splitlines()[0]
    calls = {r["sampler"]: r["model_calls_per_image"] for r in rows}
    assert calls["base"] == 20 and calls["CFG 3"] == 40 and calls["best-of-2 (shapes-clip)"] == 40
    # each policy is sampled at the steps its run trained at (the smoke budget's 3; the few-step chains' 2)
    steps = {r["sampler"]: r["num_steps"] for r in rows}
    assert calls["ppo"] == steps["ppo"] == 3 and calls["reward-gradient-4-step"] == 2
    for name in ("curves.png", "evaluation.md", "evaluation.csv", "samples.png"):
        assert (out / name).is_file(), name
    assert "| reward-gradient |" in (out / "evaluation.md").read_text()
    for algorithm in ("reward-gradient", "ppo", "grpo", "adjoint-matching"):
        run = out / "runs" / algorithm / "seed0"
        assert (run / "guidance.safetensors").is_file()
        assert any("eval/verifier_pass_rate" in r for r in read_metrics(run))
        assert list((run / "wandb").glob("offline-run-*")), algorithm
    # BC's collection and distillation are the chain's first two stages: trained once, inside the chain's run
    assert not (out / "runs" / "bc").exists()
    assert compare.training_run(cfg, "bc", 0) == out / "runs" / "reward-gradient-distilled" / "seed0" / "bc"
    assert (compare.training_run(cfg, "bc", 0) / "guidance.safetensors").is_file()
    assert list((out / "wandb_compare" / "wandb").glob("offline-run-*"))
    # reward-hacking diagnostics: every run of every algorithm scores at least two rewards it is not trained on at
    # each held-out evaluation (the shapes world monitors its four rewards; the trained one is logged too)
    for run in [compare.training_run(cfg, a, 0) for a in algorithm_names()]:
        trained = read_manifest(latest_checkpoint(run))["state"]["config"].get("reward")
        evals = [r for r in read_metrics(run) if "eval/verifier_pass_rate" in r]
        assert evals, run
        for record in evals:
            untrained = set(monitored_names(record)) - {trained}
            assert len(untrained) >= 2, (run, record)
            assert all(f"eval/rewards_stderr/{name}" in record for name in untrained)


def test_evaluate_rejects_a_missing_policy(tmp_path) -> None:
    evaluate = load_script(ROOT / "experiments" / "evaluate.py")
    with pytest.raises(UserError, match="no saved policy"):
        evaluate.main(evaluate.Config(policies=(tmp_path,), out_dir=tmp_path, num_prompts=1, samples_per_prompt=1,
                                      best_of=()))


def test_evaluate_scores_a_saved_policy_on_training_prompts(tmp_path, capsys) -> None:
    """--prompts picks the prompt set (training prompts: choose a scale without looking at the held-out set)."""
    from fluxguide.backbones.registry import build_backbone
    from fluxguide.policies import save_guidance_model
    from fluxguide.policies.registry import build_policy

    evaluate = load_script(ROOT / "experiments" / "evaluate.py")
    save_guidance_model(build_policy("attention", build_backbone("shapes"), hidden_dim=16, num_layers=1, min_t=0.6,
                                     text_conditioning=False), tmp_path / "guidance.safetensors")
    rows = evaluate.main(evaluate.Config(policies=(tmp_path,), names=("blind",), out_dir=tmp_path / "eval",
                                         prompts="shapes-train", num_prompts=2, samples_per_prompt=1, best_of=(),
                                         grid_prompts=2))
    assert [r["sampler"] for r in rows] == ["base", "CFG 3", "blind"]
    # a fresh policy outputs zero corrections: it reproduces the base sampler on the same noise, image for image,
    # so its paired gain is exactly zero with a zero-width interval
    assert rows[2]["verifier_pass_rate"] == rows[0]["verifier_pass_rate"]
    assert (rows[2]["gain_vs_base"], rows[2]["gain_lo"], rows[2]["gain_hi"]) == (0.0, 0.0, 0.0)
    # and each policy row is paired with CFG too: here the base sampler's difference to CFG, on the same noise
    assert rows[2]["gain_vs_cfg"] == pytest.approx(rows[0]["pass_rate"] - rows[1]["pass_rate"])
    assert rows[2]["vs_cfg_lo"] <= rows[2]["gain_vs_cfg"] <= rows[2]["vs_cfg_hi"]
    assert "gain_vs_cfg" not in rows[0] and "gain_vs_cfg" not in rows[1]
    printed = capsys.readouterr()
    assert "blind: +0.0 points over base, 90% interval [+0.0, +0.0]: not distinguishable from base" in printed.out
    assert "blind: " in printed.out and " points over CFG 3, 90% interval [" in printed.out
    assert "base: pass rate" in printed.err + printed.out  # one line per finished sampler, under the progress bar
    assert (tmp_path / "eval" / "evaluation.csv").is_file() and (tmp_path / "eval" / "samples.png").is_file()


def test_main_sample_grid_script_writes_its_grid(tmp_path, capsys) -> None:
    main = load_script(ROOT / "experiments" / "main.py")
    main.main(main.Config(out_dir=tmp_path, num_prompts=2))
    assert (tmp_path / "samples.png").is_file()
    out = capsys.readouterr().out
    assert "base: verifier passes" in out and "guided: verifier passes" in out


@pytest.mark.parametrize("budget", ["smoke", "quick", "full"])
def test_every_compare_budget_parses_under_its_scripts(budget: str) -> None:
    """compare.py's budgets are argument lists of other scripts: each must parse under that script's Config."""
    compare = load_script(ROOT / "experiments" / "compare.py")
    cfg = compare.Config(budget=budget)
    for algorithm in algorithm_names():
        for argv in get_algorithm(algorithm).commands(Path("run"), compare.common_args(cfg, seed=0), budget):
            script, args, default = load_script(Path(argv[0])), argv[1:], None
            if "--preset" in args:  # a preset sets the defaults the other flags override (harness.cli)
                at = args.index("--preset")
                default, args = script.PRESETS[args[at + 1]](), args[:at] + args[at + 2:]
            parsed = tyro.cli(script.Config, args=args, default=default)
            assert getattr(parsed, "run", parsed).seed == 0, argv


def test_evaluate_sweeps_step_counts_on_the_same_noise_and_plots_calls(tmp_path, capsys) -> None:
    """--pareto-steps adds the base sampler, CFG and best-of-N (within CFG's calls) at other step counts; each row
    records its steps and calls; --policy-steps samples a policy at its own; pareto.png is drawn."""
    from fluxguide.backbones.registry import build_backbone
    from fluxguide.policies import save_guidance_model
    from fluxguide.policies.registry import build_policy

    evaluate = load_script(ROOT / "experiments" / "evaluate.py")
    save_guidance_model(build_policy("affine", build_backbone("shapes"), hidden_dim=8), tmp_path / "guidance.safetensors")
    rows = evaluate.main(evaluate.Config(policies=(tmp_path,), names=("two-step",), policy_steps=(2,), num_steps=4,
                                         pareto_steps=(1, 2, 4), best_of=(2, 8), out_dir=tmp_path / "eval",
                                         num_prompts=2, samples_per_prompt=1, grid_prompts=1))
    calls = {r["sampler"]: (r["num_steps"], r["model_calls_per_image"]) for r in rows}
    assert calls == {"base": (4, 4), "CFG 3": (4, 8), "best-of-2 (shapes-clip)": (4, 8),
                     "best-of-8 (shapes-clip)": (4, 32),
                     "base, 1 step": (1, 1), "CFG 3, 1 step": (1, 2), "best-of-2 (shapes-clip), 1 step": (1, 2),
                     "best-of-8 (shapes-clip), 1 step": (1, 8),
                     "base, 2 steps": (2, 2), "CFG 3, 2 steps": (2, 4), "best-of-2 (shapes-clip), 2 steps": (2, 4),
                     "two-step": (2, 2)}  # best-of-8 at 2 steps (16 calls) costs more than CFG at 4 steps (8)
    # a fresh affine policy adds nothing: at 2 steps it is the 2-step base sampler, image for image
    by_name = {r["sampler"]: r for r in rows}
    assert by_name["two-step"]["pass_rate"] == by_name["base, 2 steps"]["pass_rate"]
    assert (tmp_path / "eval" / "pareto.png").is_file()
    assert "pareto.png" in capsys.readouterr().out
    with pytest.raises(UserError, match="--policy-steps has 2 step counts for 1 policies"):
        evaluate.main(evaluate.Config(policies=(tmp_path,), policy_steps=(2, 4), out_dir=tmp_path / "eval"))
