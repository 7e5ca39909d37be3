"""Where an environment's prompts come from: a list, a text file, or a named prompt set (a plug-in).

Every reset draws the episode's prompts from the source with the env's seeded ``torch.Generator``, so a
seed fixes the prompts as well as the initial noise.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from fluxguide.backbones.prompt_check import PromptError
from fluxguide.plugins import Registry

PromptSourceLike = str | os.PathLike | Sequence[str]


PROMPT_SETS: Registry[Callable[[], list[str]]] = Registry("prompt set", "fluxguide.prompts")
"""Named prompt sets: registered in code, declared in the ``fluxguide.prompts`` entry-point group (the shapes
world's ``"shapes-train"`` / ``"shapes-heldout"``), or a spec ``"package.module:function"``."""


def register_prompt_set(name: str, fn: Callable[[], list[str]] | None = None, *, overwrite: bool = False) -> Any:
    """Register ``fn() -> list[str]`` as the prompt set ``name`` (a decorator without ``fn``)."""
    return PROMPT_SETS.register(name, fn, overwrite=overwrite)


def _valid_sources() -> str:
    names = ", ".join(repr(n) for n in PROMPT_SETS.names())
    return (f"a list of prompt strings, a path to a text file with one prompt per line, one of {names}, or a spec "
            f"'package.module:function' returning a list of prompts")


def _preview(prompt: str, limit: int = 60) -> str:
    return repr(prompt) if len(prompt) <= limit else f"{prompt[:limit]!r}... ({len(prompt)} characters)"


def _read_prompt_file(path: Path) -> list[str]:
    """The non-blank lines of a UTF-8 prompt file, stripped."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise PromptError(f"prompt file {str(path)!r} is not UTF-8 text ({e.reason} at byte {e.start}): save it as "
                          "UTF-8, one prompt per line") from None
    except OSError as e:
        raise PromptError(f"prompt file {str(path)!r} cannot be read ({e.strerror}): check its permissions") from None
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise PromptError(f"prompt file {str(path)!r} holds no prompts: write one prompt per line")
    return prompts


def resolve_prompts(source: PromptSourceLike, *, unique: bool = True) -> list[str]:
    """The list of prompts a source stands for.

    A prompt source is a set of distinct prompts, each drawn with equal probability: a prompt that appears
    twice is refused (``unique=True``), not silently de-duplicated, and not a weight. To train more on some
    prompts, build the weighting into the source's content (e.g. a prompt set whose function returns the
    prompts you want), or train on the subset separately; fluxguide has no per-prompt weights.

    Args:
        source: a list (or tuple) of prompt strings; a path to a UTF-8 text file with one prompt per line
            (blank lines are skipped); or the name of a prompt set in :data:`PROMPT_SETS` (or a spec).
        unique: refuse repeated prompts (``False`` for an explicit per-episode list, where two groups may
            share a prompt).

    Raises:
        PromptError: (a ``ValueError``) an unknown name, a missing or unreadable file (the message lists the valid
            sources), an empty source, an entry that is not a non-empty string, or (``unique``) a prompt that
            appears more than once.
    """
    if isinstance(source, (str, os.PathLike)):
        key = os.fspath(source)
        if isinstance(source, str) and not Path(key).expanduser().is_file() and key.strip() in PROMPT_SETS:
            prompts = list(PROMPT_SETS.get(key)())
        elif Path(key).expanduser().is_file():
            prompts = _read_prompt_file(Path(key).expanduser())
        else:
            raise PromptError(
                f"unknown prompt source {key!r}: it is neither a prompt set name nor an existing file. "
                f"Valid sources: {_valid_sources()}"
            )
    elif isinstance(source, Sequence):
        prompts = list(source)
    else:
        raise TypeError(f"unknown prompt source of type {type(source).__name__}. Valid sources: {_valid_sources()}")
    if not prompts:
        raise PromptError(f"the prompt source is empty; valid sources: {_valid_sources()}")
    for i, p in enumerate(prompts):
        if not isinstance(p, str) or not p.strip():
            shown = _preview(p) if isinstance(p, str) else repr(p)
            raise PromptError(f"prompt {i} is {shown}; every prompt must be a non-empty string")
    if unique:
        counts = Counter(prompts)
        repeated = [(p, n) for p, n in counts.items() if n > 1]
        if repeated:
            where = f"prompt file {os.fspath(source)!r}" if isinstance(source, (str, os.PathLike)) else "the prompt list"
            shown = ", ".join(f"{_preview(p)} ({n} times)" for p, n in repeated[:5])
            more = f" and {len(repeated) - 5} more" if len(repeated) > 5 else ""
            raise PromptError(
                f"{where} repeats {len(repeated)} prompt(s): {shown}{more}. A prompt source is a set of distinct "
                "prompts drawn uniformly; fluxguide does not de-duplicate silently and a repeat is not a weight. "
                "Remove the repeats (e.g. list(dict.fromkeys(prompts)))."
            )
    return prompts


class PromptSource:
    """A fixed list of prompts, drawn uniformly with replacement from a ``torch.Generator``.

    Args:
        source: see :func:`resolve_prompts`.
    """

    def __init__(self, source: PromptSourceLike) -> None:
        self.prompts = resolve_prompts(source)

    def __len__(self) -> int:
        return len(self.prompts)

    def draw(self, n: int, generator: torch.Generator) -> list[str]:
        """``n`` prompts drawn uniformly with replacement."""
        idx = torch.randint(len(self.prompts), (n,), generator=generator, device=generator.device)
        return [self.prompts[i] for i in idx.tolist()]


# The animal prompts of the flux-dev presets, in the spirit of DDPO's simple-animals set (Black et al., 2023):
# the training animals and the held-out ones are disjoint, so a held-out score measures generalisation.
_ANIMALS_TRAIN = ("cat", "dog", "horse", "cow", "sheep", "pig", "goat", "rabbit", "fox", "wolf", "bear", "deer",
                  "lion", "tiger", "zebra", "giraffe", "elephant", "monkey", "panda", "koala", "kangaroo", "camel",
                  "owl", "eagle", "parrot", "penguin", "duck", "swan", "frog", "turtle")
_ANIMALS_HELDOUT = ("raccoon", "hedgehog", "squirrel", "otter", "hippopotamus", "rhinoceros", "flamingo", "peacock",
                    "crocodile", "octopus")


@register_prompt_set("animals-train")
def animal_train_prompts() -> list[str]:
    """30 prompts "a photo of a <animal>" (the flux-dev presets' training prompts)."""
    return [f"a photo of a {a}" for a in _ANIMALS_TRAIN]


@register_prompt_set("animals-heldout")
def animal_heldout_prompts() -> list[str]:
    """10 prompts of animals that are not in ``animals-train`` (the flux-dev presets' held-out prompts)."""
    return [f"a photo of a {a}" for a in _ANIMALS_HELDOUT]
