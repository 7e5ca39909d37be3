"""The scripts' entry point: parse the flags, run, and turn the errors a user can fix into one clear line.

``cli(main, Config)`` replaces ``main(tyro.cli(Config))`` under ``if __name__ == "__main__"``: a bad option
(:class:`~fluxguide.harness.config.ConfigError`), a folder another process is writing
(:class:`~fluxguide.locking.FolderLockedError`) or an unusable dataset (:class:`~fluxguide.data.DatasetError`)
exits with status 2 and the message (which names the flag or the file and the fix), without a traceback; a
Ctrl-C before the training loop (which handles it itself, :class:`~fluxguide.harness.run.Run`) exits with 130.
With ``presets`` (:mod:`fluxguide.harness.presets`), ``--preset NAME`` picks the defaults the other flags override.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import tyro

from fluxguide.data.store import DatasetError
from fluxguide.harness.config import ConfigError
from fluxguide.harness.presets import preset_help, preset_name
from fluxguide.locking import FolderLockedError

C = TypeVar("C")


def cli(main: Callable[[C], Any], config_type: type[C], args: Sequence[str] | None = None, *,
        presets: Mapping[str, Callable[[], C]] | None = None) -> Any:
    """``main(tyro.cli(config_type))``, with the user's errors as a one-line message and a non-zero exit.

    ``presets`` maps preset names to factories of ``config_type`` (the first is the default); the chosen one's
    values become the defaults of every flag, and an unknown ``--preset`` exits with 2 naming the presets."""
    argv = list(sys.argv[1:] if args is None else args)
    default = None
    if presets:
        try:
            default = presets[preset_name(argv, presets)]()
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None
    cfg = tyro.cli(config_type, args=argv, default=default,
                   description=preset_help(presets) if presets else None)
    try:
        return main(cfg)
    except (ConfigError, FolderLockedError, DatasetError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print("\ninterrupted before training started: nothing new was written", file=sys.stderr, flush=True)
        raise SystemExit(130) from None
