"""Export a finished training run's policy as a Hugging Face Hub-style folder (weights, config, model card).

    python experiments/export_policy.py --run-dir runs/reward_gradient/shapes --out policies/rg-shapes
    python experiments/export_policy.py --run-dir runs/ppo/shapes --out policies/ppo --push-to-hub you/ppo-shapes

The folder (``fluxguide.policies.hub``) holds ``model.safetensors`` (the run's ``guidance.safetensors``, fluxguide's
format), ``config.json`` and a ``README.md`` model card: base model, reward, algorithm, the training command and
the run's last held-out evaluation, read from the run's latest checkpoint. ``load_policy_folder(out)`` loads it;
after a push, ``load_policy_folder("you/ppo-shapes")`` does on any machine. Nothing is uploaded without
``--push-to-hub`` (which needs a Hub login: ``hf auth login``).

The training command is rebuilt from the flat config the checkpoint recorded: the training script in
``experiments/`` whose flags parse back to exactly that config (its ``--preset`` and the flags whose values differ
from the preset's), which the card says was checked; when no script reproduces it (a renamed flag, a run of an
older version), every recorded option as a flag, which the card says was not.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import tyro

from fluxguide.checkpointing import latest_checkpoint, read_manifest
from fluxguide.harness.cli import cli
from fluxguide.harness.config import ConfigError, flat_config, validate
from fluxguide.policies import BaseGuidanceModel, PolicyCard, load_guidance_model, save_policy_folder
from fluxguide.policies.hub import RunFolderError, algorithm_name, config_flags

SCRIPTS = Path(__file__).resolve().parent
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class Config:
    run_dir: Path = Path("runs/reward_gradient/shapes")
    """the finished training run folder to export (its guidance.safetensors and latest checkpoint)"""
    out: Path = Path("policies/rg-shapes")
    """the policy folder to write (a policy folder already there is replaced; any other folder is refused)"""
    push_to_hub: str | None = None
    """a Hub model id ('owner/name') to upload the folder to once written; nothing is uploaded without it"""
    private: bool = False
    """with --push-to-hub: create the Hub repository as private"""

    def validate(self) -> None:
        if not self.run_dir.is_dir():
            raise ConfigError(f"--run-dir {self.run_dir} is not a folder: pass a training run's --run-dir")
        if self.push_to_hub is not None and not HUB_ID.match(self.push_to_hub):
            raise ConfigError(f"--push-to-hub {self.push_to_hub!r} is not a Hub model id: use 'owner/name'")


def _normal(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` as JSON sees it (tuples as lists), so a parsed config compares equal to a recorded one."""
    return json.loads(json.dumps(config))


def load_training_script(path: Path) -> ModuleType:
    """A training script as a module (registered under a private name, so its dataclasses resolve)."""
    spec = importlib.util.spec_from_file_location(f"_export_policy_{path.stem}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def candidate_scripts(config: dict[str, Any]) -> list[Path]:
    """``experiments/train_*.py``, those whose name begins the run's algorithm name first (``reward-gradient``,
    ``reward-gradient-distilled`` -> ``train_reward_gradient.py``), the longest match first."""
    algorithm = algorithm_name(config)
    scripts = sorted(SCRIPTS.glob("train_*.py"))
    def rank(p: Path) -> tuple[int, str]:
        name = p.stem.removeprefix("train_").replace("_", "-")
        return (-len(name) if algorithm == name or algorithm.startswith(name + "-") else 0, p.name)
    return sorted(scripts, key=rank)


def script_flags(module: ModuleType, config: dict[str, Any]) -> list[str] | None:
    """The flags with which ``module`` (a training script) parses to exactly ``config``: ``--preset`` unless it is
    the default one, then each value that differs from the preset's (a script without presets: from its
    ``Config``'s defaults); ``None`` when no such flags exist."""
    presets = getattr(module, "PRESETS", None)
    preset = config.get("preset") if presets else None
    if presets and preset not in presets:
        return None
    factory = presets[preset] if presets else module.Config
    defaults = _normal(flat_config(factory()))
    recorded = _normal(config)
    if set(defaults) != set(recorded):
        return None
    flags = ["--preset", preset] if presets and preset != next(iter(presets)) else []
    flags += config_flags({k: v for k, v in config.items() if k != "preset" and recorded[k] != defaults[k]})
    try:
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            parsed = tyro.cli(module.Config, args=flags, default=factory())
    except SystemExit:  # tyro refused a flag: not this script's (or a value that does not print back)
        return None
    return flags if _normal(flat_config(parsed)) == recorded else None


def training_command(run_dir: Path) -> tuple[str, str] | None:
    """The command that trained the run, rebuilt from its recorded config and checked, with how it was obtained;
    ``None`` when no training script parses back to that config."""
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        return None  # PolicyCard.from_run says what is missing
    config = read_manifest(ckpt).get("state", {}).get("config", {})
    for path in candidate_scripts(config):
        flags = script_flags(load_training_script(path), config)
        if flags is not None:
            command = " ".join(["python", f"experiments/{path.name}", *map(shlex.quote, flags)])
            return command, ("rebuilt from the config recorded in the run's latest checkpoint (the preset and the "
                             "flags whose values differ from it) and checked: it parses back to that config")
    return None


def load_run_policy(run_dir: Path) -> BaseGuidanceModel:
    """The final policy of a finished training run folder (its ``guidance.safetensors``, written by ``Run.finish``)."""
    path = run_dir / "guidance.safetensors"
    if not path.is_file():
        raise RunFolderError(f"{run_dir} holds no guidance.safetensors: the run has not finished (rerun its training "
                             "command to complete it) or this is not a training run folder")
    return load_guidance_model(path)


def main(cfg: Config) -> Path:
    validate(cfg)
    policy = load_run_policy(cfg.run_dir)
    command, source = training_command(cfg.run_dir) or (None, None)
    card = PolicyCard.from_run(cfg.run_dir, command=command, command_source=source)
    out = save_policy_folder(policy, cfg.out, card=card, repo_id=cfg.push_to_hub,
                             push_to_hub=cfg.push_to_hub is not None, private=cfg.private)
    print(f"wrote the policy folder {out} (model.safetensors, config.json, README.md)")
    if cfg.push_to_hub is not None:
        print(f"uploaded it to https://huggingface.co/{cfg.push_to_hub}")
    print(f"load it with fluxguide.policies.hub.load_policy_folder({str(cfg.push_to_hub or out)!r})")
    return out


if __name__ == "__main__":
    cli(main, Config)
