"""Stops from outside the process: Ctrl-C, and SIGTERM (a scheduler's preemption,
torchrun shutting down, ``kill``) raised as ``Terminated``, a kind of KeyboardInterrupt,
so that whatever treats Ctrl-C as "stopped from outside" treats SIGTERM alike: tracking
ends the run KILLED, Optuna fails the running trial, and the stage says how to go on."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator


class Terminated(KeyboardInterrupt):
    """The process received SIGTERM."""


def stop_word(stop: KeyboardInterrupt) -> str:
    """How a stage names the stop in its last line: "terminated" or "interrupted"."""
    return "terminated" if isinstance(stop, Terminated) else "interrupted"


@contextlib.contextmanager
def stoppable() -> Iterator[None]:
    """Inside: SIGTERM raises ``Terminated``. A stop that leaves the block becomes
    SystemExit(143) for SIGTERM or SystemExit(130) for Ctrl-C (128 + the signal, as a
    shell reports a process the signal killed), without a traceback: the code inside
    has said what happened and closed its runs on the way out.

    Call from the main thread (Python delivers signals there only)."""
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    except Terminated:
        raise SystemExit(128 + signal.SIGTERM) from None
    except KeyboardInterrupt:
        raise SystemExit(128 + signal.SIGINT) from None
    finally:
        signal.signal(signal.SIGTERM, previous)


def _raise_terminated(signum, frame) -> None:
    raise Terminated()
