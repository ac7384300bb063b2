"""The error types that the CLI turns into a single line and exit code 2."""

from __future__ import annotations

from pathlib import Path


class CkptEmaError(Exception):
    """Bad input from the user: a file, an option or a combination of them.

    The message is one line that names the file (when there is one) and what is wrong with it;
    the CLI prints it as ``ckpt-ema: error: <message>`` and exits with code 2, without a traceback.
    """

    def __init__(self, message: str, path: str | Path | None = None) -> None:
        self.path = None if path is None else str(path)
        self.message = message
        super().__init__(f"{self.path}: {message}" if self.path else message)


class OptionError(CkptEmaError):
    """A bad value for one parameter, named as the Python API names it (``decay``, ``max_memory``).

    ``str()`` reads ``decay must be in [0, 1], got 2``; the CLI words the same error as its flag
    (``--decay must be in [0, 1], got 2``) through :meth:`as_flag`.
    """

    def __init__(self, param: str, problem: str) -> None:
        self.param = param
        self.problem = problem
        super().__init__(f"{param} {problem}")

    def as_flag(self) -> str:
        return f"--{self.param.replace('_', '-')} {self.problem}"
