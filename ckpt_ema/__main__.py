"""``python -m ckpt_ema`` and the ``ckpt-ema`` command: the command line, quiet (exit 130, no traceback) even
when Ctrl-C comes while it is still being imported."""

from __future__ import annotations

import sys


def run() -> None:
    try:
        from ckpt_ema.cli import main
    except KeyboardInterrupt:
        sys.stderr.write("ckpt-ema: error: interrupted\n")
        sys.exit(130)
    main()


if __name__ == "__main__":
    run()
