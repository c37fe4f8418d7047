"""Stopping a run cleanly: Ctrl-C (SIGINT) or SIGTERM lets the current step finish.

Inside ``with guard():`` (the command line runs every command in one; :meth:`Trainer.run
<batchnorm.repro.trainer.Trainer.run>` opens one too, for use from Python) the first SIGINT or
SIGTERM does not raise: it is recorded (:func:`requested`), a line on stderr says that the run
stops after the current step, and the code polls :func:`requested` where stopping is safe. The
trainer polls after every step: it then saves its checkpoint and returns what it has; the
command writes its history so far and calls :func:`stop_if_requested`, which prints how to
resume (or, for a command without checkpoints, where the partial results are) and raises
:class:`Stopped`; the command line exits with ``128 + signal`` (130 for Ctrl-C). A second
signal raises ``KeyboardInterrupt`` at once: the command line prints one line and exits with
status 130 (checkpoints already written stay intact). The handlers are installed by the
outermost guard, in the main thread only (the one that receives signals), and the previous
ones are restored when it exits; outside a guard, signals do what they did before.

Several processes (``torchrun``): the launcher passes the signal it gets on to every worker
(they run in sessions of their own: the terminal's Ctrl-C reaches only the launcher) and kills
them 30 s later. The workers agree on stopping with :func:`agreed` (one all-reduce),
which the trainer calls at its checks (every ``check_every`` steps and at evaluations) and the
commands between runs, so all of them stop after the same step. A signal that reaches one
worker only still stops all of them at the next check.
"""

from __future__ import annotations

import os
import shlex
import signal
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from batchnorm.process_group import is_main_process, world_size

SIGNALS = (signal.SIGINT, signal.SIGTERM)
# tests only: after step PAUSE_AT (the first time a loop gets there) write PAUSE_FILE and wait,
# up to a minute, for a signal (with PAUSE_HOLD set: for the minute, whatever comes), so that a
# test can interrupt or kill a run at a known step
PAUSE_AT, PAUSE_FILE = "BATCHNORM_TEST_PAUSE_AT", "BATCHNORM_TEST_PAUSE_FILE"
PAUSE_HOLD = "BATCHNORM_TEST_PAUSE_HOLD"

_depth = 0
_previous: dict = {}
_received: int | None = None  # the signal that asked to stop, if one did
_paused = False


class Stopped(Exception):  # noqa: N818 - not an error: a command stopped on request
    """A command stopped by a signal, after saving what it had and saying so; the command line
    exits with :attr:`status`."""

    def __init__(self, status: int):
        super().__init__(f"stopped by a signal (exit status {status})")
        self.status = status


@contextmanager
def guard():
    """Within: the first SIGINT/SIGTERM is recorded (:func:`requested`) instead of stopping
    the process, a second raises ``KeyboardInterrupt``. Nested guards share the outermost
    one's state (a request made anywhere inside stays visible until it exits)."""
    global _depth, _received
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    if _depth == 0:
        _received = None
        for number in SIGNALS:
            _previous[number] = signal.getsignal(number)
            signal.signal(number, _handle)
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if _depth == 0:
            for number, handler in _previous.items():
                signal.signal(number, signal.SIG_DFL if handler is None else handler)
            _previous.clear()


def _handle(number, frame) -> None:
    global _received
    if _received is not None:
        raise KeyboardInterrupt
    _received = number
    # os.write, not print: the handler may run in the middle of a print to the same stream
    os.write(2, f"\n{signal.Signals(number).name}: stopping after the current step and saving "
                "what there is (send it again to stop at once)\n".encode())


def requested() -> bool:
    """Whether a signal asked the current (or last) guarded run to stop."""
    return _received is not None


def exit_status() -> int:
    """``128 + signal`` for the signal that asked to stop (130 for SIGINT: Ctrl-C)."""
    return 128 + int(_received or signal.SIGINT)


def agreed(device: torch.device | str | None = None) -> bool:
    """:func:`requested`, agreed by every process of the group (any one asked: all stop). A
    collective: with several processes every one must call it at the same point."""
    global _received
    if world_size() <= 1 or not torch.distributed.is_initialized():
        return requested()
    if device is None:
        nccl = torch.distributed.get_backend() == "nccl"
        device = torch.device("cuda", torch.cuda.current_device()) if nccl else "cpu"
    flag = torch.tensor([float(_received or 0)], device=device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    number = int(flag.item())
    if number and _received is None:
        _received = number  # stopped by another process's signal
    return bool(number)


def stop_if_requested(args, where: str, *, resume: bool = False,
                      partial: dict | None = None) -> None:
    """If a signal asked to stop (:func:`agreed`): write ``partial`` (the results so far, for a
    command without checkpoints) to ``OUT/interrupted.json``, print one line saying where the
    run stopped and how to continue (``resume``: the same command with ``--resume``; else: where
    the partial results are, and that the command starts over) and raise :class:`Stopped`."""
    if not agreed():
        return
    prog = getattr(args, "_prog", "batchnorm")
    name = signal.Signals(exit_status() - 128).name
    if resume:
        then = f"resume with: {command(args, resume=True)}"
    else:
        then = f"this command has no checkpoints: `{command(args)}` starts over"
        if partial is not None:
            path = Path(args.out) / "interrupted.json"
            if is_main_process():
                from batchnorm.repro.common import write_json

                write_json(path, dict(stopped=f"{name} {where}", command=command(args),
                                      **partial))
            then = f"results so far in {path}; {then}"
    if is_main_process():
        print(f"{prog}: {name}: stopped {where}; {then}", file=sys.stderr, flush=True)
    raise Stopped(exit_status())


def command(args, *, resume: bool = False) -> str:
    """The command being run, as typed (``batchnorm ...``; + ``--resume``)."""
    argv = list(getattr(args, "_argv", None) or sys.argv[1:])
    if resume and "--resume" not in argv:
        argv.append("--resume")
    text = shlex.join(["batchnorm", *argv])
    return f"{text} (under the same torchrun command)" if world_size() > 1 else text


def ignore_interrupts(worker_id: int = 0) -> None:
    """``worker_init_fn`` of data-loading processes: they ignore Ctrl-C, which the terminal
    sends to the whole process group, and leave stopping to the main process (else they would
    exit and the main process's next batch would fail)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def pause_point(step: int) -> None:
    """For tests (see :data:`PAUSE_AT`); does nothing unless the environment asks."""
    global _paused
    at = os.environ.get(PAUSE_AT)
    if _paused or at is None or int(at) != step:
        return
    _paused = True
    Path(os.environ[PAUSE_FILE]).write_text(f"{os.getpid()} {step}\n")
    hold = bool(os.environ.get(PAUSE_HOLD))
    deadline = time.monotonic() + 60
    while (hold or not requested()) and time.monotonic() < deadline:
        time.sleep(0.01)
