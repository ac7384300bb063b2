"""The one exception type that the CLI turns into a single line and exit code 2."""

from __future__ import annotations

from pathlib import Path


class CkptEmaError(Exception):
    """Bad input from the user: a file, an option or a combination of them.

    The message is one line that names the file (when there is one) and what is wrong with it;
    the CLI prints it as ``ckpt-ema: error: <message>`` and exits with code 2, without a traceback.
    """

    def __init__(self, message: str, path: str | Path | None = None) -> None:
        self.path = None if path is None else str(path)
        super().__init__(f"{self.path}: {message}" if self.path else message)
