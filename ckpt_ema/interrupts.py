"""The signals that end a run from outside — Ctrl-C (SIGINT), SIGTERM (kill, a scheduler's stop, torchrun stopping
its workers) and SIGHUP (a closed terminal) — turned into one exception, so that each of them unwinds like Ctrl-C:
every ``finally`` runs, and the outputs' temporary files are removed (:meth:`SafetensorsOutput.abort`).

Python turns only SIGINT into an exception (KeyboardInterrupt); SIGTERM and SIGHUP would otherwise end the process
on the spot, leaving full-size hidden ``.NAME.*.tmp`` files behind. ``kill -9`` cannot be caught: the next write of
the same output removes what it left (:func:`ckpt_ema.output.atomic.remove_stale_temporaries`).
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

CAUGHT = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


class Interrupted(KeyboardInterrupt):
    """A run stopped by a signal; ``exit_code`` is the shell's 128 + signal number (130 for Ctrl-C)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.exit_code = 128 + signum


# While a module is being imported, a signal is held and sent again this much later.
RETRY_SECONDS = 0.05


def _importing(frame: Any) -> bool:
    """Whether ``frame`` runs inside an import statement."""
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


def _interrupt(signum: int, frame: Any) -> None:
    if _importing(frame):
        # An exception raised inside an import can be swallowed by the importer (torch imports numpy inside a
        # try) and leave a half-initialised module behind that fails later with a traceback: hold the signal
        # until the import is over, by sending it again shortly.
        threading.Timer(RETRY_SECONDS, os.kill, (os.getpid(), signum)).start()
        return
    for caught in CAUGHT:  # a second signal must not break the cleanup that this one starts
        signal.signal(caught, signal.SIG_IGN)
    raise Interrupted(signum)


@contextmanager
def signals_as_interrupts() -> Iterator[None]:
    """Within the block, SIGINT, SIGTERM and SIGHUP raise :class:`Interrupted`; the previous handlers are restored
    after it. A signal that arrives during an import is held until the import is done. A signal the process was
    told to ignore (``nohup`` ignores SIGHUP) stays ignored. Only the main
    thread can install handlers: elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {caught: signal.getsignal(caught) for caught in CAUGHT}
    for caught, handler in previous.items():
        if handler is not signal.SIG_IGN:
            signal.signal(caught, _interrupt)
    try:
        yield
    finally:
        for caught, handler in previous.items():
            signal.signal(caught, handler if handler is not None else signal.SIG_DFL)


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name
