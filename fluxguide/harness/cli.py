"""The scripts' entry point: parse the flags, run, and turn the errors a user can fix into one clear line.

``cli(main, Config)`` replaces ``main(tyro.cli(Config))`` under ``if __name__ == "__main__"``. Every refusal of
the user's input is a :class:`~fluxguide.errors.UserError` (a bad option, a folder another process is writing,
an unusable dataset or checkpoint, an unknown plug-in, a reward that cannot do what is asked, ...): it exits
with status 2 and its message, which names the flag or the file and the fix, without a traceback. Anything
else is a bug and keeps its traceback (exit 1). ``--debug`` (or ``FLUXGUIDE_DEBUG=1``) shows the traceback of a
user error too. A Ctrl-C before the training loop (which handles it itself, :class:`~fluxguide.harness.run.Run`)
exits with 130.
With ``presets`` (:mod:`fluxguide.harness.presets`), ``--preset NAME`` picks the defaults the other flags override.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import tyro

from fluxguide.errors import DEBUG_ENV, UserError, debug_enabled
from fluxguide.harness.presets import preset_help, preset_name

C = TypeVar("C")

#: The flag that shows tracebacks of user errors (taken out of the arguments before the config is parsed).
DEBUG_FLAG = "--debug"

#: What a Ctrl-C before the training loop prints; a script that may have written by then sets its own.
INTERRUPTED_MESSAGE = "interrupted before training started: nothing new was written"


def fail(error: BaseException) -> SystemExit:
    """The one-line report of a user error on stderr; returns the ``SystemExit(2)`` to raise."""
    print(f"error: {error}", file=sys.stderr, flush=True)
    return SystemExit(2)


def cli(main: Callable[[C], Any], config_type: type[C], args: Sequence[str] | None = None, *,
        presets: Mapping[str, Callable[[], C]] | None = None,
        interrupted: Callable[[], str] | str = INTERRUPTED_MESSAGE) -> Any:
    """``main(tyro.cli(config_type))``, with the user's errors as a one-line message and exit status 2.

    ``presets`` maps preset names to factories of ``config_type`` (the first is the default); the chosen one's
    values become the defaults of every flag, and an unknown ``--preset`` exits with 2 naming the presets.
    ``interrupted`` is the message of a Ctrl-C that reaches here (or a function returning it, called then, so
    it can say what was written)."""
    argv = list(sys.argv[1:] if args is None else args)
    if DEBUG_FLAG in argv:
        argv = [a for a in argv if a != DEBUG_FLAG]
        os.environ[DEBUG_ENV] = "1"  # children (compare.py's runs) inherit it
    debug = debug_enabled()
    try:
        default = presets[preset_name(argv, presets)]() if presets else None
        cfg = tyro.cli(config_type, args=argv, default=default,
                       description=preset_help(presets) if presets else None)
        return main(cfg)
    except UserError as e:
        if debug:
            raise
        raise fail(e) from None
    except KeyboardInterrupt:
        message = interrupted() if callable(interrupted) else interrupted
        print(f"\n{message}", file=sys.stderr, flush=True)
        raise SystemExit(130) from None
