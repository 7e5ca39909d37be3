"""Trained guidance networks as Hugging Face Hub-style folders: share a policy, load one by path or hub id.

A policy folder is what ``huggingface_hub``'s model mixin (:class:`huggingface_hub.ModelHubMixin`) saves and loads,
so it can be pushed to the Hub as a model repository and downloaded from one. It holds ``model.safetensors`` (the
weights in fluxguide's format, so ``load_guidance_model`` and ``guide_pipeline`` open it alone), ``config.json`` (the
network's config) and ``README.md``, the model card: base model, reward, algorithm, training command and held-out
results as YAML metadata and as text, with how to load the policy::

    save_policy_folder(policy, "policies/rg-shapes", card=PolicyCard.from_run("runs/reward_gradient/shapes"))
    policy = load_policy_folder("policies/rg-shapes")              # or a hub id: "user/rg-shapes"
    push_policy_folder("policies/rg-shapes", "user/rg-shapes")     # the only call that sends anything

A save writes the whole folder under a temporary name and renames it into place: an interrupted save leaves the
previous folder or the new one, never a mix. Loading a hub id downloads through ``huggingface_hub`` (its cache,
``HF_HUB_OFFLINE``, tokens and revisions apply).
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
import shlex
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import HfApi, ModelCard, ModelCardData, ModelHubMixin, hf_hub_download
from huggingface_hub import utils as hub_errors  # their error classes, in every huggingface_hub version

from fluxguide.checkpointing import latest_checkpoint, read_manifest
from fluxguide.errors import UserError
from fluxguide.policies.base import BaseGuidanceModel
from fluxguide.policies.checkpoint import GuidanceFileError, load_guidance_model, save_guidance_model
from fluxguide.serialization import refuse_links, write_json_atomic

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"  # huggingface_hub.constants.CONFIG_NAME
CARD_FILE = "README.md"
#: The files of a policy folder; a folder holding other files is not replaced by a save (it is someone's data).
FOLDER_FILES = (WEIGHTS_FILE, CONFIG_FILE, CARD_FILE)
#: Digits of the held-out numbers in the card's table (and nowhere rounded further).
RESULT_DIGITS = 4
#: A Hub model id (``owner/name``), the only kind of base model the card's ``base_model`` metadata may name.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class PolicyFolderError(GuidanceFileError):
    """A policy folder (or hub repository) that cannot be loaded or written: missing, foreign or corrupt files; the
    message names the file and the fix."""


class RunFolderError(UserError, ValueError):
    """A run folder a model card cannot be written from (no checkpoint recorded what trained the policy)."""


@dataclass
class PolicyCard:
    """What a policy's model card says: how it was trained and how it did on held-out prompts.

    Build it from a run folder with :meth:`from_run`, or by hand for a policy trained elsewhere (every field but
    ``algorithm`` may be left empty; the card then says it is not recorded).
    """

    algorithm: str
    """the training algorithm (a training run's ``--wandb-group``, e.g. ``reward-gradient``)"""
    backbone: str | None = None
    """the base model the policy was trained against (``--backbone``, e.g. ``flux``, ``shapes``)"""
    model_path: str | None = None
    """the base model's weights (``--model-path``: a hub id such as ``black-forest-labs/FLUX.1-dev``, or a folder)"""
    backbone_fingerprint: str | None = None
    """fluxguide's fingerprint of the base model's weights (a policy corrects that model's predictions only)"""
    reward: str | None = None
    """the training reward (``--reward``, with ``--reward-kwargs`` when given)"""
    command: str | None = None
    """the command that trained the policy"""
    command_source: str = "not recorded"
    """how :attr:`command` was obtained (recorded as typed, or reconstructed from the recorded config)"""
    results: dict[str, float] = field(default_factory=dict)
    """the last held-out evaluation (``eval/verifier_pass_rate``, ``eval/reward_mean``, ...)"""
    evaluated_at: str | None = None
    """when :attr:`results` were measured (e.g. ``update 64 of 64, 1024 samples``)"""
    heldout_prompts: str | None = None
    """the held-out prompt set of :attr:`results` (``--eval-prompts``)"""
    guidance_scale: float = 1.0
    """the correction's scale the policy was trained with (``pred + scale * policy(...)``)"""
    seed: int | None = None
    """the training run's seed"""

    @classmethod
    def from_run(cls, run_dir: str | Path, *, command: str | None = None, command_source: str | None = None) -> PolicyCard:
        """The card of the policy a training run folder holds, from its latest checkpoint's state: the flat config
        (backbone, reward, algorithm, seed, ...), the last held-out evaluation and the base model's fingerprint.

        Args:
            run_dir: a training run folder (``--run-dir`` of ``experiments/train_*.py``).
            command: the command that trained it, when known (``Run.finish`` knows ``sys.argv``); by default
                :func:`reconstruct_command` (every recorded option as a flag, the script named after the algorithm:
                an inference the card says it is). ``command_source`` says how it was obtained (default "given").

        Raises:
            RunFolderError: the folder has no checkpoint (nothing recorded how the policy was trained).
        """
        run_dir = Path(run_dir)
        ckpt = latest_checkpoint(run_dir)
        if ckpt is None:
            raise RunFolderError(
                f"{run_dir} holds no checkpoint (checkpoints/step_*), so nothing records how its policy was trained: "
                "pass the folder of a training run (its --run-dir), or build PolicyCard(...) by hand"
            )
        manifest = read_manifest(ckpt)  # checked against its own SHA-256: an edited result is refused
        state = manifest.get("state", {})
        config: dict[str, Any] = state.get("config", {})
        if command is None:
            command, command_source = reconstruct_command(config), (
                "reconstructed from the flat config recorded in the run's latest checkpoint (every recorded option "
                "given as a flag; the script's name is inferred from the algorithm, not recorded)")
        seen = [f"{state[k]} {k.removesuffix('_seen').replace('_', ' ')}" for k in state if k.endswith("_seen")]
        evaluated_at = ", ".join([f"update {manifest['step']} of {config.get('total_updates', '?')}", *seen])
        return cls(
            algorithm=state.get("algorithm") or algorithm_name(config),
            backbone=config.get("backbone"),
            model_path=config.get("model_path"),
            backbone_fingerprint=state.get("backbone_fingerprint"),
            reward=" ".join(str(x) for x in (config.get("reward"), config.get("reward_kwargs")) if x) or None,
            command=command,
            command_source=command_source or "given",
            results={k: float(v) for k, v in state.get("last_eval", {}).items()},
            evaluated_at=evaluated_at,
            heldout_prompts=config.get("eval_prompts"),
            guidance_scale=float(config.get("guidance_scale", 1.0)),
            seed=config.get("seed"),
        )

    # ------------------------------------------------------------------------------------------- the card
    def base_model_id(self) -> str | None:
        """The base model as a Hub model id (``model_path`` when it is one and not a local folder), else ``None``:
        the Hub's ``base_model`` metadata must name a model repository."""
        path = self.model_path
        return path if path and _HUB_ID.match(path) and not Path(path).exists() else None

    def card_data(self, network: BaseGuidanceModel) -> ModelCardData:
        """The card's YAML metadata: the Hub's fields (``library_name``, ``tags``, ``base_model``) and a
        ``fluxguide`` section with every field of this card and the network's architecture."""
        fields = {**asdict(self), "results": {k: None if math.isnan(v) else v for k, v in self.results.items()}}
        fluxguide = {"architecture": network.config.get("type", type(network).__name__),
                     **{k: v for k, v in fields.items() if v is not None}}
        tags = list(dict.fromkeys(t for t in ("fluxguide", "guidance-policy", "rectified-flow", self.algorithm,
                                              self.backbone) if t))
        return ModelCardData(library_name="fluxguide", tags=tags, base_model=self.base_model_id(), fluxguide=fluxguide)

    def render(self, network: BaseGuidanceModel, where: str) -> ModelCard:
        """The model card of ``network`` (metadata and text); ``where`` is what :func:`load_policy_folder` is given
        in the card's example (the hub id, or the folder)."""
        results = "No held-out evaluation was recorded."
        if self.results:
            results = "\n".join([
                "The training run's last evaluation" + (f" on the held-out prompts `{self.heldout_prompts}`"
                                                         if self.heldout_prompts else "")
                + (f", {self.evaluated_at}" if self.evaluated_at else "") + " (fixed noise; the verifier's pass rate "
                "is the exact check of each image against its prompt, where the world has one):", "",
                "| metric | value |", "|---|---|", *(f"| {k} | {format_result(v)} |" for k, v in self.results.items())])
        command = f"```bash\n{self.command}\n```\n\nCommand: {self.command_source}." if self.command else "Not recorded."
        name = network.config.get("type", type(network).__name__)
        text = CARD_TEXT.format(
            name=name, params=sum(p.numel() for p in network.parameters()), algorithm=self.algorithm,
            on=f" on {self.backbone}" if self.backbone else "", base=self.model_path or self.backbone or "not recorded",
            fingerprint=self.backbone_fingerprint or "not recorded", reward=self.reward or "not recorded",
            scale=self.guidance_scale, seed="not recorded" if self.seed is None else self.seed, command=command,
            results=results, where=where, weights=WEIGHTS_FILE, base_id=self.base_model_id() or "<the base model>")
        return ModelCard(f"---\n{self.card_data(network).to_yaml()}\n---\n\n{text}")


#: The model card's text (:meth:`PolicyCard.render` fills it in).
CARD_TEXT = """# {name} guidance policy: {algorithm}{on}

A guidance network trained with fluxguide ({name}, {params:,} parameters). At every sampling step it reads the
sampler's state and adds a correction to the base model's velocity prediction,
`pred + guidance_scale * policy(img, pred, txt, vec, t, step)`. It corrects the predictions of the base model it
was trained against, and no other.

| | |
|---|---|
| base model | `{base}` |
| base-model fingerprint | `{fingerprint}` |
| reward | `{reward}` |
| algorithm | `{algorithm}` |
| guidance scale | {scale:g} |
| seed | {seed} |

## Training command

{command}

## Held-out results

{results}

## Use it

```python
from fluxguide.policies import load_policy_folder

policy = load_policy_folder({where!r})  # a local folder or a hub id (revision=..., device=...)
```

`{weights}` is a fluxguide guidance file: `fluxguide.policies.load_guidance_model` reads it on its own. With
diffusers, on a `FluxPipeline` of the base model the policy was trained against (a policy built for other latent or
text sizes is refused):

```python
from diffusers import FluxPipeline
from fluxguide.policies.flux_pipeline import guide_pipeline

pipe = FluxPipeline.from_pretrained({base_id!r})
guide_pipeline(pipe, policy, guidance_scale={scale:g})
image = pipe("a photo of a red fox in the snow").images[0]
```
"""


def format_result(value: float) -> str:
    """A held-out number as the card prints it (:data:`RESULT_DIGITS` decimals)."""
    return "n/a" if math.isnan(value) else f"{value:.{RESULT_DIGITS}f}"


def algorithm_name(config: dict[str, Any]) -> str:
    """The algorithm a run's flat config names: its W&B group (each training script sets its own; the harness's
    default group ``fluxguide`` names none)."""
    group = config.get("wandb_group")
    return group if group and group != "fluxguide" else "unknown"


def config_flags(config: dict[str, Any]) -> list[str]:
    """Command-line flags that set every value of a flat config (``{"batch_size": 2}`` -> ``--batch-size 2``; a
    bool ``--x`` / ``--no-x``; a list its items; ``None`` as ``None``), as tyro parses the scripts' flags."""
    flags: list[str] = []
    for key, value in config.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + key.replace("_", "-"))
        elif isinstance(value, (list, tuple)):
            flags += [flag, *map(str, value)]
        else:
            flags += [flag, str(value)]
    return flags


def reconstruct_command(config: dict[str, Any], script: str | None = None) -> str:
    """``python <script> <flags>`` setting every value of the run's recorded flat config; ``script`` defaults to
    ``experiments/train_<algorithm>.py`` (the algorithm's name with ``_`` for ``-``: an inference)."""
    if script is None:
        script = f"experiments/train_{algorithm_name(config).replace('-', '_')}.py"
    return " ".join(["python", script, *map(shlex.quote, config_flags(config))])


# ------------------------------------------------------------------------------------------- the mixin
class GuidancePolicy(ModelHubMixin, library_name="fluxguide", tags=["fluxguide", "guidance-policy"]):
    """A guidance network and its card in ``huggingface_hub``'s model mixin (``save_pretrained``, ``from_pretrained``,
    ``push_to_hub``): the Hub integration that :func:`save_policy_folder` (atomic) and :func:`load_policy_folder`
    (clear errors) go through."""

    def __init__(self, network: BaseGuidanceModel, card: PolicyCard | None = None, where: str | None = None) -> None:
        if not isinstance(network, BaseGuidanceModel):
            raise TypeError(f"a policy folder holds a BaseGuidanceModel (with a config), got {type(network).__name__}")
        self.network = network
        self.card = card
        self.where = where

    def _save_pretrained(self, save_directory: Path) -> None:
        save_guidance_model(self.network, save_directory / WEIGHTS_FILE)
        write_json_atomic(self.network.config, save_directory / CONFIG_FILE)

    def generate_model_card(self, *args: Any, **kwargs: Any) -> ModelCard:
        card = self.card or PolicyCard(algorithm="unknown")
        return card.render(self.network, kwargs.get("where") or self.where or "path/to/this/folder")

    @classmethod
    def _from_pretrained(cls, *, model_id: str, revision: str | None, cache_dir: str | Path | None,
                         force_download: bool, local_files_only: bool, token: str | bool | None,
                         config: dict | None = None, device: torch.device | str = "cpu",
                         dtype: torch.dtype | None = None, **unused: Any) -> GuidancePolicy:
        folder = Path(model_id)
        if folder.is_dir():
            weights = folder / WEIGHTS_FILE
            missing = [name for name in (CONFIG_FILE, WEIGHTS_FILE) if not (folder / name).is_file()]
            if missing:
                raise PolicyFolderError(
                    f"{folder} is not a policy folder: {missing[0]} is missing (a policy folder holds "
                    f"{', '.join(FOLDER_FILES)}); write it with save_policy_folder or experiments/export_policy.py")
        else:
            if config is None:
                raise PolicyFolderError(
                    f"hub repository {model_id!r} (revision {revision or 'main'}) gave no {CONFIG_FILE}: it does not "
                    "exist, is private (hf auth login), or is not a fluxguide policy (push one with push_policy_folder)"
                )
            try:
                weights = Path(hf_hub_download(repo_id=model_id, filename=WEIGHTS_FILE, revision=revision,
                                               cache_dir=cache_dir, force_download=force_download, token=token,
                                               local_files_only=local_files_only))
            except hub_errors.LocalEntryNotFoundError:
                raise  # offline and not cached: load_policy_folder says so
            except hub_errors.EntryNotFoundError as e:
                raise PolicyFolderError(
                    f"hub repository {model_id!r} (revision {revision or 'main'}) holds no {WEIGHTS_FILE}: it is not a "
                    "fluxguide policy (push one with push_policy_folder)"
                ) from e
        return cls(_load_checked(weights, config, model_id, device, dtype), where=model_id)


def _load_checked(weights: Path, config: dict | None, where: str, device: torch.device | str,
                  dtype: torch.dtype | None) -> BaseGuidanceModel:
    """The network in ``weights``, refusing a config.json that is not a guidance config or disagrees with the
    config the weights file carries."""
    fix = ("write the folder again with save_policy_folder or experiments/export_policy.py (or, for a hub id, "
           "download it again with force_download=True)")
    if not isinstance(config, dict) or not isinstance(config.get("type"), str):
        raise PolicyFolderError(
            f"{CONFIG_FILE} of {where} is not a fluxguide guidance config (it names no architecture under 'type'): "
            f"the folder was not written by save_policy_folder; {fix}"
        )
    try:
        network = load_guidance_model(weights, device=device, dtype=dtype)  # built from the file's own config
    except GuidanceFileError as e:
        raise PolicyFolderError(f"{WEIGHTS_FILE} of {where} cannot be loaded: {e}. {fix}") from e
    if network.config != config:
        raise PolicyFolderError(
            f"{CONFIG_FILE} of {where} (architecture {config['type']!r}) disagrees with the config inside its "
            f"{WEIGHTS_FILE} (architecture {network.config['type']!r}): one of them was edited or replaced; {fix}"
        )
    return network


# ------------------------------------------------------------------------------------------- the API
def save_policy_folder(policy: BaseGuidanceModel, folder: str | Path, *, card: PolicyCard | None = None,
                       repo_id: str | None = None, push_to_hub: bool = False, private: bool | None = None,
                       token: str | None = None) -> Path:
    """Write ``policy`` as a policy folder (weights, config, model card) at ``folder``; return ``folder``.

    The folder is written whole under a temporary name and renamed into place; an existing policy folder there is
    replaced, anything else refused. Nothing leaves the machine unless ``push_to_hub`` (then the folder as written
    is uploaded to ``repo_id``, :func:`push_policy_folder`).

    Args:
        card: what the model card says (:meth:`PolicyCard.from_run`); without it, only what the network is.
        repo_id: the hub id the folder is for: the card's loading example names it (else the folder), and
            ``push_to_hub`` uploads there (``private`` and ``token`` go to the upload).

    Raises:
        PolicyFolderError: ``folder`` holds files a policy folder does not (it is not replaced), or is a file.
    """
    if push_to_hub and not repo_id:
        raise ValueError("save_policy_folder(push_to_hub=True) needs repo_id='owner/name': where to upload")
    folder = Path(folder)
    refuse_links(folder)
    _check_replaceable(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.{secrets.token_hex(6)}.tmp"  # beside it: the rename stays on one disk
    tmp.mkdir()  # not mkdtemp: an ordinary folder's permissions
    try:
        GuidancePolicy(policy, card).save_pretrained(tmp, config=policy.config,
                                                     model_card_kwargs={"where": repo_id or str(folder)})
        _replace_folder(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if push_to_hub:
        push_policy_folder(folder, repo_id, private=private, token=token)  # type: ignore[arg-type]
    return folder


def _check_replaceable(folder: Path) -> None:
    if folder.is_file():
        raise PolicyFolderError(f"{folder} is a file, where a policy folder was to be written: choose another path")
    if folder.is_dir():
        others = sorted(p.name for p in folder.iterdir() if p.name not in FOLDER_FILES)
        if others:
            raise PolicyFolderError(
                f"{folder} exists and holds files a policy folder does not ({', '.join(others[:5])}"
                + (", ..." if len(others) > 5 else "") + "): it is not replaced; choose a new folder or empty it"
            )


def _replace_folder(new: Path, folder: Path) -> None:
    """Put folder ``new`` at ``folder``, replacing a previous policy folder there (moved aside first, then
    removed: a crash in between leaves it under a hidden ``.<name>.old...`` name, never half-written)."""
    if not folder.exists():
        os.rename(new, folder)
        return
    old = folder.parent / f".{folder.name}.old.{secrets.token_hex(6)}.tmp"
    os.rename(folder, old)
    os.rename(new, folder)
    shutil.rmtree(old, ignore_errors=True)


def load_policy_folder(folder_or_repo_id: str | Path, *, revision: str | None = None,
                       device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
                       cache_dir: str | Path | None = None, token: str | bool | None = None,
                       local_files_only: bool = False, force_download: bool = False) -> BaseGuidanceModel:
    """The guidance network of a policy folder: a local folder, or a Hub model id (downloaded through
    ``huggingface_hub``'s cache; ``revision`` a branch, tag or commit).

    Raises:
        PolicyFolderError: the folder or repository does not exist, lacks ``config.json`` or
            ``model.safetensors``, holds a foreign config, or its weights are corrupt or disagree with its config.
    """
    where = str(folder_or_repo_id)
    path = Path(where).expanduser()
    if path.is_dir():
        where = str(path)
    elif path.exists() or not _HUB_ID.match(where) or where.startswith((".", "/", "~")):
        raise PolicyFolderError(
            f"{where} is neither a policy folder nor a hub model id ('owner/name'): pass the folder written by "
            "save_policy_folder / experiments/export_policy.py, or a hub id"
        )
    try:
        return GuidancePolicy.from_pretrained(where, revision=revision, device=device, dtype=dtype,
                                              cache_dir=cache_dir, token=token, local_files_only=local_files_only,
                                              force_download=force_download).network
    except (hub_errors.RepositoryNotFoundError, hub_errors.LocalEntryNotFoundError, hub_errors.HFValidationError) as e:
        raise PolicyFolderError(
            f"{where} is not a local folder, and the hub repository {where!r} (revision {revision or 'main'}) cannot "
            f"be read ({type(e).__name__}): check the id, your login (hf auth login) for a private repository, and "
            "the network (HF_HUB_OFFLINE=1 reads only what is cached)"
        ) from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PolicyFolderError(
            f"{CONFIG_FILE} of {where} is not valid JSON ({e}): write the folder again with save_policy_folder or "
            "experiments/export_policy.py"
        ) from e
    except hub_errors.HfHubHTTPError as e:
        raise PolicyFolderError(f"downloading {where!r} from the hub failed: {e}") from e


def push_policy_folder(folder: str | Path, repo_id: str, *, private: bool | None = None, token: str | None = None,
                       commit_message: str = "Upload a fluxguide guidance policy") -> str:
    """Upload a policy folder, as written, to the Hub model repository ``repo_id`` (created if missing); return the
    commit's URL. The folder is loaded first, so a damaged folder is refused before anything is sent."""
    folder = Path(folder)
    load_policy_folder(folder)
    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id=repo_id, private=private, exist_ok=True).repo_id
    info = api.upload_folder(repo_id=repo_id, repo_type="model", folder_path=folder, commit_message=commit_message,
                             allow_patterns=list(FOLDER_FILES))
    return str(info)

