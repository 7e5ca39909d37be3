"""The one base class of every refusal a user can act on.

A :class:`UserError` says what input is wrong (the flag, file, folder or plug-in, with its value) and how to fix
it; it is not a bug. Every error class of the library that reports a user's input subclasses it besides its own
historical base (``ConfigError`` is still a ``ValueError``, ``CheckpointError`` a ``RuntimeError``), so callers
that catch the old types keep working, and the scripts' entry point (:func:`fluxguide.harness.cli.cli`) turns
any of them into one line on stderr with exit status 2. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import os

#: Set to a non-empty value other than ``0`` to see the traceback of a :class:`UserError` too.
DEBUG_ENV = "FLUXGUIDE_DEBUG"


class UserError(Exception):
    """A refusal of the user's input; the message names the input and the fix."""


def debug_enabled() -> bool:
    """Whether ``FLUXGUIDE_DEBUG`` asks for tracebacks of user errors."""
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")
