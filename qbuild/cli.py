"""Command line: argument parsing and rendering only; each error class has its own exit code."""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from collections.abc import Sequence
from typing import Any

from qbuild.errors import EXIT_INTERRUPTED, QBuildError

EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, the status a shell reports for a writer whose reader left

COMMANDS = ("build", "plan", "run", "embed", "verify-bundle", "cache")

USAGE = """qbuild [build] MANIFEST [MANIFEST|DIR|GLOB ...] [KEY=VALUE ...] [--json] [--cache-dir DIR] [--cfg [job]]
                  [--cache on|off|readonly|redo|verify] [--out DIR]
       qbuild MANIFEST -m KEY=A,B [KEY2=[..],[..] ...] [--launcher joblib|basic|slurm|ray|...] [--jobs N]
                  [--sweep-dir DIR] [--measure] [--sweeper optuna --objective FIGURE --trials N]
       qbuild plan MANIFEST [KEY=VALUE ...] [--json] [--cache-dir DIR]
       qbuild run MANIFEST [KEY=VALUE ...] --prompt TEXT [--prompt TEXT ...] [--max-new-tokens N] [--json]
                  [--adapter NAME ...] [--image PATH ...]
       qbuild embed MANIFEST [KEY=VALUE ...] --text TEXT [--text ...] [--file FILE] [--json]
       qbuild verify-bundle DIR [--json]
       qbuild cache ls|du|verify|gc|rm ... (qbuild cache --help)"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qbuild", usage=USAGE,
                                description="Declarative, incremental builds of transformers for "
                                            "Cloud AI 100 and ONNX Runtime.")
    p.add_argument("manifest", nargs="?", help="manifest file (.yaml, .yml or .toml), in any directory; a build "
                                               "or plan also takes several, a directory or a glob")
    p.add_argument("--version", action="version", version=f"qbuild {_version()}")
    p.add_argument("overrides", nargs="*", help="Hydra overrides: compile.onnxruntime.threads=8 model=tiny-llama")
    p.add_argument("--json", action="store_true", help="JSON-lines events and a final summary object")
    p.add_argument("--cache-dir", help="cache directory (default $QBUILD_CACHE or ./cache)")
    p.add_argument("--cache", default="on", choices=["on", "off", "readonly", "redo", "verify"],
                   help="build: on (default); readonly: fail on the first stage not cached; redo: rebuild "
                        "everything and fail if an output differs from the cached one; verify: re-digest "
                        "every cached file used; off: a throwaway cache")
    p.add_argument("--ignore-memory", action="store_true",
                   help="build even when the estimated peak memory of the export and compile exceeds what is available")
    p.add_argument("--out", help="build: write each manifest's artifacts and provenance.json to OUT/<name>/")
    p.add_argument("--remote", help="remote cache shared by several caches: a directory or an fsspec URL such as "
                                    "s3://bucket/prefix (default: cache.remote, then $QBUILD_REMOTE); missing "
                                    "entries are pulled from it (digests checked), builds pushed to it")
    p.add_argument("--cfg", nargs="?", const="job", choices=["job"],
                   help="print the full resolved configuration (schema defaults included; JSON with --json) "
                        "and exit")
    p.add_argument("--explain", action="store_true", help="plan: print the exact compiler command / configuration")
    p.add_argument("-m", "--multirun", action="store_true",
                   help="sweep: Hydra's sweeper over the overrides, one build per combination")
    p.add_argument("--launcher", default="joblib", help="sweep: Hydra launcher (joblib: parallel processes here; "
                                                        "basic: one after another; slurm, submitit_local, ray)")
    p.add_argument("--sweeper", default="basic", help="sweep: Hydra sweeper (basic: every combination; optuna: "
                                                      "optimise --objective over --trials jobs)")
    p.add_argument("--objective", help="sweep: the figure each job reports and the sweep ranks (decode_tok_s, "
                                       "embed_per_s, compile_s, artifact_bytes, seconds)")
    p.add_argument("--trials", type=int, help="sweep: jobs the optuna sweeper runs (default 20)")
    p.add_argument("--jobs", type=int, help="sweep: parallel jobs of the joblib launcher (default min(4, CPUs))")
    p.add_argument("--sweep-dir", help="sweep: where Hydra's per-job directories and the tables go "
                                       "(default <cache>/sweeps/<time>-<manifest>)")
    p.add_argument("--fail-fast", action="store_true", help="sweep: stop at the first failed job")
    p.add_argument("--measure", action="store_true",
                   help="sweep: time a short fixed decode / embed on each artifact (tokens/s, embeddings/s)")
    p.add_argument("--prompt", action="append", default=[], help="run: a prompt (repeat for a batch)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="run: tokens to generate per prompt")
    p.add_argument("--adapter", action="append", default=[],
                   help="run: the LoRA adapter of model.adapters for each --prompt (one per prompt, or one for all; "
                        "base: the base model)")
    p.add_argument("--image", action="append", default=[],
                   help="run: a PNG/JPEG for the --prompt at the same place (image-text-to-text models; repeat for a "
                        "batch; '' for a prompt without an image)")
    p.add_argument("--text", action="append", default=[], help="embed: a text to embed (repeatable)")
    p.add_argument("--file", action="append", default=[],
                   help="embed: a file with one text per line (blank lines skipped); - reads standard input")
    p.epilog = ("commands: build (the default), plan, run, embed, verify-bundle DIR, cache {ls,du,verify,gc,rm} "
                "(qbuild cache --help). Exit codes: README.md, 'Exit codes'.")
    return p


def _version() -> str:
    from qbuild import __version__

    return __version__


#: options that only some commands take (dest -> commands); giving one elsewhere is an error, not ignored
_ONLY = {"prompt": ("run",), "image": ("run",), "max_new_tokens": ("run",), "adapter": ("run",),
         "text": ("embed",), "file": ("embed",), "explain": ("plan",), "out": ("build",), "cache": ("build",)}
#: options of a sweep (-m) only
_SWEEP_ONLY = ("launcher", "sweeper", "objective", "trials", "jobs", "sweep_dir", "fail_fast", "measure")


def _check_options(ns: argparse.Namespace, command: str, given: set[str]) -> None:
    """Refuse an option the command would ignore, and Hydra's own settings outside a sweep."""
    from qbuild.errors import ManifestError

    for dest, commands in _ONLY.items():
        if dest in given and command not in commands:
            raise ManifestError(f"--{dest.replace('_', '-')} is an option of qbuild {' / '.join(commands)}, "
                                f"not of qbuild {command}")
    if not ns.multirun:
        for dest in _SWEEP_ONLY:
            if dest in given:
                raise ManifestError(f"--{dest.replace('_', '-')} is an option of a sweep (qbuild MANIFEST -m ...)")
        for o in ns.overrides:
            key = o.lstrip("+~").split("=", 1)[0]
            if key == "hydra" or key.startswith(("hydra.", "hydra/")):
                raise ManifestError(f"{key}: Hydra's own settings do nothing in a build (qbuild keeps the working "
                                    "directory and writes only to the cache); they configure a sweep (-m)",
                                    key=key)


def _given(parser: argparse.ArgumentParser, ns: argparse.Namespace) -> set[str]:
    """The options whose value differs from their default (what the user gave)."""
    return {a.dest for a in parser._actions
            if a.dest not in ("help", "version", "manifest", "overrides") and getattr(ns, a.dest, None) != a.default}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``qbuild`` console script."""
    args = list(sys.argv[1:] if argv is None else argv)
    command = args.pop(0) if args and args[0] in COMMANDS else "build"
    if command == "cache":
        from qbuild.cache_cli import main as cache_main

        return cache_main(args)
    if command == "verify-bundle":
        return _verify_bundle(args)
    parser = _parser()
    ns = parser.parse_intermixed_args(args)
    if ns.manifest is None:
        parser.print_usage(sys.stderr)
        print("qbuild: error: name a manifest, e.g. qbuild manifests/tiny-llama.yaml (qbuild --help for more)",
              file=sys.stderr)
        return 2
    from qbuild.ci import is_manifest_arg

    ns.manifests = [ns.manifest, *(a for a in ns.overrides if is_manifest_arg(a))]
    ns.overrides = [a for a in ns.overrides if not is_manifest_arg(a)]
    if ns.ignore_memory:
        os.environ["QBUILD_IGNORE_MEMORY"] = "1"
    try:
        _check_options(ns, command, _given(parser, ns))
        several = len(ns.manifests) > 1 or any(c in ns.manifest for c in "*?[") or os.path.isdir(ns.manifest)
        if several and (command not in ("build", "plan") or ns.multirun or ns.cfg):
            from qbuild.errors import ManifestError

            raise ManifestError(f"qbuild {'-m' if ns.multirun else '--cfg' if ns.cfg else command} takes one "
                                f"manifest; got {' '.join(ns.manifests)}")
        if command != "build" and (ns.out or ns.cache != "on"):
            from qbuild.errors import ManifestError

            raise ManifestError(f"--out and --cache are options of a build, not of qbuild {command}")
        if command == "plan" and several:
            return _plan_many(ns)
        if command == "build" and (several or ns.out or ns.cache != "on"):
            return _build_many(ns)
        if ns.cfg:
            return _print_cfg(ns)
        if ns.multirun and command != "build":
            from qbuild.errors import ManifestError

            raise ManifestError(f"-m/--multirun sweeps builds; qbuild {command} takes one configuration")
        if ns.multirun:
            return _sweep(ns)
        return {"plan": _plan, "run": _run, "embed": _embed}.get(command, _build)(ns)
    except QBuildError as exc:
        return _fail(exc, ns.json)
    except KeyboardInterrupt:
        print("qbuild: interrupted; nothing partial was published", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # the reader went away (qbuild ... | head): end quietly, as other tools do
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_BROKEN_PIPE


def _fail(exc: QBuildError, as_json: bool, prog: str = "qbuild") -> int:
    """Print a known error as one message (JSON too with ``--json``); its exit code."""
    if os.environ.get("QBUILD_FULL_ERROR") == "1":
        traceback.print_exception(exc)
    if as_json:
        print(json.dumps({"event": "error", "error": type(exc).__name__, "message": str(exc),
                          "exit_code": exc.exit_code}))
    print(f"{prog}: error: {exc}", file=sys.stderr)
    return exc.exit_code


def _print_cfg(ns: argparse.Namespace) -> int:
    """The full configuration a build would use: the composed manifest with every schema default filled in."""
    import dataclasses

    from qbuild.manifest import compose, to_yaml

    full = _plain(dataclasses.asdict(compose(ns.manifest, ns.overrides).manifest))
    print(json.dumps(full, sort_keys=True) if ns.json else to_yaml(full), end="\n" if ns.json else "")
    return 0


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _plan(ns: argparse.Namespace) -> int:
    from qbuild.api import plan

    p = plan(ns.manifest, ns.overrides, cache_dir=ns.cache_dir, remote=ns.remote)
    rows = [{"name": s.name, "key": s.key, "state": s.state, "reasons": s.reasons} for s in p.stages]
    explain = _explain(p) if ns.explain else []
    if ns.json:
        print(json.dumps({"name": p.composed.name, "notes": p.notes, "stages": rows,
                          **({"explain": explain} if ns.explain else {})}))
        return 0
    from qbuild.execute.reporter import printable

    print(f"qbuild plan: {printable(p.composed.name)} ({printable(str(p.composed.source))})")
    for note in p.notes:
        print(f"  {note}")
    for r in rows:
        reasons = "; ".join(r["reasons"])
        print(f"  {r['name']:<10} {r['state']:<7} {r['key'][:12]}  {reasons}".rstrip())
    for line in explain:
        print(f"  {line}")
    return 0


def _explain(p: Any) -> list[str]:
    """Each stage's settings, printed from the params its run() gets; the compile stage's exact command
    (qaic: with the cached export's path when there is one)."""
    export = p.stage("export")
    lines: list[str] = []
    for s in p.stages:
        if s.name == "compile":
            onnx = export.entry.out / export.entry.meta["onnx"] if export.entry is not None else None
            lines += s.stage.backend.describe(s.resolved.params, onnx)
        else:
            lines += s.stage.describe(s.resolved.params)
    return lines


def _build(ns: argparse.Namespace) -> int:
    from qbuild.api import build
    from qbuild.execute.reporter import ConsoleReporter, JsonReporter

    reporter: Any = JsonReporter() if ns.json else ConsoleReporter()
    result = build(ns.manifest, ns.overrides, cache_dir=ns.cache_dir, reporter=reporter, remote=ns.remote)
    if ns.json:
        print(json.dumps(result.summary()))
    return 0


def _build_many(ns: argparse.Namespace) -> int:
    from qbuild.ci import build_many, expand_manifests
    from qbuild.execute.reporter import ConsoleReporter, JsonReporter

    manifests = expand_manifests(ns.manifests)
    reporter: Any = JsonReporter() if ns.json else ConsoleReporter()
    builds = build_many(manifests, ns.overrides, cache_dir=ns.cache_dir, cache=ns.cache, out=ns.out,
                        reporter=reporter, remote=ns.remote)
    if ns.json:
        summaries = [b.summary() for b in builds]
        print(json.dumps(summaries if len(ns.manifests) > 1 or len(builds) > 1 else summaries[0]))
        return 0
    if len(builds) > 1:
        print(f"qbuild: {len(builds)} manifests")
        for b in builds:
            states = [s["state"] for s in b.result.stages]
            counts = ", ".join(f"{states.count(x)} {x}" for x in ("built", "pulled", "redone", "cached")
                               if states.count(x))
            print(f"  {b.name:<24} {counts}, {b.result.seconds:.2f}s" + (f"  -> {b.bundle}" if b.bundle else ""))
    elif builds and builds[0].bundle:
        print(f"  bundle     {builds[0].bundle}")
    return 0


def _plan_many(ns: argparse.Namespace) -> int:
    from qbuild.ci import expand_manifests

    status = 0
    rows = []
    for path in expand_manifests(ns.manifests):
        sub = argparse.Namespace(**{**vars(ns), "manifest": str(path)})
        if ns.json:
            from qbuild.api import plan

            p = plan(str(path), ns.overrides, cache_dir=ns.cache_dir, remote=ns.remote)
            rows.append({"name": p.composed.name, "manifest": str(path), "notes": p.notes,
                         "stages": [{"name": s.name, "key": s.key, "state": s.state, "reasons": s.reasons}
                                    for s in p.stages]})
        else:
            status = max(status, _plan(sub))
    if ns.json:
        print(json.dumps(rows))
    return status


def _verify_bundle(args: list[str]) -> int:
    from qbuild.bundle import verify_bundle

    p = argparse.ArgumentParser(prog="qbuild verify-bundle",
                                description="Re-digest a bundle written by --out against its provenance.json.")
    p.add_argument("directory", help="a bundle (OUT/<name>) or a directory of bundles (OUT)")
    p.add_argument("--json", action="store_true")
    ns = p.parse_args(args)
    try:
        reports = verify_bundle(ns.directory)
    except QBuildError as exc:
        return _fail(exc, ns.json)
    if ns.json:
        print(json.dumps({"bundles": reports}))
    else:
        for r in reports:
            print(f"qbuild verify-bundle: {r['bundle']}: {r['files']} files match provenance.json")
    return 0


def _sweep(ns: argparse.Namespace) -> int:
    from qbuild.store import default_cache_dir
    from qbuild.sweep import render, sweep

    result = sweep(ns.manifest, ns.overrides, cache_dir=ns.cache_dir or default_cache_dir(),
                   sweep_dir=ns.sweep_dir, launcher=ns.launcher, jobs=ns.jobs, fail_fast=ns.fail_fast,
                   measure=ns.measure, sweeper=ns.sweeper, objective=ns.objective, trials=ns.trials,
                   remote=ns.remote)
    if ns.json:
        print(json.dumps(result.summary()))
    else:
        print(f"qbuild sweep: {len(result.rows)} jobs, {len(result.failed)} failed, {result.seconds:.2f}s "
              f"({result.sweep_dir})")
        print(render(result))
        print(f"  table: {result.sweep_dir / 'results.csv'}")
    return 1 if result.failed else 0


def _run(ns: argparse.Namespace) -> int:
    from qbuild.api import run
    from qbuild.errors import RunError
    from qbuild.execute.reporter import ConsoleReporter, JsonReporter

    if not ns.prompt:
        raise RunError("qbuild run needs at least one --prompt TEXT")
    if ns.max_new_tokens < 1:
        raise RunError(f"--max-new-tokens must be >= 1, got {ns.max_new_tokens}")
    reporter: Any = JsonReporter(sys.stderr) if ns.json else ConsoleReporter(sys.stderr)
    stream = len(ns.prompt) == 1 and not ns.json
    started: list[bool] = []

    def on_text(_row: int, text: str) -> None:  # the prompt, then each piece of text as it is generated
        if not started:
            started.append(True)
            print(ns.prompt[0], end="")
        print(text, end="", flush=True)

    result = run(ns.manifest, ns.overrides, prompts=ns.prompt, max_new_tokens=ns.max_new_tokens,
                 cache_dir=ns.cache_dir, reporter=reporter, on_text=on_text if stream else None, remote=ns.remote,
                 adapters=ns.adapter, images=ns.image)
    if ns.json:
        print(json.dumps(result.to_json()))
    elif stream:
        print()
    else:
        for prompt, text in zip(result.prompts, result.texts, strict=True):
            print(f"{prompt}{text}")
    return 0


def _embed_texts(ns: argparse.Namespace) -> list[str]:
    from qbuild.errors import RunError

    texts = list(ns.text)
    for name in ns.file:
        try:
            lines = sys.stdin.read() if name == "-" else open(name, encoding="utf-8").read()  # noqa: SIM115
        except OSError as exc:
            raise RunError(f"--file: cannot read {name}: {exc.strerror}") from exc
        texts += [ln for ln in lines.splitlines() if ln.strip()]
    if not texts:
        raise RunError("qbuild embed: no texts; give --text TEXT (repeatable) or --file FILE")
    return texts


def _progress_bar(done: int, total: int) -> None:
    """Texts embedded so far, on standard error (a bar on a terminal, a final line otherwise)."""
    if sys.stderr.isatty():
        filled = int(30 * done / total)
        sys.stderr.write(f"\r  embed      [{'#' * filled}{'.' * (30 - filled)}] {done}/{total} texts")
        if done == total:
            sys.stderr.write("\n")
        sys.stderr.flush()
    elif done == total:
        print(f"  embed      {total} texts", file=sys.stderr)


def _embed(ns: argparse.Namespace) -> int:
    from qbuild.api import embed
    from qbuild.execute.reporter import ConsoleReporter, JsonReporter

    texts = _embed_texts(ns)
    # stdout carries only the embeddings: build events go to standard error
    reporter: Any = JsonReporter(sys.stderr) if ns.json else ConsoleReporter(sys.stderr)
    result = embed(ns.manifest, texts, ns.overrides, cache_dir=ns.cache_dir, reporter=reporter,
                   progress=_progress_bar if len(texts) > 1 else None, remote=ns.remote)
    summary = result.summary()
    if ns.json:
        print(json.dumps(summary))
        return 0
    p = summary["pooling"]
    print(f"qbuild embed: {summary['name']}: {len(texts)} texts, dim {summary['dim']}, {p.get('method')} pooling"
          f"{', L2-normalised' if p.get('normalize') else ''}, {summary['seconds']:.3f}s")
    for text, vector in zip(texts, summary["embeddings"], strict=True):
        print(text)
        print("  " + json.dumps(vector))
    return 0
