"""Reporting is an event stream: a console renderer and a JSON-lines renderer."""

from __future__ import annotations

import json
import sys
import threading
import time
from typing import Any, TextIO


class Reporter:
    """Receives build events; the base class ignores them."""

    def emit(self, event: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


class JsonReporter(Reporter):
    """One JSON object per line, for CI."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stdout

    def emit(self, event: dict[str, Any]) -> None:
        if event["event"] == "summary":  # the CLI prints the summary object as the last line
            return
        self.stream.write(json.dumps({"t": round(time.time(), 3), **event}) + "\n")
        self.stream.flush()


def printable(text: str) -> str:
    """``text`` with control characters shown as escapes (a manifest's name is printed to a terminal)."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in str(text))


class ConsoleReporter(Reporter):
    """A line per stage; on a terminal, a live status line with elapsed time for running stages."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty()
        self._running: tuple[str, float, str] | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None

    def _line(self, text: str) -> None:
        with self._lock:
            if self.tty:
                self.stream.write("\r\033[K")
            self.stream.write(text + "\n")
            self.stream.flush()

    def _tick(self) -> None:
        while not self._stop.wait(0.2):
            with self._lock:
                if self._running:
                    name, t0, msg = self._running
                    self.stream.write(f"\r\033[K  {name:<10} {time.monotonic() - t0:6.1f}s  {msg}")
                    self.stream.flush()

    def emit(self, e: dict[str, Any]) -> None:
        kind = e["event"]
        if kind == "plan":
            for note in e.get("notes", []):
                self._line(f"qbuild: {note}")
        elif kind == "stage_started":
            self._running = (e["stage"], time.monotonic(), "")
            if self.tty and self._ticker is None:
                self._ticker = threading.Thread(target=self._tick, daemon=True)
                self._ticker.start()
        elif kind == "progress" and self._running:
            self._running = (self._running[0], self._running[1], e["message"])
        elif kind == "lock_wait":
            self._line(f"  {e['stage']:<10} waiting: {e['holder']} is building {e['key'][:12]}")
        elif kind in ("stage_cached", "stage_built", "stage_pulled"):
            self._running = None
            how = {"stage_cached": "cached", "stage_built": "built ", "stage_pulled": "pulled"}[kind]
            self._line(f"  {e['stage']:<10} {how} {e['seconds']:7.2f}s  {e['key'][:12]}")
        elif kind == "stage_redone":
            self._running = None
            same = "same bytes" if e["reproducible"] else "DIFFERS: " + ", ".join(e["differs"][:5])
            self._line(f"  {e['stage']:<10} redone {e['seconds']:7.2f}s  {e['key'][:12]}  {same}")
        elif kind == "memory_estimate":
            self._line(f"qbuild: {e['text']}")
        elif kind == "manifest":
            self._line(f"qbuild: {printable(e['name'])} ({printable(e['manifest'])})")
        elif kind == "remote_damaged":
            self._line(f"  {e['stage']:<10} remote entry damaged ({e['problem']}): rebuilding")
        elif kind == "push_failed":
            self._line(f"  {e['stage']:<10} push to the remote failed: {e['error']}")
        elif kind == "stage_interrupted":
            self._running = None
            self._line(f"  {e['stage']:<10} interrupted {e['seconds']:7.2f}s")
        elif kind == "stage_failed":
            self._running = None
            self._line(f"  {e['stage']:<10} FAILED {e['seconds']:7.2f}s")
        elif kind == "summary":
            self._summary(e)

    def _summary(self, e: dict[str, Any]) -> None:
        built = sum(s["state"] == "built" for s in e["stages"])
        pulled = sum(s["state"] == "pulled" for s in e["stages"])
        redone = sum(s["state"] == "redone" for s in e["stages"])
        self._line(f"qbuild: {printable(e['name'])}: {built} built, " + (f"{pulled} pulled, " if pulled else "")
                   + (f"{redone} redone, " if redone else "")
                   + f"{len(e['stages']) - built - pulled - redone} cached, {e['seconds']:.2f}s")
        for name, path in e["artifacts"].items():
            self._line(f"  {name:<10} {path}")

    def close(self) -> None:
        self._stop.set()
