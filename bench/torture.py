"""Torture: SIGKILL builds at random moments of every stage; the cache must stay consistent and the next
build must succeed.

Usage: python bench/torture.py [--kills 200] [--seed 0] [--loops 2] [--exec]

First one uninterrupted cold build is measured (the reference: stage timeline, keys, compiled digests).
Then each loop (one cache each, run side by side) starts a build of a tiny manifest and kills it with
SIGKILL at a random moment: either a random point inside a stage still to be built (after that stage's
``stage_started`` event, up to the stage's reference duration), or a random point of the whole expected
run. The stage aimed at is drawn uniformly. The same cache is killed again and again, so later kills reach
later stages as earlier ones are published; it is emptied when the stage aimed at is already cached (and
at random now and then), so every stage is hit, on cold caches and on partly built ones.

After each kill, in this order: the cache as the kill left it is copied aside; every entry under
``objects/`` is re-digested here, independently of qbuild (record parses, seal, key, exactly the listed
files, sizes and sha256 from the bytes); ``qbuild cache verify --json`` must find nothing damaged; and the
next build, on the copy, must succeed with the reference keys and compiled digests. Staging directories
of the dead process are not entries and are allowed.

By default builds run in processes forked from a server that has already imported torch, transformers,
ONNX and qbuild (``multiprocessing`` forkserver): the kill lands in qbuild's own code, not in the
interpreter's start-up, and a kill costs about a second instead of six. ``--exec`` runs each build as
``python -m qbuild`` instead. Ends with one JSON line (DESIGN rule 15).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from _machine import format_facts, machine_facts  # noqa: E402

MANIFEST = ROOT / "manifests" / "tiny-llama.yaml"
# the cheapest build that still runs all four stages: one 8-token bucket, one verify sequence
OVERRIDES = ("seq.lengths=[8]", "seq.ctx_len=16", "verify.seq_len=8", "verify.batch_size=1",
             "compile.onnxruntime.session=fixed")
STAGES = ("load", "export", "compile", "verify")
PRELOAD = ["torch", "transformers", "transformers.models.llama.modeling_llama", "onnx", "onnxruntime", "hydra",
           "omegaconf", "qbuild.cli", "qbuild.api", "qbuild.manifest.compose", "qbuild.plan.planner",
           "qbuild.execute.executor", "qbuild.stages.load", "qbuild.stages.export", "qbuild.stages.compile",
           "qbuild.stages.verify", "qbuild.tasks.causal_lm", "qbuild.backends.onnxruntime",
           "qbuild.runtime.onnxruntime"]
ANYTIME_P = 0.2  # share of kills at a random moment of the whole run (start-up and gaps included)
RESET_P = 0.1  # chance of emptying the cache after a kill (it is emptied too when the stage aimed at is cached)


# ---- processes -----------------------------------------------------------------------------------


def _forked_build(argv: list[str], out: str, err: str) -> None:
    """Body of a forked build: ``qbuild`` with stdout/stderr sent to files, exit status as the CLI's."""
    for fd, path in ((1, out), (2, err)):
        f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(f, fd)
        os.close(f)
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115 (the process ends with it)
    sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    from qbuild.cli import main

    sys.exit(main(argv))


def _noop() -> None:
    """A process that does nothing (starts the fork server)."""


class Build:
    """A running ``qbuild`` build whose JSON events are read as they arrive (with their arrival times)."""

    def __init__(self, argv: list[str], logs: Path, fork: bool, ctx: Any) -> None:
        logs.mkdir(parents=True, exist_ok=True)
        self.out, self.err = logs / "stdout", logs / "stderr"
        for f in (self.out, self.err):  # empty before the build starts: never read an older build's events
            f.write_bytes(b"")
        self.t0 = time.monotonic()
        if fork:
            self._proc: Any = ctx.Process(target=_forked_build, args=(argv, str(self.out), str(self.err)),
                                          daemon=True)
            self._proc.start()
        else:
            with open(self.out, "w") as o, open(self.err, "w") as e:
                self._proc = subprocess.Popen([sys.executable, "-m", "qbuild", *argv], stdout=o, stderr=e,
                                              stdin=subprocess.DEVNULL, cwd=ROOT)
        self.pid: int = self._proc.pid
        self.events: list[dict[str, Any]] = []
        self.times: list[float] = []
        self._buf = b""
        self._pos = 0

    def returncode(self) -> int | None:
        """Exit status (negative: the signal), None while running."""
        if isinstance(self._proc, subprocess.Popen):
            return self._proc.poll()
        return self._proc.exitcode

    def kill(self) -> int:
        """SIGKILL, then wait; the exit status (-9 when the kill was what ended it)."""
        if self.returncode() is None:
            os.kill(self.pid, signal.SIGKILL)
        return self.wait(60)

    def wait(self, timeout: float) -> int:
        if isinstance(self._proc, subprocess.Popen):
            rc = self._proc.wait(timeout)
        else:
            self._proc.join(timeout)
            rc = self._proc.exitcode
            if rc is None:
                raise TimeoutError(f"build {self.pid} still running after {timeout} s")
        self.poll()
        return rc

    def poll(self) -> list[dict[str, Any]]:
        """Read the events written since the last call; returns them."""
        try:
            with open(self.out, "rb") as f:
                f.seek(self._pos)
                data = f.read()
        except FileNotFoundError:
            return []
        self._pos += len(data)
        lines = (self._buf + data).split(b"\n")
        self._buf = lines.pop()
        now, new = time.monotonic() - self.t0, []
        for line in lines:
            if line.startswith(b"{"):
                new.append(json.loads(line))
        self.events += new
        self.times += [now] * len(new)
        return new

    def wait_for(self, pred: Callable[[dict[str, Any]], bool], timeout: float = 120) -> bool:
        """Poll until an event matches (True) or the build ends or the time is up (False)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(pred(e) for e in self.poll()):
                return True
            if self.returncode() is not None:
                return any(pred(e) for e in self.poll())
            time.sleep(0.002)
        return False

    def sleep(self, seconds: float) -> None:
        """Sleep, returning early if the build ends."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and self.returncode() is None:
            time.sleep(min(0.005, max(0.0, deadline - time.monotonic())))

    def stderr(self) -> str:
        try:
            return self.err.read_text(errors="replace")
        except OSError:
            return ""


class Launcher:
    """Starts builds: forked from a warm server (default) or as ``python -m qbuild`` (``fork=False``)."""

    def __init__(self, fork: bool = True) -> None:
        self.fork = fork
        self.ctx: Any = None
        if fork:
            self.ctx = multiprocessing.get_context("forkserver")
            self.ctx.set_forkserver_preload(PRELOAD)

    def warm(self) -> None:
        """Start the fork server (it imports PRELOAD) before anything is timed."""
        if self.ctx is not None:
            p = self.ctx.Process(target=_noop)
            p.start()
            p.join()

    def start(self, cache: Path, logs: Path, extra: tuple[str, ...] = ()) -> Build:
        argv = [str(MANIFEST), *OVERRIDES, *extra, "--json", "--cache-dir", str(cache)]
        return Build(argv, logs, self.fork, self.ctx)


# ---- the cache, checked independently of qbuild --------------------------------------------------


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_entry(stage: str, entry: Path) -> list[str]:
    """Problems of one published entry, re-digested from its bytes: a record that parses and whose seal
    matches, its key and stage, exactly the listed files under out/, each of the recorded size and sha256."""
    where = f"{stage}/{entry.name[:12]}"
    try:
        record = json.loads((entry / "record.json").read_text())
    except FileNotFoundError:
        return [f"{where}: partial entry (no record.json)"]
    except (OSError, ValueError) as exc:
        return [f"{where}: record.json unreadable ({type(exc).__name__})"]
    if not isinstance(record, dict) or not isinstance(record.get("files"), dict):
        return [f"{where}: record.json is not a record"]
    rest = {k: v for k, v in record.items() if k != "seal"}
    text = json.dumps(rest, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    problems = []
    if hashlib.sha256(text.encode("utf-8")).hexdigest() != record.get("seal"):
        problems.append(f"{where}: seal mismatch")
    if record.get("key") != entry.name or record.get("stage") != stage:
        problems.append(f"{where}: record names {record.get('stage')}/{record.get('key')}")
    out = entry / "out"
    present = {p.relative_to(out).as_posix() for p in out.rglob("*") if not p.is_dir()} if out.is_dir() else set()
    files: dict[str, Any] = record["files"]
    problems += [f"{where}: {rel} missing" for rel in sorted(set(files) - present)]
    problems += [f"{where}: {rel} not in the record" for rel in sorted(present - set(files))]
    for rel in sorted(set(files) & present):
        f = out / rel
        if f.stat().st_size != files[rel].get("size") or _sha256(f) != files[rel].get("sha256"):
            problems.append(f"{where}: {rel} does not match its recorded size and sha256")
    return problems


def check_cache(root: Path) -> list[str]:
    """Problems of every entry under ``objects/`` and of the JSON files qbuild writes atomically
    (``history/*.json``, ``compose/*.json``); staging and trash are work in progress, not entries."""
    problems: list[str] = []
    objects = root / "objects"
    for stage_dir in sorted(objects.iterdir()) if objects.is_dir() else []:
        if not stage_dir.is_dir():
            problems.append(f"objects/{stage_dir.name}: not a directory")
            continue
        for entry in sorted(stage_dir.iterdir()):
            problems += check_entry(stage_dir.name, entry)
    for part in ("history", "compose"):
        for f in sorted((root / part).glob("*.json")):
            try:
                json.loads(f.read_text())
            except (OSError, ValueError) as exc:
                problems.append(f"{part}/{f.name}: unreadable ({type(exc).__name__})")
    return problems


def cache_verify(root: Path) -> tuple[int, dict[str, Any]]:
    """``qbuild cache verify --json``: (exit status, its report; {} when it printed none)."""
    proc = subprocess.run([sys.executable, "-m", "qbuild", "cache", "verify", "--cache-dir", str(root), "--json"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    report = json.loads(lines[-1]) if lines else {"stderr": proc.stderr[-2000:]}
    return proc.returncode, report


def remove(path: Path) -> None:
    """Remove a cache (entries are read-only)."""
    if not path.exists():
        return
    for d in [path, *(p for p in path.rglob("*") if p.is_dir() and not p.is_symlink())]:
        os.chmod(d, 0o755)
    shutil.rmtree(path)


def tree_digests(path: Path) -> dict[str, str]:
    """rel -> sha256 of each file under ``path`` (or of ``path`` itself, as "."), from their bytes."""
    if path.is_file():
        return {".": _sha256(path)}
    return {p.relative_to(path).as_posix(): _sha256(p) for p in sorted(path.rglob("*")) if p.is_file()}


def compiled_digests(cache: Path, key: str) -> dict[str, str]:
    """rel -> sha256 of the compile entry's files, from their bytes."""
    return tree_digests(cache / "objects" / "compile" / key / "out")


# ---- the reference and the kills -----------------------------------------------------------------


@dataclass
class Reference:
    """One uninterrupted cold build: keys, stage durations, the times around them, compiled digests."""

    keys: dict[str, str]
    durations: dict[str, float]
    startup: float  # start to the first stage_started
    finish: float  # the last stage_built to the process's end
    total: float
    compiled: dict[str, str]
    timeline: list[tuple[float, str]] = field(default_factory=list)


def measure_reference(launcher: Launcher, work: Path) -> Reference:
    """Build once, cold and uninterrupted, recording each event's wall time as it arrives."""
    cache = work / "reference"
    remove(cache)
    b = launcher.start(cache, work / "logs" / "reference")
    b.wait_for(lambda e: "name" in e and "stages" in e, timeout=600)
    rc = b.wait(600)
    total = time.monotonic() - b.t0
    if rc != 0:
        raise RuntimeError(f"reference build failed ({rc}):\n{b.stderr()[-3000:]}")
    at: dict[tuple[str, str], float] = {}
    for e, t in zip(b.events, b.times, strict=True):
        if e.get("event") in ("stage_started", "stage_built"):
            at[(e["event"], e["stage"])] = t
    durations = {s: max(0.005, at[("stage_built", s)] - at[("stage_started", s)]) for s in STAGES}
    summary = b.events[-1]
    keys = {s["name"]: s["key"] for s in summary["stages"]}
    timeline = [(t, f"{e.get('event', 'summary')} {e.get('stage', '')}".strip()) for e, t in zip(b.events, b.times,
                                                                                                   strict=True)]
    return Reference(keys, durations, at[("stage_started", "load")], total - at[("stage_built", "verify")], total,
                     compiled_digests(cache, keys["compile"]), timeline)


def landed(events: list[dict[str, Any]]) -> str:
    """Where a build was when it died: the stage it had started and not finished; else startup (before
    any stage), finish (every stage done) or between (after one stage, before the next)."""
    open_stage, done = None, 0
    for e in events:
        kind = e.get("event")
        if kind == "stage_started":
            open_stage = e["stage"]
        elif kind in ("stage_built", "stage_cached", "stage_failed", "stage_pulled"):
            open_stage, done = None, done + 1
        elif kind is None and "stages" in e:
            return "finish"
    if open_stage:
        return open_stage
    return "startup" if done == 0 else "finish" if done == len(STAGES) else "between"


@dataclass
class Kill:
    """One kill and what was found after it."""

    loop: int
    target: str  # the stage aimed at, or "anytime"
    at: float  # seconds after the build started
    landed: str
    problems: list[str]  # the independent re-digest
    verify_rc: int
    verify: dict[str, Any]
    rebuild_rc: int
    rebuild_problem: str

    @property
    def corrupt(self) -> bool:
        return bool(self.problems) or self.verify_rc != 0 or bool(self.verify.get("damaged"))

    @property
    def rebuild_failed(self) -> bool:
        return bool(self.rebuild_problem)


def _todo(cache: Path, ref: Reference) -> list[str]:
    return [s for s in STAGES if not (cache / "objects" / s / ref.keys[s] / "record.json").exists()]


def _kill_once(b: Build, rng: random.Random, ref: Reference, todo: list[str], target: str) -> bool:
    """Kill ``b`` at a random moment of stage ``target`` or, for "anytime", of the whole expected run;
    whether the kill is what ended it."""
    if target == "anytime":
        b.sleep(rng.uniform(0, ref.startup + sum(ref.durations[s] for s in todo) + ref.finish))
    else:
        b.wait_for(lambda e: e.get("event") == "stage_started" and e.get("stage") == target)
        b.sleep(rng.uniform(0, ref.durations[target]))
    return b.kill() == -signal.SIGKILL


def _next_build(launcher: Launcher, cache: Path, logs: Path, ref: Reference) -> tuple[int, str]:
    """Build on ``cache`` to the end: (exit status, what is wrong, "" when it succeeded as the reference)."""
    b = launcher.start(cache, logs)
    rc = b.wait(600)
    if rc != 0:
        return rc, f"exit {rc}: {b.stderr()[-1500:]}"
    summary = b.events[-1] if b.events else {}
    keys = {s["name"]: s["key"] for s in summary.get("stages", [])}
    if keys != ref.keys:
        return rc, f"keys {keys} differ from the reference {ref.keys}"
    problems = check_cache(cache)
    if problems:
        return rc, f"after the next build: {problems}"
    if compiled_digests(cache, keys["compile"]) != ref.compiled:
        return rc, "compiled files differ from the reference build's"
    return rc, ""


def kill_loop(loop: int, kills: int, rng: random.Random, launcher: Launcher, ref: Reference, work: Path,
              report: Callable[[Kill], None], reset_p: float = RESET_P) -> list[Kill]:
    """Kill builds on one cache ``kills`` times; check the cache and the next build after each."""
    cache, nxt = work / f"loop{loop}" / "cache", work / f"loop{loop}" / "next"
    logs = work / "logs" / f"loop{loop}"
    results: list[Kill] = []
    attempts = 0
    while len(results) < kills:
        attempts += 1
        if attempts > 4 * kills + 20:
            raise RuntimeError(f"loop {loop}: only {len(results)} of {kills} kills in {attempts} attempts")
        target = "anytime" if rng.random() < ANYTIME_P else rng.choice(STAGES)
        todo = _todo(cache, ref)
        if not todo or (target != "anytime" and target not in todo):  # aim at a stage it will build
            remove(cache)
            todo = list(STAGES)
        b = launcher.start(cache, logs / f"{attempts}")
        killed = _kill_once(b, rng, ref, todo, target)
        if not killed:  # it finished first: the cache is complete and is emptied next time
            continue
        at, where = time.monotonic() - b.t0, landed(b.events)
        remove(nxt)
        if cache.exists():
            shutil.copytree(cache, nxt, symlinks=True)  # the state the kill left, for the next build
        problems = check_cache(cache)
        # a kill before the build made its cache directory leaves nothing to verify (and nothing corrupt)
        verify_rc, verify = cache_verify(cache) if cache.exists() else (0, {"no cache directory yet": True})
        rebuild_rc, rebuild_problem = _next_build(launcher, nxt, logs / f"{attempts}-next", ref)
        remove(nxt)
        k = Kill(loop, target, round(at, 3), where, problems, verify_rc, verify, rebuild_rc, rebuild_problem)
        results.append(k)
        report(k)
        if rng.random() < reset_p:
            remove(cache)
    return results


def torture(kills: int, seed: int, loops: int, launcher: Launcher, work: Path,
            report: Callable[[Kill], None] = lambda k: None) -> tuple[Reference, list[Kill]]:
    """Measure the reference, then run ``loops`` kill loops side by side on their own caches."""
    launcher.warm()
    ref = measure_reference(launcher, work)
    shares = [kills // loops + (i < kills % loops) for i in range(loops)]
    results: list[list[Kill]] = [[] for _ in range(loops)]
    errors: list[BaseException] = []
    lock = threading.Lock()

    def locked(k: Kill) -> None:
        with lock:
            report(k)

    def run(i: int) -> None:
        try:
            results[i] = kill_loop(i, shares[i], random.Random(f"{seed}/{i}"), launcher, ref, work, locked)
        except BaseException as exc:  # re-raised in the caller's thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(loops)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return ref, [k for r in results for k in r]


def summarise(kills: list[Kill], seconds: float) -> dict[str, Any]:
    """The figures of a run: kills, corrupt caches, failed next builds, kills per stage, seconds."""
    return {"kills": len(kills), "corrupt": sum(k.corrupt for k in kills),
            "failed_rebuilds": sum(k.rebuild_failed for k in kills),
            "by_stage": dict(sorted(Counter(k.landed for k in kills).items())), "seconds": round(seconds, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--loops", type=int, default=2, help="kill loops side by side, one cache each")
    ap.add_argument("--exec", action="store_true", help="run builds as `python -m qbuild` (slower)")
    ap.add_argument("--work", help="keep caches and logs here (default: a temporary directory)")
    args = ap.parse_args()
    launcher = Launcher(fork=not args.exec)
    t0 = time.monotonic()

    def progress(k: Kill) -> None:
        state = "CORRUPT " if k.corrupt else "FAILED NEXT BUILD " if k.rebuild_failed else ""
        print(f"  loop {k.loop} kill at {k.at:6.3f}s aimed at {k.target:<8} landed in {k.landed:<8} "
              f"{state}{'; '.join(k.problems)[:200]}{k.rebuild_problem[:300]}", flush=True)

    with tempfile.TemporaryDirectory(prefix="qbuild-torture-") as tmp:
        work = Path(args.work) if args.work else Path(tmp)
        print(format_facts(machine_facts()))
        print(f"torture: {args.kills} kills, seed {args.seed}, {args.loops} loops, "
              f"{'exec' if args.exec else 'fork'} builds", flush=True)
        ref, kills = torture(args.kills, args.seed, args.loops, launcher, work, progress)
        if not args.work:
            for i in range(args.loops):
                remove(work / f"loop{i}")
            remove(work / "reference")
    seconds = time.monotonic() - t0
    print(f"\nreference cold build: {ref.total:.2f}s (start-up {ref.startup:.2f}s, finish {ref.finish:.2f}s)")
    for s in STAGES:
        print(f"  {s:<8} {ref.durations[s]:6.3f}s")
    fig = summarise(kills, seconds)
    print(f"\n{'landed in':<10} {'kills':>6}")
    for where, n in fig["by_stage"].items():
        print(f"{where:<10} {n:>6}")
    print(f"corrupt caches: {fig['corrupt']}   failed next builds: {fig['failed_rebuilds']}   "
          f"{seconds:.1f}s ({seconds / max(1, len(kills)):.2f}s per kill)")
    print(json.dumps({"bench": "torture", **fig, "seed": args.seed, "loops": args.loops,
                      "mode": "exec" if args.exec else "fork", "reference_build_s": round(ref.total, 3),
                      "machine": machine_facts()}))
    if fig["corrupt"] or fig["failed_rebuilds"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
