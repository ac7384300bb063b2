"""``python -m ckpt_ema`` and the ``ckpt-ema`` command: the command line, quiet (exit 130, no traceback) even
when Ctrl-C comes while it is still being imported, or once it has finished (while Python exits)."""

from __future__ import annotations

import signal
import sys


def run() -> None:
    try:
        from ckpt_ema.cli import main
    except KeyboardInterrupt:
        sys.stderr.write("ckpt-ema: error: interrupted\n")
        sys.exit(130)
    try:
        main()
    finally:  # the run is over (its output committed or not): a late Ctrl-C must not kill the interpreter's exit
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, signal.SIG_IGN)


if __name__ == "__main__":
    run()
