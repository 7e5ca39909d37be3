"""The scripts' entry point: parse the flags, run, and turn the errors a user can fix into one clear line.

``cli(main, Config)`` replaces ``main(tyro.cli(Config))`` under ``if __name__ == "__main__"``: a bad option
(:class:`~fluxguide.harness.config.ConfigError`), a folder another process is writing
(:class:`~fluxguide.locking.FolderLockedError`) or an unusable dataset (:class:`~fluxguide.data.DatasetError`)
exits with status 2 and the message (which names the flag or the file and the fix), without a traceback; a
Ctrl-C before the training loop (which handles it itself, :class:`~fluxguide.harness.run.Run`) exits with 130.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import tyro

from fluxguide.data.store import DatasetError
from fluxguide.harness.config import ConfigError
from fluxguide.locking import FolderLockedError

C = TypeVar("C")


def cli(main: Callable[[C], Any], config_type: type[C], args: Sequence[str] | None = None) -> Any:
    """``main(tyro.cli(config_type))``, with the user's errors as a one-line message and a non-zero exit."""
    cfg = tyro.cli(config_type, args=args)
    try:
        return main(cfg)
    except (ConfigError, FolderLockedError, DatasetError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print("\ninterrupted before training started: nothing new was written", file=sys.stderr, flush=True)
        raise SystemExit(130) from None
