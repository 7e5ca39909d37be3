"""Whether a backbone can render a set of prompts: the one check every script, algorithm and env runs before
any model does (docs/design.md, "backbones").

:meth:`fluxguide.backbones.base.Backbone.check_prompts` says what a backbone can encode (non-empty prompts within
its length limit; a world's grammar). :func:`check_backbone_prompts` runs it and turns a refusal into a
:class:`PromptError` naming where the prompts came from (the flag and the file) and the fix, so a prompt the
model cannot render stops a run at its start instead of training on it silently or failing at the first
evaluation.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fluxguide.errors import UserError

if TYPE_CHECKING:
    from fluxguide.backbones.base import Backbone


class PromptError(UserError, ValueError):
    """Prompts that cannot be used: a bad prompt source (unknown, missing, unreadable, empty, repeats;
    :func:`fluxguide.envs.prompts.resolve_prompts`) or prompts the backbone cannot render
    (:func:`check_backbone_prompts`)."""


def check_backbone_prompts(backbone: Backbone, prompts: list[str], *, where: str | None = None,
                           source: str | None = None) -> list[str]:
    """``prompts``, after refusing any ``backbone`` cannot render (:meth:`Backbone.check_prompts`), before any
    model runs.

    Args:
        backbone: the base model.
        prompts: every prompt the caller may use (a whole training set, not one batch, where it has one).
        where: what named the prompts, first in the message (``"--train-prompts prompts.txt"``).
        source: what to edit to fix them (the prompt file or set); ``None``: the caller's prompt list.

    Raises:
        PromptError: naming the prompts the backbone refuses (at most a few, with their count), ``where`` and
            the fix.
        TypeError: a bare string, or non-string items (a caller's bug, not a prompt file's).
    """
    try:
        backbone.check_prompts(prompts)
    except ValueError as e:
        fix = f"remove or rewrite them in {source}" if source else "pass only prompts it can encode"
        prefix = f"{where}: " if where else ""
        raise PromptError(
            f"{prefix}{str(e).rstrip('. ')}. {type(backbone).__name__} cannot render these prompts: {fix}"
        ) from e
    return prompts
