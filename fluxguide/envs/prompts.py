"""Where an environment's prompts come from: a list, a text file, or one of the shapes world's prompt sets.

Every reset draws the episode's prompts from the source with the env's seeded ``torch.Generator``, so a
seed fixes the prompts as well as the initial noise.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

PromptSourceLike = str | os.PathLike | Sequence[str]


def _shapes_train() -> list[str]:
    from fluxguide.backbones.shapes.scenes import train_prompts

    return train_prompts()


def _shapes_heldout() -> list[str]:
    from fluxguide.backbones.shapes.scenes import heldout_prompts

    return heldout_prompts()


#: Named prompt sets (the shapes world's RL training prompts and its held-out evaluation prompts).
NAMED_PROMPT_SETS: dict[str, Callable[[], list[str]]] = {
    "shapes-train": _shapes_train,
    "shapes-heldout": _shapes_heldout,
}


def _valid_sources() -> str:
    names = ", ".join(repr(n) for n in NAMED_PROMPT_SETS)
    return f"a list of prompt strings, a path to a text file with one prompt per line, or one of {names}"


def resolve_prompts(source: PromptSourceLike) -> list[str]:
    """The list of prompts a source stands for.

    Args:
        source: a list (or tuple) of prompt strings; a path to a UTF-8 text file with one prompt per line
            (blank lines are skipped); or the name of a prompt set in :data:`NAMED_PROMPT_SETS`.

    Raises:
        ValueError: an unknown name or missing file (the message lists the valid sources), an empty source,
            or an entry that is not a non-empty string.
    """
    if isinstance(source, (str, os.PathLike)):
        key = os.fspath(source)
        if isinstance(source, str) and key.strip().lower() in NAMED_PROMPT_SETS:
            prompts = NAMED_PROMPT_SETS[key.strip().lower()]()
        elif Path(key).expanduser().is_file():
            lines = Path(key).expanduser().read_text(encoding="utf-8").splitlines()
            prompts = [line.strip() for line in lines if line.strip()]
            if not prompts:
                raise ValueError(f"prompt file {key!r} holds no prompts: write one prompt per line")
        else:
            raise ValueError(
                f"unknown prompt source {key!r}: it is neither a prompt set name nor an existing file. "
                f"Valid sources: {_valid_sources()}"
            )
    elif isinstance(source, Sequence):
        prompts = list(source)
    else:
        raise TypeError(f"unknown prompt source of type {type(source).__name__}. Valid sources: {_valid_sources()}")
    if not prompts:
        raise ValueError(f"the prompt source is empty; valid sources: {_valid_sources()}")
    for i, p in enumerate(prompts):
        if not isinstance(p, str) or not p.strip():
            raise ValueError(f"prompt {i} is {p!r}; every prompt must be a non-empty string")
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
