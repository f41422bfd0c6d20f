"""Decode speed: qbuild's ONNX Runtime runtime vs Hugging Face eager generate, same weights, same run.

Usage: python bench/decode.py [--layers 12 --hidden 768 ...] [--quantize none,int8,int8_block,int4] [--repeat 3]
[--quick]
A ~100M-parameter random Llama, batch 1, a 32-token prompt, 128 new tokens (EOS disabled); each runtime
is timed ``--repeat`` times (min / median). The limit is memory bandwidth: every decode step reads the
compiled model's weights (initializer bytes as built, fp32/int8/int4; embedding tables only looked up by
Gather excluded) and the KV cache, so limit tok/s = read bandwidth / bytes per token, where the read
bandwidth is the best of several read kernels (numpy, BLAS, ONNX Runtime) measured in this run with the
session's thread count (bench/_machine.py). The fraction reached is never printed above 100 %: if qbuild
beats the measured bandwidth, the measurement was not a limit, the bench says so and uses qbuild's own
achieved bandwidth as the limit's lower bound. The quantised builds' greedy tokens are compared with fp32's
over the generated tokens (on these random weights the logits are too flat for that to measure the quantiser:
bench/quant_trained.py measures quantisation on a trained model). Since this machine's bandwidth moves within
minutes, the first build's limit is also measured right after each of its repeats, and the fraction paired with
it is printed (min / median). So is fp32's kernel ceiling (MatMulCeiling): the compiled model's weight MatMuls
alone (same weights and shapes, M=1) in one ONNX Runtime session, timed right after each repeat; decode tok/s over
its tok/s is what the rest of the graph and the runtime leave of what ORT's MatMul allows. Ends with one JSON line
(DESIGN rule 15).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _machine import (  # noqa: E402
    bounded_fraction,
    format_conditions,
    format_facts,
    l3_bytes,
    logit_fidelity,
    machine_facts,
    read_bandwidth,
    run_conditions,
    summary,
    token_agreement,
)

PROMPT = 32
CTX = 256
QUICK = {"layers": 2, "hidden": 256, "intermediate": 768, "heads": 4, "kv_heads": 2, "vocab": 4000, "new_tokens": 32}


def _overrides(a: argparse.Namespace, quantize: str) -> list[str]:
    return [f"model.config.num_hidden_layers={a.layers}", f"model.config.hidden_size={a.hidden}",
            f"model.config.intermediate_size={a.intermediate}", f"model.config.num_attention_heads={a.heads}",
            f"model.config.num_key_value_heads={a.kv_heads}", f"model.config.vocab_size={a.vocab}",
            "model.config.max_position_embeddings=512", f"seq.lengths=[{PROMPT}]", f"seq.ctx_len={CTX}",
            f"compile.onnxruntime.threads={a.threads}", f"compile.onnxruntime.quantize={quantize}",
            "verify.enabled=false"]


def weight_bytes(compiled: Path) -> dict[str, int]:
    """Initializer bytes of the compiled ``model.onnx`` as stored (external data included): ``total``, and
    ``read`` = those a decode step reads (tables used only by Gather lookups read one row, so excluded)."""
    import onnx

    model = onnx.load(str(compiled / "model.onnx"), load_external_data=False)
    g = model.graph
    users: dict[str, set[str]] = {}
    for node in g.node:
        for name in node.input:
            users.setdefault(name, set()).add(node.op_type)
    total = read = 0
    for init in g.initializer:
        ext = {e.key: e.value for e in init.external_data}
        if init.data_location == onnx.TensorProto.EXTERNAL and "length" in ext:
            n = int(ext["length"])
        elif init.raw_data:
            n = len(init.raw_data)
        else:
            count = 1
            for d in init.dims:
                count *= d
            n = count * onnx.helper.tensor_dtype_to_np_dtype(init.data_type).itemsize
        total += n
        ops = users.get(init.name, set())
        if not ops or not all(op.startswith("Gather") for op in ops):
            read += n
    return {"total": total, "read": read}


def weight_matmuls(compiled: Path) -> list[tuple[str, int, int]]:
    """The compiled model's MatMuls on fp32 weights: (initializer name, K, N) each, in graph order."""
    import onnx

    model = onnx.load(str(compiled / "model.onnx"), load_external_data=False)
    inits = {i.name: i for i in model.graph.initializer}
    out = []
    for node in model.graph.node:
        w = inits.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) == 2 else None
        if w is not None and len(w.dims) == 2 and w.data_type == onnx.TensorProto.FLOAT:
            out.append((w.name, int(w.dims[0]), int(w.dims[1])))
    return out


class MatMulCeiling:
    """The fp32 decode's kernel ceiling: one ONNX Runtime session (same threads) running only the compiled model's
    weight MatMuls, at M=1, on the same weights and shapes (prepacked as the decode's are), nothing else. A decode
    step on ORT's MatMul cannot be faster than one run of it; decode tok/s over 1 / its run time is the share the
    rest of the graph and the runtime leave. Timed right after each decode repeat (the machine's bandwidth moves
    within minutes), median against median."""

    def __init__(self, compiled: Path, threads: int) -> None:
        import numpy as np
        import onnx
        import onnxruntime as ort
        from onnx import TensorProto as T
        from onnx import helper as h

        mats = weight_matmuls(compiled)
        model = onnx.load(str(compiled / "model.onnx"))  # external data read in: the weights the decode reads
        inits = {i.name: i for i in model.graph.initializer}
        ks = sorted({k for _, k, _ in mats})
        nodes = [h.make_node("MatMul", [f"x{k}", name], [f"y{i}"]) for i, (name, k, _) in enumerate(mats)]
        graph = h.make_graph(nodes, "matmuls", [h.make_tensor_value_info(f"x{k}", T.FLOAT, [1, k]) for k in ks],
                             [h.make_tensor_value_info(f"y{i}", T.FLOAT, [1, n]) for i, (_, _, n) in enumerate(mats)],
                             initializer=[inits[name] for name, _, _ in mats])
        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        so.log_severity_level = 3
        with tempfile.TemporaryDirectory() as tmp:  # external data: a large model's weights pass the 2 GB protobuf
            path = Path(tmp) / "matmuls.onnx"
            onnx.save(h.make_model(graph, opset_imports=[h.make_opsetid("", 17)]), str(path),
                      save_as_external_data=True, location="matmuls.data")
            del model, inits, graph
            self.session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        self.io = self.session.io_binding()
        for k in ks:
            self.io.bind_cpu_input(f"x{k}", np.ones((1, k), np.float32))
        for i in range(len(mats)):
            self.io.bind_output(f"y{i}")
        self.session.run_with_iobinding(self.io)
        self.matmuls, self.bytes = len(mats), sum(k * n * 4 for _, k, n in mats)

    def tok_s(self, seconds: float, min_runs: int = 5) -> float:
        """1 / the median seconds of one run, over ``seconds`` (at least ``min_runs`` runs)."""
        times: list[float] = []
        t_end = time.perf_counter() + seconds
        while time.perf_counter() < t_end or len(times) < min_runs:
            t0 = time.perf_counter()
            self.session.run_with_iobinding(self.io)
            times.append(time.perf_counter() - t0)
        return 1 / statistics.median(times)


def kv_bytes(a: argparse.Namespace) -> int:
    """The retained KV cache read by one decode step (static ``ctx_len`` positions, fp32, K and V)."""
    return 2 * a.layers * a.kv_heads * CTX * (a.hidden // a.heads) * 4


def qbuild_runs(a: argparse.Namespace, cache: Path, quantize: str, prompt: list[int],
                paired: bool = False) -> dict[str, Any]:
    from qbuild.api import build
    from qbuild.runtime.generate import KVRuntime

    t0 = time.perf_counter()
    result = build(ROOT / "manifests" / "tiny-llama-kv.yaml", _overrides(a, quantize), cache_dir=cache)
    build_s = time.perf_counter() - t0
    compiled = Path(result.artifacts["compiled"])
    size = sum(f.stat().st_size for f in compiled.rglob("*") if f.is_file())
    rt = KVRuntime(compiled, ctx_len=CTX, buckets=[PROMPT], num_threads=a.threads)
    rt.generate([prompt], 8, None)  # warm-up (opens the sessions it runs)
    session = rt.session or next(iter(rt._bindings.values()))[0]
    threads = session.get_session_options().intra_op_num_threads or os.cpu_count() or 1
    kernels = MatMulCeiling(compiled, threads) if quantize == "none" and paired else None
    tok_s, tokens, limits, ceiling_tok_s = [], None, [], []
    for _ in range(a.repeat):
        g = rt.generate([prompt], a.new_tokens, None)
        tok_s.append((a.new_tokens - 1) / g.decode_s)
        tokens = g.tokens[0]
        if paired:  # this machine's bandwidth moves by 40 % within minutes: a limit from the same minute
            limits.append(read_bandwidth(threads, a.bandwidth_seconds / 2)["gb_s"])
        if kernels:
            ceiling_tok_s.append(kernels.tok_s(a.bandwidth_seconds / 3))
    ceiling = {"matmuls": kernels.matmuls, "bytes": kernels.bytes, "tok_s": ceiling_tok_s} if kernels else None
    return {"tok_s": tok_s, "size_mb": size / 1e6, "build_s": build_s, "tokens": tokens, "threads": threads,
            "weights": weight_bytes(compiled), "runtime": rt, "session_mode": rt.sessions.mode, "paired_limits": limits,
            "kv_attention": "group_query" if rt.in_place else "plain", "ceiling": ceiling}


def hf_runs(a: argparse.Namespace, cache: Path, prompt: list[int]) -> dict[str, Any]:
    import torch

    from qbuild.api import plan
    from qbuild.models.source import load_model

    torch.set_num_threads(a.threads)
    load = plan(ROOT / "manifests" / "tiny-llama-kv.yaml", _overrides(a, "none"), cache_dir=cache).stage("load")
    model = load_model(load.entry.out / "model", "causal_lm", "float32")
    ids = torch.tensor([prompt])
    kw = {"do_sample": False, "eos_token_id": None, "pad_token_id": 0}
    tok_s = []
    with torch.no_grad():
        model.generate(ids, max_new_tokens=8, min_new_tokens=8, **kw)
        for _ in range(a.repeat):
            t0 = time.perf_counter()
            model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw)
            first = time.perf_counter() - t0
            t0 = time.perf_counter()
            out = model.generate(ids, max_new_tokens=a.new_tokens, min_new_tokens=a.new_tokens, **kw)
            total = time.perf_counter() - t0
            tok_s.append((a.new_tokens - 1) / max(total - first, 1e-9))
    params = sum(p.numel() for p in model.parameters())
    return {"tok_s": tok_s, "params": params, "weight_bytes": params * 4, "tokens": out[0, PROMPT:].tolist()}


def limit_of(run: dict[str, Any], bytes_per_token: int, bw_gb_s: float) -> dict[str, Any]:
    """Achieved read bandwidth (median tok/s x bytes per token) against the measured bandwidth, bounded."""
    achieved = statistics.median(run["tok_s"]) * bytes_per_token / 1e9
    b = bounded_fraction(achieved, bw_gb_s)
    return {**b, "achieved_gb_s": achieved, "limit_tok_s": b["limit"] * 1e9 / bytes_per_token,
            "bytes_per_token": bytes_per_token, "fits_in_l3": bytes_per_token <= l3_bytes()}


DEFAULTS = {"layers": 12, "hidden": 768, "intermediate": 2048, "heads": 12, "kv_heads": 4, "vocab": 16000,
            "new_tokens": 128}


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name in DEFAULTS:  # None: filled from DEFAULTS, or QUICK with --quick
        ap.add_argument(f"--{name.replace('_', '-')}", type=int, default=None)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--quantize", default="none,int8,int8_block,int4")
    ap.add_argument("--bandwidth-seconds", type=float, default=3.0, help="time per bandwidth measurement")
    ap.add_argument("--quick", action="store_true", help="a 2-layer model and 32 tokens: under a minute")
    a = ap.parse_args()
    for name, default in (QUICK if a.quick else DEFAULTS).items():
        if getattr(a, name) is None:
            setattr(a, name, default)
    if a.quick:
        a.bandwidth_seconds = min(a.bandwidth_seconds, 0.5)
    return a


def main() -> None:
    import numpy as np

    a = parse()
    prompt = np.random.RandomState(0).randint(3, a.vocab, PROMPT).tolist()
    quants = [q for q in a.quantize.split(",") if q]
    bw = [read_bandwidth(a.threads, a.bandwidth_seconds)]  # before and after the runs: load changes
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp)
        runs = {q: qbuild_runs(a, cache, q, prompt, paired=i == 0) for i, q in enumerate(quants)}
        hf = hf_runs(a, cache, prompt)
    threads = {r["threads"] for r in runs.values()}
    if threads != {bw[0]["threads"]}:  # the limit must use the session's own thread count
        bw = [read_bandwidth(t, a.bandwidth_seconds) for t in sorted(threads)]
    bw.append(read_bandwidth(max(threads), a.bandwidth_seconds))
    best_bw = max(b["gb_s"] for b in bw)
    kernels = {k: max(b["kernels"].get(k, 0.0) for b in bw) for k in bw[0]["kernels"]}
    kv = kv_bytes(a)
    limits = {q: limit_of(r, r["weights"]["read"] + kv, best_bw) for q, r in runs.items()}
    base_q = "none" if "none" in runs else quants[0]
    base, hf_med = runs[base_q], statistics.median(hf["tok_s"])
    agree = {q: token_agreement(base["tokens"], r["tokens"]) for q, r in runs.items() if q != base_q}
    ref_logits = base["runtime"].forced_logits(prompt, base["tokens"])
    fidelity = {q: logit_fidelity(ref_logits, r["runtime"].forced_logits(prompt, base["tokens"]))
                for q, r in runs.items() if q != base_q}
    for r in runs.values():
        del r["runtime"]
    facts = machine_facts()

    print(format_facts(facts))
    print(f"model: random Llama, {a.layers} layers, hidden {a.hidden}, {hf['params'] / 1e6:.0f}M parameters, "
          f"fp32 {hf['weight_bytes'] / 1e6:.0f} MB; prompt {PROMPT}, {a.new_tokens} new tokens, {a.repeat} repeats, "
          f"threads {sorted(threads)}")
    print("read bandwidth GB/s (best per kernel over " + str(len(bw)) + " measurements, buffer "
          f"{bw[0]['buffer_mb']} MB): " + ", ".join(f"{k} {v:.1f}" for k, v in kernels.items())
          + f" -> limit {best_bw:.1f} GB/s (per measurement: {[b['gb_s'] for b in bw]})")
    print(f"{'runtime':<20} {'tok/s min':>9} {'median':>8} {'vs HF':>6} {'read MB/tok':>11} {'GB/s':>6} "
          f"{'limit tok/s':>11} {'of limit':>8}")
    print(f"{'HF eager generate':<20} {min(hf['tok_s']):9.1f} {hf_med:8.1f} {1.0:6.2f} "
          f"{hf['weight_bytes'] / 1e6:11.1f}")
    for q, r in runs.items():
        lim, med = limits[q], statistics.median(r["tok_s"])
        print(f"{'qbuild ORT ' + q:<20} {min(r['tok_s']):9.1f} {med:8.1f} {med / hf_med:6.2f} "
              f"{lim['bytes_per_token'] / 1e6:11.1f} {lim['achieved_gb_s']:6.1f} {lim['limit_tok_s']:11.1f} "
              f"{lim['fraction']:8.0%}" + ("  (fits in L3)" if lim["fits_in_l3"] else ""))
        if lim["limit_underestimated"]:
            print(f"  NOTE: qbuild {q} read {lim['achieved_gb_s']:.1f} GB/s, more than the measured "
                  f"{best_bw:.1f} GB/s: that measurement was not a limit; using qbuild's own figure as its lower bound")
    paired = [bounded_fraction(t * limits[base_q]["bytes_per_token"] / 1e9, lim)["fraction"]
              for t, lim in zip(base["tok_s"], base["paired_limits"], strict=True)]
    if paired:
        print(f"qbuild {base_q}: fraction of the limit measured right after each repeat: "
              + ", ".join(f"{f:.0%} ({lim:.1f} GB/s)" for f, lim in zip(paired, base["paired_limits"], strict=True))
              + f"; min {min(paired):.0%}, median {statistics.median(paired):.0%}")
    ort_gemv = kernels.get("ort_matmul_vec", 0.0)
    if ort_gemv:  # the kernel every ORT decode's MatMuls run: what the graph, not MLAS, can still win
        print(f"qbuild fp32 ({base_q}) reads {limits[base_q]['achieved_gb_s']:.1f} GB/s = "
              f"{limits[base_q]['achieved_gb_s'] / ort_gemv:.0%} of ONNX Runtime's own M=1 MatMul "
              f"({ort_gemv:.1f} GB/s in this run)")
    ceiling = base["ceiling"]
    if ceiling:
        ceiling["fractions"] = [bounded_fraction(t, c)["fraction"]
                                for t, c in zip(base["tok_s"], ceiling["tok_s"], strict=True)]
        print(f"qbuild {base_q} decode against its {ceiling['matmuls']} weight MatMuls alone on ONNX Runtime "
              f"({ceiling['bytes'] / 1e6:.0f} MB; timed right after each repeat): "
              + ", ".join(f"{f:.0%} ({c:.1f} tok/s)" for f, c in zip(ceiling["fractions"], ceiling["tok_s"],
                                                                       strict=True))
              + f"; min {min(ceiling['fractions']):.0%}, median {statistics.median(ceiling['fractions']):.0%}: "
              "the share the rest of the graph and the runtime leave")
    for q, g in agree.items():
        f = fidelity[q]
        print(f"greedy agreement {q} vs {base_q} over {g['tokens']} tokens: prefix {g['prefix']:.0%} "
              f"(first divergence {g['first_divergence']}), overall {g['overall']:.0%}; teacher-forced top-1 "
              f"{f['top1_agreement']:.0%}, logit RMSE {f['relative_logit_rmse']:.4f} of the {base_q} logits' spread, "
              f"{base_q} top-2 margin median {f['ref_margin_median']:.4f} (min {f['ref_margin_min']:.5f})")
    print("graph forms: " + ", ".join(f"{q} {r['kv_attention']} attention, {r['session_mode']} sessions"
                                      for q, r in runs.items()))
    print(f"greedy tokens equal HF ({base_q}): {base['tokens'] == hf['tokens']}")
    base_lim = limits[base_q]
    conditions = run_conditions()
    print(format_conditions(conditions))
    facts.update(conditions)
    print(json.dumps({
        "bench": "decode", "quick": a.quick, "params_m": round(hf["params"] / 1e6, 1),
        "qbuild_tok_s": round(statistics.median(base["tok_s"]), 2), "qbuild_tok_s_min": round(min(base["tok_s"]), 2),
        "hf_tok_s": round(hf_med, 2), "hf_tok_s_min": round(min(hf["tok_s"]), 2),
        "ratio": round(statistics.median(base["tok_s"]) / hf_med, 3), "goal": 2.0,
        "bandwidth_gb_s": round(best_bw, 2), "bandwidth_kernels": kernels,
        "bandwidth_measured": [b["gb_s"] for b in bw], "threads": max(threads),
        "bytes_per_token_mb": round(base_lim["bytes_per_token"] / 1e6, 2),
        "limit_tok_s": round(base_lim["limit_tok_s"], 2), "fraction_of_limit": round(base_lim["fraction"], 3),
        "limit_underestimated": base_lim["limit_underestimated"], "fraction_goal": 0.85,
        "paired_fraction": {"min": round(min(paired), 3), "median": round(statistics.median(paired), 3),
                            "limits_gb_s": base["paired_limits"]} if paired else None,
        "fraction_of_ort_gemv": round(base_lim["achieved_gb_s"] / ort_gemv, 3) if ort_gemv else None,
        "matmul_ceiling": {"tok_s": [round(t, 2) for t in ceiling["tok_s"]],
                           "fraction": {"min": round(min(ceiling["fractions"]), 3),
                                        "median": round(statistics.median(ceiling["fractions"]), 3)},
                           "matmuls": ceiling["matmuls"], "mb": round(ceiling["bytes"] / 1e6, 1)} if ceiling else None,
        "tokens_match_hf": base["tokens"] == hf["tokens"],
        "quantized": {q: {"tok_s": {k: round(v, 2) for k, v in summary(r["tok_s"]).items()},
                          "size_mb": round(r["size_mb"], 1), "weights_mb": round(r["weights"]["total"] / 1e6, 1),
                          "read_mb_per_token": round(limits[q]["bytes_per_token"] / 1e6, 2),
                          "achieved_gb_s": round(limits[q]["achieved_gb_s"], 2),
                          "fraction_of_limit": round(limits[q]["fraction"], 3),
                          "session_mode": r["session_mode"], "kv_attention": r["kv_attention"],
                          "limit_underestimated": limits[q]["limit_underestimated"],
                          "fits_in_l3": limits[q]["fits_in_l3"],
                          **({"agreement": {k: (round(v, 3) if isinstance(v, float) else v)
                                            for k, v in agree[q].items()},
                              "teacher_forced": {k: round(v, 5) for k, v in fidelity[q].items()}}
                             if q in agree else {})}
                      for q, r in runs.items()},
        "agreement_goal": 0.95, "machine": facts}))


if __name__ == "__main__":
    main()
