"""What the machine can do, measured in the bench's own run: facts, read bandwidth, GEMM peak.

A bench compares qbuild with a limit only when the limit is measured on the same machine, in the same
run, with the same thread count and (where it matters) the same engine as qbuild. A limit is an upper
bound: :func:`bounded_fraction` never reports more than 100 %; when qbuild beats a measured "limit",
that measurement was wrong and qbuild's own figure becomes the (lower bound of the) limit.

Pure helpers (fractions, FLOP counts, token agreement, padding) are at the top and import nothing heavy.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

FLAGS_OF_INTEREST = ("avx", "avx2", "fma", "f16c", "avx_vnni", "amx_bf16", "amx_int8", "amx_tile")


# --- pure helpers ---------------------------------------------------------------------------------


def bounded_fraction(achieved: float, limit: float) -> dict[str, Any]:
    """``achieved / limit``, never above 1: a measured limit below ``achieved`` was not a limit, so the
    limit becomes ``achieved`` (a lower bound of the true limit) and ``limit_underestimated`` says so."""
    if limit <= 0 or achieved > limit:
        return {"fraction": 1.0 if achieved > 0 else 0.0, "limit": max(achieved, limit),
                "limit_underestimated": True, "measured_limit": limit}
    return {"fraction": achieved / limit, "limit": limit, "limit_underestimated": False, "measured_limit": limit}


def summary(values: Sequence[float]) -> dict[str, float]:
    """min / median / max of repeated measurements."""
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def encoder_flops_per_seq(seq_len: int, hidden: int, intermediate: int, layers: int) -> int:
    """Multiply-add FLOPs (2 per MAC) of one BERT-style encoder sequence of ``seq_len`` tokens:
    per layer and token Q, K, V, output projections (4 h^2) and the MLP (2 h i) MACs, plus attention
    scores and weighted values (2 L h MACs per token). Embedding lookups, norms and softmax are not counted."""
    linear = 4 * hidden * hidden + 2 * hidden * intermediate
    attention = 2 * seq_len * hidden
    return 2 * layers * seq_len * (linear + attention)


def padded_batches(lengths: Sequence[int], batch_size: int, buckets: Sequence[int],
                   fixed: bool) -> list[tuple[int, int]]:
    """(rows, seq_len) of each batch qbuild's Embedder runs for texts of these token ``lengths``: longest
    first, batches of ``batch_size``, padded to the smallest bucket holding the longest with rows padded to
    ``batch_size`` where only fixed-shape sessions exist (``fixed``: qaic), else to the longest text (ONNX
    Runtime: a batch that fills its specialisation exactly runs the fixed-shape session, the same shape)."""
    order = sorted(lengths, reverse=True)
    out = []
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        longest = min(rows[0], max(buckets))
        bucket = next(b for b in sorted(buckets) if b >= longest)
        out.append((batch_size, bucket) if fixed else (len(rows), longest))
    return out


def token_agreement(reference: Sequence[int], other: Sequence[int]) -> dict[str, Any]:
    """Greedy-token agreement over the reference's positions: ``prefix`` = fraction of positions before the
    first divergence, ``overall`` = fraction of positions equal, ``first_divergence`` = index or None."""
    n = len(reference)
    if n == 0:
        return {"prefix": 1.0, "overall": 1.0, "first_divergence": None, "tokens": 0}
    equal = [i < len(other) and reference[i] == other[i] for i in range(n)]
    first = next((i for i, e in enumerate(equal) if not e), None)
    return {"prefix": (n if first is None else first) / n, "overall": sum(equal) / n,
            "first_divergence": first, "tokens": n}


def logit_fidelity(reference: Any, other: Any) -> dict[str, float]:
    """Teacher-forced comparison with the reference's logits: top-1 agreement per step, the reference's top-2
    margin (how flat its logits are: random weights give tiny margins any rounding flips), and the RMS logit
    error relative to the reference logits' spread."""
    import numpy as np

    top2 = np.sort(reference, axis=-1)[:, -2:]
    margin = top2[:, 1] - top2[:, 0]
    err = np.sqrt(((other - reference) ** 2).mean(-1)) / reference.std(-1)
    return {"top1_agreement": float((other.argmax(-1) == reference.argmax(-1)).mean()),
            "ref_margin_median": float(np.median(margin)), "ref_margin_min": float(margin.min()),
            "relative_logit_rmse": float(np.median(err))}


# --- facts ----------------------------------------------------------------------------------------


def _meminfo() -> dict[str, int]:
    out = {}
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                key, _, rest = line.partition(":")
                out[key] = int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return out


def _cpu_jiffies() -> tuple[int, int] | None:
    """(steal, total) jiffies of all CPUs since boot from /proc/stat, or None where it cannot be read."""
    try:
        with open("/proc/stat", encoding="utf-8") as f:
            fields = [int(x) for x in f.readline().split()[1:9]]  # user .. steal (guest time is inside user)
    except (OSError, ValueError):
        return None
    return (fields[7], sum(fields)) if len(fields) == 8 else None


_START_JIFFIES = _cpu_jiffies()  # at import: the bench's start


def run_conditions() -> dict[str, Any]:
    """What the machine did while the bench ran (since this module was imported): ``steal_pct``, the share of CPU
    time a hypervisor gave to other guests (a virtual machine's noise: figures of a run with a large share are
    not comparable with a quiet run's), and the load average now."""
    now, out = _cpu_jiffies(), {"loadavg_end": [round(x, 2) for x in os.getloadavg()]}
    if now and _START_JIFFIES and now[1] > _START_JIFFIES[1]:
        out["steal_pct"] = round(100 * (now[0] - _START_JIFFIES[0]) / (now[1] - _START_JIFFIES[1]), 1)
    return out


def format_conditions(cond: dict[str, Any]) -> str:
    steal = (f"{cond['steal_pct']}% of CPU time stolen by the hypervisor" if "steal_pct" in cond
             else "steal time unknown")
    return f"run conditions: {steal}, load average now {cond['loadavg_end']}"


def _torch_blas() -> str | None:
    """The BLAS torch was built with (MKL's fp32 GEMM on Intel CPUs decides a torch reference's speed), or None."""
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        return None
    import torch

    config = torch.__config__.show()
    blas = next((part.split("=", 1)[1] for part in config.replace(",", " ").split() if part.startswith("BLAS_INFO=")),
                "unknown")
    return f"torch {torch.__version__} BLAS {blas}"


def _cpuinfo() -> tuple[str, set[str]]:
    model, flags = "unknown", set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and model == "unknown":
                    model = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    return model, flags


def l3_bytes() -> int:
    """Largest cache size the kernel reports (32 MiB when unknown)."""
    best = 0
    base = "/sys/devices/system/cpu/cpu0/cache"
    for index in (os.listdir(base) if os.path.isdir(base) else []):
        try:
            with open(f"{base}/{index}/size", encoding="utf-8") as f:
                text = f.read().strip()
            mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1], 1)
            best = max(best, int(text.rstrip("KMG")) * mult)
        except (OSError, ValueError):
            continue
    return best or 32 << 20


def machine_facts() -> dict[str, Any]:
    """CPU model, SIMD flags of interest, cores, memory, library versions, BLAS, load average."""
    import numpy as np

    model, flags = _cpuinfo()
    interest = sorted(f for f in flags if f in FLAGS_OF_INTEREST or f.startswith(("avx512", "amx")) or "vnni" in f)
    mem = _meminfo()
    facts: dict[str, Any] = {
        "cpu": model, "flags": interest, "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "mem_total_gb": round(mem.get("MemTotal", 0) / 1e9, 1),
        "mem_available_gb": round(mem.get("MemAvailable", 0) / 1e9, 1),
        "l3_mb": round(l3_bytes() / 2**20, 1), "numpy": np.__version__,
        "loadavg": [round(x, 2) for x in os.getloadavg()],
    }
    try:
        import onnxruntime

        facts["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        facts["onnxruntime"] = None
    try:
        from threadpoolctl import threadpool_info

        facts["blas"] = [f"{p.get('internal_api')} {p.get('version')} threads={p.get('num_threads')}"
                         for p in threadpool_info() if p.get("user_api") == "blas"]
    except ImportError:
        pass
    facts["torch_blas"] = _torch_blas()
    for var in ("OPENBLAS_CORETYPE", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        if os.environ.get(var):
            facts[var] = os.environ[var]
    return facts


def format_facts(facts: dict[str, Any]) -> str:
    return (f"machine: {facts['cpu']}, {facts['cores']} cores, {facts['mem_total_gb']} GB "
            f"({facts['mem_available_gb']} available), L3 {facts['l3_mb']} MiB, flags {' '.join(facts['flags'])}; "
            f"numpy {facts['numpy']}, onnxruntime {facts['onnxruntime']}, {facts.get('torch_blas') or 'no torch'}, "
            f"load average {facts['loadavg']}")


# --- measurements ---------------------------------------------------------------------------------


def _best_time(fn: Callable[[], Any], seconds: float, min_reps: int = 3) -> float:
    """Fastest of repeated calls of ``fn`` (after one warm-up), for about ``seconds`` or ``min_reps`` calls."""
    fn()
    best, reps, t_end = float("inf"), 0, time.perf_counter() + seconds
    while reps < min_reps or time.perf_counter() < t_end:
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
        reps += 1
    return best


def _threads(threads: int | None) -> int:
    return threads or os.cpu_count() or 1


def _blas_limits(threads: int) -> Any:
    try:
        from threadpoolctl import threadpool_limits

        return threadpool_limits(limits=threads, user_api="blas")
    except ImportError:
        import contextlib

        return contextlib.nullcontext()


def buffer_bytes(min_mb: int = 512) -> int:
    """A read buffer much larger than the caches: max(8 x L3, ``min_mb``), at most a quarter of free memory."""
    want = max(8 * l3_bytes(), min_mb << 20)
    avail = _meminfo().get("MemAvailable", 0)
    return min(want, avail // 4) if avail else want


def _ort_session(graph: Any, threads: int) -> Any:
    import onnx
    import onnxruntime as ort

    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    model.ir_version = 8
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # no constant folding
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _ort_read_kernels(buf: Any, threads: int) -> dict[str, Callable[[], Any]]:
    """ONNX Runtime (the engine the decode runs on) reading ``buf`` bound zero-copy as an OrtValue:
    a vector x matrix MatMul (the decode's own kernel) and a ReduceSum."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto as T

    h = onnx.helper
    k = 4096
    w = buf.reshape(-1, k)  # [rows, 4096]
    rows = w.shape[0]
    graph_mm = h.make_graph([h.make_node("MatMul", ["x", "w"], ["y"])], "gemv",
                            [h.make_tensor_value_info("x", T.FLOAT, [1, rows]),
                             h.make_tensor_value_info("w", T.FLOAT, [rows, k])],
                            [h.make_tensor_value_info("y", T.FLOAT, [1, k])])
    axes = h.make_tensor("axes", T.INT64, [1], [0])
    graph_rs = h.make_graph([h.make_node("ReduceSum", ["w", "axes"], ["y"], keepdims=0)], "reduce",
                            [h.make_tensor_value_info("w", T.FLOAT, [rows, k])],
                            [h.make_tensor_value_info("y", T.FLOAT, [k])], initializer=[axes])
    w_val = ort.OrtValue.ortvalue_from_numpy(w)
    x_val = ort.OrtValue.ortvalue_from_numpy(np.ones((1, rows), np.float32))
    kernels = {}
    for name, graph, inputs in [("ort_matmul_vec", graph_mm, {"x": x_val, "w": w_val}),
                                ("ort_reducesum", graph_rs, {"w": w_val})]:
        sess = _ort_session(graph, threads)
        io = sess.io_binding()
        for key, val in inputs.items():
            io.bind_ortvalue_input(key, val)
        io.bind_output("y")
        kernels[name] = lambda sess=sess, io=io: sess.run_with_iobinding(io)
    return kernels


def read_bandwidth(threads: int | None = None, seconds: float = 2.0, size_bytes: int | None = None) -> dict[str, Any]:
    """Achievable READ bandwidth (GB/s) with ``threads`` threads: the best of several read kernels over a
    buffer far larger than the caches. Returns ``{"gb_s": best, "kernels": {name: GB/s}, "buffer_mb", "threads"}``."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    n = _threads(threads)
    size = (size_bytes or buffer_bytes()) // (4 * 4096 * n) * (4 * 4096 * n)
    buf = np.ones(size // 4, np.float32)  # written once: every page is resident before timing
    per = seconds / 5
    kernels: dict[str, Callable[[], Any]] = {}
    slices = np.split(buf, n)
    pool = ThreadPoolExecutor(n)
    kernels["numpy_sum_threads"] = lambda: list(pool.map(np.add.reduce, slices))  # numpy drops the GIL
    ones_k = np.ones(4096, np.float32)
    mat = buf.reshape(-1, 4096)
    kernels["numpy_gemv"] = lambda: mat @ ones_k  # BLAS sgemv, threaded by the BLAS
    kernels["numpy_dot"] = lambda: np.dot(buf, buf)  # BLAS sdot of x with itself: each byte read once
    try:
        kernels.update(_ort_read_kernels(buf, n))
    except Exception as exc:  # noqa: BLE001 - the numpy kernels still give a limit
        kernels_error = f"{type(exc).__name__}: {exc}"
    else:
        kernels_error = None
    results = {}
    with _blas_limits(n):
        for name, fn in kernels.items():
            results[name] = round(buf.nbytes / _best_time(fn, per) / 1e9, 2)
    pool.shutdown()
    out = {"gb_s": max(results.values()), "kernels": results, "buffer_mb": round(buf.nbytes / 1e6), "threads": n}
    if kernels_error:
        out["ort_error"] = kernels_error
    return out


def gemm_peak(shapes: Sequence[tuple[int, int, int]], threads: int | None = None,
              seconds: float = 0.5) -> dict[str, Any]:
    """Achievable fp32 FLOP/s of (M, K, N) matrix products: an ONNX Runtime MatMul with a constant
    [K, N] weight (as in the model) and numpy matmul, ``threads`` threads, best of repeats per shape.
    Returns ``{"flop_s": best over all, "kernels": {name: GFLOP/s}, "threads"}``."""
    import numpy as np
    import onnx
    from onnx import TensorProto as T

    h = onnx.helper
    n = _threads(threads)
    rng = np.random.default_rng(0)
    results: dict[str, float] = {}
    with _blas_limits(n):
        for m, k, nn in sorted(set(shapes)):
            a = rng.standard_normal((m, k), dtype=np.float32)
            b = rng.standard_normal((k, nn), dtype=np.float32)
            flops = 2 * m * k * nn
            graph = h.make_graph([h.make_node("MatMul", ["a", "b"], ["c"])], "gemm",
                                 [h.make_tensor_value_info("a", T.FLOAT, [m, k])],
                                 [h.make_tensor_value_info("c", T.FLOAT, [m, nn])],
                                 initializer=[onnx.numpy_helper.from_array(b, "b")])
            sess = _ort_session(graph, n)
            results[f"ort {m}x{k}x{nn}"] = round(flops / _best_time(lambda s=sess, a=a: s.run(None, {"a": a}),
                                                                     seconds) / 1e9, 1)
            results[f"numpy {m}x{k}x{nn}"] = round(flops / _best_time(lambda a=a, b=b: a @ b, seconds) / 1e9, 1)
    return {"flop_s": max(results.values()) * 1e9, "kernels": results, "threads": n}
