"""Sweeps: ``qbuild MANIFEST -m KEY=A,B KEY2=[..],[..]`` through Hydra's own sweeper and a Hydra launcher.

Hydra expands the overrides (its grammar: ``a,b``, ``range()``, ``choice()``, globs; any sweeper plugin)
and hands one job per combination to the launcher (``joblib`` processes on this machine by default,
``basic`` in-process, ``slurm`` / ``submitit_local`` through submitit, ``ray`` on a Ray cluster; the
``slurm`` and ``ray`` launchers are qbuild's shipped configs ``conf/hydra/launcher/qbuild_*.yaml``). Any
sweeper plugin works in place of Hydra's basic one (``--sweeper optuna --objective decode_tok_s``: each
job then reports that figure as its objective and Optuna picks the next configurations). Every job is an
ordinary qbuild build of its composed manifest, with the same cache, keys and locks, so stages shared by
the jobs (load, export) are built once. Each job writes its row to ``<sweep dir>/<job num>/qbuild.json``;
the parent collects the rows into one table (also ``results.csv`` and ``results.json``). Hydra's per-job
directories live under the sweep directory (default ``<cache>/sweeps/``); the working directory does
not change and gets no ``outputs/`` or ``multirun/`` folder.
"""

from __future__ import annotations

import csv
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qbuild.errors import ManifestError, QBuildError

ROW_FILE = "qbuild.json"
STOP_FILE = "STOP"
#: launcher names -> the Hydra launcher option (the plugin must be installed)
LAUNCHERS = {"joblib": "joblib", "basic": "basic", "slurm": "qbuild_slurm", "submitit_slurm": "submitit_slurm",
             "submitit_local": "submitit_local", "ray": "qbuild_ray"}
#: plugins that are optional extras: launcher or sweeper name -> (its module, the extra that installs it)
PLUGINS = {"slurm": ("hydra_plugins.hydra_submitit_launcher", "slurm"),
           "submitit_slurm": ("hydra_plugins.hydra_submitit_launcher", "slurm"),
           "submitit_local": ("hydra_plugins.hydra_submitit_launcher", "slurm"),
           "ray": ("hydra_plugins.hydra_ray_launcher", "ray"),
           "optuna": ("hydra_plugins.hydra_optuna_sweeper", "optuna")}
SWEEPERS = ("basic", "optuna")
#: what a job can report as its objective, and which way is better; the first two are measured by
#: running the artifact (the fixed workload of --measure), the others come from the build
OBJECTIVES = {"decode_tok_s": "maximize", "embed_per_s": "maximize", "compile_s": "minimize",
              "artifact_bytes": "minimize", "seconds": "minimize"}
MEASURED = ("decode_tok_s", "embed_per_s")


@dataclass
class SweepResult:
    """One row per job, in job order; where the per-job directories and the table files are."""

    sweep_dir: Path
    rows: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    objective: str | None = None

    @property
    def best(self) -> dict[str, Any] | None:
        """The ok row with the best objective value (None without an objective or a value)."""
        if not self.objective:
            return None
        scored = [r for r in self.rows if r["status"] == "ok" and r.get("objective") is not None]
        if not scored:
            return None
        pick = max if OBJECTIVES[self.objective] == "maximize" else min
        return pick(scored, key=lambda r: r["objective"])

    @property
    def failed(self) -> list[dict[str, Any]]:
        return [r for r in self.rows if r["status"] != "ok"]

    def summary(self) -> dict[str, Any]:
        out = {"sweep_dir": str(self.sweep_dir), "jobs": len(self.rows), "failed": len(self.failed),
               "seconds": round(self.seconds, 3), "rows": self.rows}
        if self.objective:
            best = self.best
            out["objective"] = {"name": self.objective, "direction": OBJECTIVES[self.objective],
                                "best_job": best["job"] if best else None,
                                "best_value": best["objective"] if best else None,
                                "best_overrides": best["overrides"] if best else None}
        return out


class _Job:
    """The task function Hydra's launcher runs once per job (picklable: launchers ship it to workers)."""

    def __init__(self, manifest: str, cache_dir: str, fail_fast: bool, objective: str | None = None,
                 remote: str | None = None) -> None:
        self.manifest, self.cache_dir, self.fail_fast = manifest, cache_dir, fail_fast
        self.objective, self.remote = objective, remote

    def __call__(self, _cfg: Any) -> dict[str, Any] | float | None:
        from hydra.core.hydra_config import HydraConfig

        hc = HydraConfig.get()
        overrides = [str(o) for o in hc.overrides.task]
        stop = Path(hc.sweep.dir) / STOP_FILE  # written by a failed job under --fail-fast
        if self.fail_fast and stop.exists():
            row = {"job": int(hc.job.num), "overrides": _shown(overrides), "status": "skipped", "seconds": 0.0,
                   "error_class": "", "error": f"not run: {stop.read_text(encoding='utf-8').strip()}"}
        else:
            row = run_job(self.manifest, overrides, self.cache_dir, job=int(hc.job.num), remote=self.remote)
            if self.fail_fast and row["status"] != "ok":
                stop.write_text(f"job {row['job']} failed (--fail-fast)\n", encoding="utf-8")
            if self.objective and row["status"] == "ok":
                row["objective"] = _objective(row, self.objective, self.manifest, overrides, self.cache_dir)
        out = Path(hc.runtime.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / ROW_FILE).write_text(json.dumps(row, indent=1) + "\n", encoding="utf-8")
        # a sweeper that optimises (Optuna) reads the job's return value: the objective, None for a failure
        return row.get("objective") if self.objective else row


def _objective(row: dict[str, Any], name: str, manifest: str, overrides: list[str], cache_dir: str) -> float | None:
    """The job's value of the objective ``name`` (measured inside the job for a runtime figure)."""
    if name in MEASURED:
        row["measure"] = measure_job(manifest, _shown(overrides), cache_dir)
        return row["measure"]["value"] if row["measure"].get("figure") == name else None
    value = row.get(name)
    return None if value is None else float(value)


def _shown(overrides: list[str]) -> list[str]:
    return [o[2:] if o.startswith("++") else o for o in overrides]


def run_job(manifest: str, overrides: list[str], cache_dir: str, job: int = 0,
            remote: str | None = None) -> dict[str, Any]:
    """Build one job's manifest; its row for the table (a failure is a row, not an exception)."""
    from qbuild.api import build
    from qbuild.execute.reporter import Reporter

    row: dict[str, Any] = {"job": job, "overrides": _shown(overrides), "status": "ok", "pid": os.getpid()}
    t0 = time.monotonic()
    try:
        result = build(manifest, overrides, cache_dir=cache_dir, reporter=Reporter(), remote=remote)
    except QBuildError as exc:
        row.update(status="failed", error_class=type(exc).__name__, error=exc.message)
    else:
        states = {s["name"]: s["state"] for s in result.stages}
        compiled = Path(result.artifacts.get("compiled", ""))
        row.update(stages=states, keys={s["name"]: s["key"][:12] for s in result.stages},
                   compile_s=next((s["seconds"] for s in result.stages if s["name"] == "compile"), None),
                   artifact_bytes=_size(compiled) if compiled.is_dir() else None,
                   verify="passed" if "verify" in states else "skipped")
    row["seconds"] = round(time.monotonic() - t0, 3)
    return row


def _size(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


def sweep(manifest: str | os.PathLike[str], overrides: list[str], *, cache_dir: str | os.PathLike[str],
          sweep_dir: str | os.PathLike[str] | None = None, launcher: str = "joblib", jobs: int | None = None,
          fail_fast: bool = False, measure: bool = False, sweeper: str = "basic", objective: str | None = None,
          trials: int | None = None, remote: str | None = None) -> SweepResult:
    """Run Hydra's sweeper over ``overrides`` and build every job; return the rows. ``measure``: then time a
    short fixed decode (KV causal LMs) or embed (embedding models) on each built artifact, one job after
    another in this process, so no measurement competes with another job for the CPU. ``objective``: each
    job reports that figure (``OBJECTIVES``; a runtime figure is measured inside the job) and the result
    names the best job; the ``optuna`` sweeper optimises it over ``trials`` jobs."""
    from qbuild.manifest.compose import _resolve

    path = _resolve(manifest)
    cache = Path(cache_dir).absolute()
    if launcher not in LAUNCHERS:
        raise ManifestError(f"--launcher: unknown launcher {launcher!r}; known: {', '.join(LAUNCHERS)}")
    if sweeper not in SWEEPERS:
        raise ManifestError(f"--sweeper: unknown sweeper {sweeper!r}; known: {', '.join(SWEEPERS)}")
    if objective is not None and objective not in OBJECTIVES:
        raise ManifestError(f"--objective: unknown figure {objective!r}; known: {', '.join(OBJECTIVES)}")
    if sweeper == "optuna" and objective is None:
        raise ManifestError("--sweeper optuna needs --objective FIGURE (what to optimise: "
                            f"{', '.join(OBJECTIVES)})")
    if trials is not None and (sweeper != "optuna" or trials < 1):
        raise ManifestError("--trials N (N >= 1) is the number of jobs the optuna sweeper runs")
    for name in (launcher, sweeper):
        _require_plugin(name)
    stamp = time.strftime("%Y%m%d-%H%M%S") + f"-{os.getpid()}"
    out = Path(sweep_dir).absolute() if sweep_dir else cache / "sweeps" / f"{stamp}-{path.stem}"
    hydra_args = [f"hydra.sweep.dir={out}", "hydra.sweep.subdir=${hydra.job.num}", "hydra.job.chdir=False",
                  "hydra/job_logging=disabled", "hydra/hydra_logging=disabled",
                  f"hydra/launcher={LAUNCHERS[launcher]}"]
    if launcher == "joblib":
        hydra_args.append(f"hydra.launcher.n_jobs={jobs or min(4, os.cpu_count() or 1)}")
    if sweeper == "optuna":
        assert objective is not None
        # a measured objective is timed inside the job: one trial at a time unless --jobs says otherwise
        hydra_args += ["hydra/sweeper=optuna", f"hydra.sweeper.direction={OBJECTIVES[objective]}",
                       f"hydra.sweeper.n_jobs={jobs or (1 if objective in MEASURED else 2)}",
                       f"hydra.sweeper.max_failure_rate={0.0 if fail_fast else 1.0}",
                       "hydra.sweeper.sampler.seed=0"]
        if trials is not None:
            hydra_args.append(f"hydra.sweeper.n_trials={trials}")
    t0 = time.monotonic()
    job = _Job(str(path), str(cache), fail_fast, objective, None if remote is None else str(remote))
    _multirun(path, _sweep_overrides(overrides) + hydra_args, job)
    result = SweepResult(out, collect(out), time.monotonic() - t0, objective)
    if measure:
        for row in result.rows:
            if row["status"] == "ok" and "measure" not in row:
                row["measure"] = measure_job(str(path), row["overrides"], str(cache))
    write_tables(result)
    return result


#: the fixed workload --measure runs on every artifact (the same for every job of a sweep)
MEASURE_PROMPTS = ("My name is", "The quick brown fox jumps over the lazy dog and")
MEASURE_NEW_TOKENS = 32
MEASURE_TEXTS = tuple(f"sentence {i}: compile transformers for Cloud AI 100 and measure them" for i in range(64))


def measure_job(manifest: str, overrides: list[str], cache_dir: str) -> dict[str, Any]:
    """``{"figure", "value"}`` of a short fixed run on the job's (cached) artifact, or why there is none."""
    from qbuild import api
    from qbuild.execute.reporter import Reporter
    from qbuild.manifest import compose
    from qbuild.tasks import task_name

    try:
        name = task_name(compose(manifest, overrides).manifest)
        if name == "causal_lm_kv":
            r = api.run(manifest, overrides, prompts=list(MEASURE_PROMPTS), max_new_tokens=MEASURE_NEW_TOKENS,
                        cache_dir=cache_dir, reporter=Reporter())
            return {"figure": "decode_tok_s", "value": r.stats["decode_tok_s"]}
        if name == "embedding":
            e = api.embed(manifest, list(MEASURE_TEXTS), overrides, cache_dir=cache_dir, reporter=Reporter())
            return {"figure": "embed_per_s", "value": round(len(MEASURE_TEXTS) / e.seconds, 2)}
        return {"skipped": f"no measurement for task {name}"}
    except QBuildError as exc:
        return {"skipped": f"{type(exc).__name__}: {exc.message}"}


def _require_plugin(name: str) -> None:
    """A clear error (not Hydra's "Could not load") when an optional launcher or sweeper is missing."""
    if name not in PLUGINS:
        return
    import importlib.util

    module, extra = PLUGINS[name]
    if importlib.util.find_spec(module) is None:
        raise ManifestError(f"{name}: the Hydra plugin {module.rsplit('.', 1)[-1]} is not installed; "
                            f"pip install 'qbuild[{extra}]'")


def _sweep_overrides(overrides: list[str]) -> list[str]:
    """Plain ``key=a,b`` -> ``++key=a,b`` for manifest keys (so keys the manifest leaves to the schema's
    defaults sweep too); group choices (``model=a,b``) and Hydra's own keys stay as they are."""
    from qbuild.manifest.compose import _schema_groups

    groups = _schema_groups()
    out = []
    for text in overrides:
        key = text.split("=", 1)[0]
        plain = "=" in text and not key.startswith(("+", "~", "hydra.", "hydra/")) and "/" not in key
        out.append("++" + text if plain and key not in groups else text)
    return out


def _multirun(path: Path, overrides: list[str], task: _Job) -> None:
    from hydra._internal.hydra import Hydra
    from hydra._internal.utils import create_config_search_path
    from hydra.core.config_store import ConfigStore
    from hydra.core.global_hydra import GlobalHydra

    from qbuild.manifest.compose import SHIPPED_CONF, _plugin_active, _read_data, _translate

    config_name = path.stem
    data = _read_data(path) if path.suffix != ".yaml" else None
    if data is not None:  # TOML / .yml: the primary config from the ConfigStore, as compose() does
        config_name = f"__qbuild_sweep_{os.getpid()}__"
        ConfigStore.instance().store(name=config_name, node=data)
    if not _plugin_active():
        overrides = [*overrides, f"hydra.searchpath=[{SHIPPED_CONF}]"]
    # no compose lock here: with the basic launcher the jobs compose in this process, inside this Hydra app
    GlobalHydra.instance().clear()
    try:
        hydra = Hydra.create_main_hydra2("qbuild", create_config_search_path(str(path.parent)))
        try:
            hydra.multirun(config_name=config_name, task_function=task, overrides=overrides)
        except QBuildError:
            raise
        except Exception as e:
            if type(e).__module__.startswith(("hydra", "omegaconf")):
                raise _translate(e, path, hydra.config_loader) from None
            raise
    finally:
        GlobalHydra.instance().clear()
        if data is not None:
            ConfigStore.instance().repo.pop(f"{config_name}.yaml", None)


def collect(sweep_dir: Path) -> list[dict[str, Any]]:
    """The rows the jobs wrote, in job order."""
    rows = []
    for f in sweep_dir.glob(f"*/{ROW_FILE}"):
        try:
            rows.append(json.loads(f.read_text(encoding="utf-8")))
        except (OSError, ValueError):
            continue
    return sorted(rows, key=lambda r: r["job"])


COLUMNS = ("job", "overrides", "status", "load", "export", "compile", "verify", "compile_s", "artifact_bytes",
           "seconds", "measure", "objective", "error")


def _columns(rows: list[dict[str, Any]]) -> list[str]:
    """COLUMNS, less ``objective`` when no job reported one."""
    return [c for c in COLUMNS if c != "objective" or any("objective" in r for r in rows)]


def table_rows(rows: list[dict[str, Any]]) -> list[dict[str, str]]:
    out = []
    for r in rows:
        stages = r.get("stages", {})
        cells = {"job": str(r["job"]), "overrides": " ".join(r["overrides"]), "status": r["status"],
                 **{s: stages.get(s, "-") for s in ("load", "export", "compile", "verify")},
                 "compile_s": "" if r.get("compile_s") is None else f"{r['compile_s']:.2f}",
                 "artifact_bytes": "" if r.get("artifact_bytes") is None else str(r["artifact_bytes"]),
                 "seconds": f"{r['seconds']:.2f}", "measure": _measure_cell(r.get("measure")),
                 "objective": "" if r.get("objective") is None else f"{r['objective']:g}",
                 "error": f"{r['error_class']}: {r['error']}" if r["status"] != "ok" else ""}
        out.append(cells)
    return out


def _measure_cell(m: dict[str, Any] | None) -> str:
    if not m:
        return ""
    return f"{m['value']} {m['figure']}" if "value" in m else "-"


def render(result: SweepResult) -> str:
    """The table as aligned text."""
    rows, columns = table_rows(result.rows), _columns(result.rows)
    widths = {c: max([len(c), *(len(r[c]) for r in rows)]) for c in columns}
    lines = ["  ".join(c.ljust(widths[c]) for c in columns).rstrip()]
    lines += ["  ".join(r[c].ljust(widths[c]) for c in columns).rstrip() for r in rows]
    best = result.best
    if result.objective:
        lines.append(f"best {result.objective} ({OBJECTIVES[result.objective]}): "
                     + (f"job {best['job']} = {best['objective']:g} ({' '.join(best['overrides'])})" if best
                        else "none (no job reported a value)"))
    return "\n".join(lines)


def write_chart(result: SweepResult) -> Path | None:
    """``results.png``: the measured figure per job, labelled by its swept values (needs matplotlib:
    ``pip install 'qbuild[plot]'``); None when nothing was measured or matplotlib is absent."""
    measured = [r for r in result.rows if "value" in (r.get("measure") or {})]
    if not measured:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    swept = [i for i in range(len(measured[0]["overrides"]))
             if len({tuple(r["overrides"])[i] if i < len(r["overrides"]) else "" for r in measured}) > 1]
    labels = ["\n".join(r["overrides"][i].split("=", 1)[0].rsplit(".", 1)[-1] + "=" + r["overrides"][i].split("=", 1)[1]
                        for i in swept) or str(r["job"]) for r in measured]
    values = [r["measure"]["value"] for r in measured]
    fig, ax = plt.subplots(figsize=(max(4.0, 2.0 * len(values)), 4.2))
    bars = ax.bar(range(len(values)), values, color="#4c72b0")
    best = max(range(len(values)), key=values.__getitem__)
    bars[best].set_color("#dd8452")
    ax.set_xticks(range(len(values)), labels, fontsize=7)
    ax.set_ylabel(measured[0]["measure"]["figure"])
    ax.set_title(f"{result.sweep_dir.name}: best is job {measured[best]['job']}", fontsize=9)
    fig.tight_layout()
    path = result.sweep_dir / "results.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_tables(result: SweepResult) -> None:
    result.sweep_dir.mkdir(parents=True, exist_ok=True)
    write_chart(result)
    with open(result.sweep_dir / "results.csv", "w", newline="", encoding="utf-8") as f:
        columns = _columns(result.rows)
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(table_rows(result.rows))
    (result.sweep_dir / "results.json").write_text(json.dumps(result.summary(), indent=1) + "\n", encoding="utf-8")
