"""Running the qaic compiler (and the qnn backend's two tools): output streamed to a log and to progress, a
timeout, Ctrl-C kills it.

The compiler runs in its own session (process group), so a timeout or an interrupt ends it and any
helper it started; nothing is published because the executor removes the staging directory on any
exception. A failure is a ``CompileError`` carrying the command, the exit code and the output's tail.
"""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import IO

from qbuild.errors import CompileError

TAIL_LINES = 40
#: at most one progress event per this many seconds (a compiler can print thousands of lines)
PROGRESS_EVERY_S = 0.5
_END = None


def _pump(stream: IO[bytes], log: IO[str], lines: queue.Queue[str | None]) -> None:
    """Reader thread: every output line to the log file and to the queue, then the end marker."""
    try:
        for raw in iter(stream.readline, b""):
            line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
            log.write(line + "\n")
            log.flush()
            lines.put(line)
    finally:
        lines.put(_END)


def _kill(proc: subprocess.Popen[bytes], grace_s: float = 3.0) -> None:
    """SIGTERM the compiler's process group, SIGKILL it after ``grace_s``."""
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_compiler(cmd: list[str], *, log_path: Path, timeout_s: float,
                 progress: Callable[[str, float | None], None], tool: str = "the qaic compiler",
                 timeout_key: str = "compile.qaic.timeout_s") -> float:
    """Run ``cmd`` to completion; return its wall time. Raise ``CompileError`` on failure or timeout.

    ``tool`` names the program in messages, ``timeout_key`` the manifest key of the limit (other backends,
    e.g. qnn's two tools, run through this same runner)."""
    t0 = time.monotonic()
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    with open(log_path, "w", encoding="utf-8") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        try:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        except OSError as exc:
            raise CompileError(f"cannot start {tool}: {exc}", command=cmd) from exc
        assert proc.stdout is not None
        lines: queue.Queue[str | None] = queue.Queue()
        reader = threading.Thread(target=_pump, args=(proc.stdout, log, lines), daemon=True)
        reader.start()
        try:
            _follow(proc, lines, tail, (t0, timeout_s), progress, (tool, timeout_key))
            _wait(proc, tail, (t0, timeout_s), (tool, timeout_key))
        except BaseException:  # timeout, Ctrl-C, anything: the compiler must not outlive us
            _kill(proc)
            reader.join(timeout=5)
            raise
        finally:
            proc.stdout.close()
    seconds = time.monotonic() - t0
    if proc.returncode == 0:
        return seconds
    raise CompileError(f"{tool} failed (exit code {proc.returncode}) after {seconds:.1f} s",
                       command=cmd, returncode=proc.returncode, output_tail="\n".join(tail))


def _follow(proc: subprocess.Popen[bytes], lines: queue.Queue[str | None], tail: deque[str],
            budget: tuple[float, float], progress: Callable[[str, float | None], None],
            names: tuple[str, str] = ("the qaic compiler", "compile.qaic.timeout_s")) -> None:
    """Drain output until the compiler's output is closed, or the time budget (start, seconds) is spent."""
    deadline = budget[0] + budget[1]
    last_report, pending, ended = 0.0, None, False
    while not ended:
        now = time.monotonic()
        if now > deadline:
            _timed_out(proc, tail, budget[1], names)
        try:
            line = lines.get(timeout=min(0.2, max(deadline - now, 0.01)))
        except queue.Empty:
            line = ""
        if line is _END:
            ended = True
        elif line:
            tail.append(line)
            pending = line
        if pending and (ended or time.monotonic() - last_report >= PROGRESS_EVERY_S):
            progress(pending[:200], None)
            last_report, pending = time.monotonic(), None


def _wait(proc: subprocess.Popen[bytes], tail: deque[str], budget: tuple[float, float],
          names: tuple[str, str] = ("the qaic compiler", "compile.qaic.timeout_s")) -> None:
    """Wait for the exit after the output closed, within the time budget."""
    try:
        proc.wait(timeout=max(budget[0] + budget[1] - time.monotonic(), 0.01))
    except subprocess.TimeoutExpired:
        _timed_out(proc, tail, budget[1], names)


def _timed_out(proc: subprocess.Popen[bytes], tail: deque[str], timeout_s: float,
               names: tuple[str, str] = ("the qaic compiler", "compile.qaic.timeout_s")) -> None:
    tool, key = names
    _kill(proc)
    cmd = [str(a) for a in proc.args]  # type: ignore[union-attr]
    raise CompileError(f"{tool} ran past {key}={timeout_s:g} s and was killed",
                       command=cmd,
                       returncode=proc.returncode, output_tail="\n".join(tail),
                       hint=f"raise {key} if the model needs longer")
