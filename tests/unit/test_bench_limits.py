"""The limits the benches print: fractions never above 1, FLOP counts by hand, facts, weight bytes; and
(slow) each bench's --quick run ends with a rule-15 JSON line holding its limit."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

import _machine as m  # noqa: E402

from tests.conftest import quick_bench  # noqa: E402


def _load(name: str):  # noqa: ANN202
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize(("achieved", "limit"), [(12.6, 8.5), (5.0, 10.0), (10.0, 10.0), (3.0, 0.0), (0.0, 0.0)])
def test_fraction_is_never_above_one(achieved: float, limit: float) -> None:
    b = m.bounded_fraction(achieved, limit)
    assert 0.0 <= b["fraction"] <= 1.0
    assert b["limit"] >= achieved  # a limit is never below what was reached
    assert b["measured_limit"] == limit


def test_exceeded_limit_is_flagged_and_replaced_by_the_achieved_figure() -> None:
    b = m.bounded_fraction(12.6, 8.5)  # the observed bug: 149 % of a copy "limit"
    assert b == {"fraction": 1.0, "limit": 12.6, "limit_underestimated": True, "measured_limit": 8.5}
    ok = m.bounded_fraction(5.0, 10.0)
    assert ok["fraction"] == 0.5 and not ok["limit_underestimated"]


def test_encoder_flops_by_hand() -> None:
    # MiniLM-L6, 128 tokens: per layer and token 4*384*384 + 2*384*1536 = 1_769_472 linear MACs and
    # 2*128*384 = 98_304 attention MACs; x 2 FLOPs x 6 layers x 128 tokens.
    assert m.encoder_flops_per_seq(128, 384, 1536, 6) == 2 * 6 * 128 * (1_769_472 + 98_304) == 2_868_903_936
    assert m.encoder_flops_per_seq(1, 2, 4, 1) == 2 * (4 * 4 + 2 * 8 + 2 * 2)


def test_padded_batches_follow_the_embedder() -> None:
    lengths = [5, 40, 130, 20, 64]
    assert m.padded_batches(lengths, 2, [32, 64, 128], fixed=True) == [(2, 128), (2, 64), (2, 32)]
    assert m.padded_batches(lengths, 2, [32, 64, 128], fixed=False) == [(2, 128), (2, 40), (1, 5)]


def test_token_agreement() -> None:
    assert m.token_agreement([1, 2, 3, 4], [1, 2, 3, 4]) == {"prefix": 1.0, "overall": 1.0,
                                                            "first_divergence": None, "tokens": 4}
    g = m.token_agreement([1, 2, 3, 4], [1, 9, 3, 4])
    assert (g["prefix"], g["overall"], g["first_divergence"]) == (0.25, 0.75, 1)
    assert m.token_agreement([1, 2], [1])["overall"] == 0.5  # a shorter run counts as disagreement


def test_summary() -> None:
    assert m.summary([3.0, 1.0, 2.0]) == {"min": 1.0, "median": 2.0, "max": 3.0}


def test_machine_facts_keys() -> None:
    facts = m.machine_facts()
    for key in ("cpu", "flags", "cores", "mem_total_gb", "numpy", "onnxruntime", "loadavg", "l3_mb"):
        assert key in facts
    assert all(f.startswith(("avx", "amx", "fma", "f16c")) or "vnni" in f for f in facts["flags"])
    assert "machine:" in m.format_facts(facts)


def test_run_conditions_steal_share(monkeypatch: pytest.MonkeyPatch) -> None:
    """The share of CPU time a hypervisor stole between the bench's start and now, from /proc/stat's jiffies."""
    monkeypatch.setattr(m, "_START_JIFFIES", (100, 10_000))
    monkeypatch.setattr(m, "_cpu_jiffies", lambda: (250, 13_000))  # 150 of 3000 jiffies stolen
    cond = m.run_conditions()
    assert cond["steal_pct"] == 5.0 and len(cond["loadavg_end"]) == 3
    assert "5.0% of CPU time stolen" in m.format_conditions(cond)
    monkeypatch.setattr(m, "_cpu_jiffies", lambda: None)  # no /proc/stat: no figure, and it says so
    assert "steal_pct" not in m.run_conditions() and "unknown" in m.format_conditions(m.run_conditions())


def test_cpu_jiffies_and_torch_blas_read_this_machine() -> None:
    jiffies = m._cpu_jiffies()
    if Path("/proc/stat").is_file():
        assert jiffies is not None and 0 <= jiffies[0] <= jiffies[1]
    blas = m.machine_facts()["torch_blas"]  # the test extra installs torch
    assert blas.startswith("torch ") and " BLAS " in blas and "BLAS unknown" not in blas


def test_read_bandwidth_and_gemm_peak_small() -> None:
    bw = m.read_bandwidth(1, 0.05, size_bytes=8 << 20)  # tiny buffer: only the plumbing is under test
    assert bw["gb_s"] == max(bw["kernels"].values()) > 0
    assert {"numpy_sum_threads", "numpy_gemv", "ort_matmul_vec"} <= set(bw["kernels"])
    g = m.gemm_peak([(16, 32, 8)], 1, 0.01)
    assert g["flop_s"] > 0 and set(g["kernels"]) == {"ort 16x32x8", "numpy 16x32x8"}


def test_weight_bytes_and_matmuls_skip_gather_tables(tmp_path: Path) -> None:
    import numpy as np
    import onnx
    from onnx import TensorProto as T
    from onnx import helper as h
    from onnx import numpy_helper

    table = numpy_helper.from_array(np.zeros((100, 8), np.float32), "table")  # 3200 bytes, Gather only
    w = numpy_helper.from_array(np.zeros((8, 4), np.float32), "w")  # 128 bytes
    graph = h.make_graph([h.make_node("Gather", ["table", "ids"], ["e"]), h.make_node("MatMul", ["e", "w"], ["y"])],
                         "g", [h.make_tensor_value_info("ids", T.INT64, [1])],
                         [h.make_tensor_value_info("y", T.FLOAT, [1, 4])], initializer=[table, w])
    onnx.save(h.make_model(graph), str(tmp_path / "model.onnx"), save_as_external_data=True,
              location="model.onnx.data", size_threshold=1024)  # the table goes external, w stays inline
    decode = _load("decode")
    assert decode.weight_bytes(tmp_path) == {"total": 3328, "read": 128}
    # the MatMul-only ceiling runs the weight MatMuls alone (the Gather table is not one)
    assert decode.weight_matmuls(tmp_path) == [("w", 8, 4)]
    ceiling = decode.MatMulCeiling(tmp_path, 1)
    assert (ceiling.matmuls, ceiling.bytes) == (1, 128) and ceiling.tok_s(0.01) > 0


@pytest.mark.slow
@pytest.mark.parametrize("bench", ["decode", "embed"])
def test_quick_bench_ends_with_bounded_limit(bench: str) -> None:
    last = quick_bench(bench)
    assert 0 < last["fraction_of_limit"] <= 1
    assert isinstance(last["limit_underestimated"], bool) and "machine" in last
    assert "loadavg_end" in last["machine"] and last["machine"]["torch_blas"]  # run conditions, torch BLAS
    if bench == "decode":
        assert last["bandwidth_gb_s"] > 0 and last["limit_tok_s"] >= last["qbuild_tok_s"]
        for q in last["quantized"].values():
            assert 0 < q["fraction_of_limit"] <= 1
        assert {"prefix", "overall"} <= set(last["quantized"]["int8"]["agreement"])
        assert last["fraction_of_ort_gemv"] > 0 and "int8_block" in last["quantized"]
        # the fp32 decode against its own weight MatMuls run alone: 2 layers x 7 + lm_head
        ceiling = last["matmul_ceiling"]  # timed right after each fp32 repeat
        assert ceiling["matmuls"] == 15 and len(ceiling["tok_s"]) >= 3
        assert 0 < ceiling["fraction"]["min"] <= ceiling["fraction"]["median"] <= 1
        # the default build of the bench's Llama: GroupQueryAttention (compile.onnxruntime.attention=auto)
        assert {q["kv_attention"] for q in last["quantized"].values()} == {"group_query"}
        assert {q["session_mode"] for q in last["quantized"].values()} <= {"fixed", "dynamic"}
        paired = last["paired_fraction"]  # the limit measured right after each fp32 repeat
        assert 0 < paired["min"] <= paired["median"] <= 1 and len(paired["limits_gb_s"]) >= 3
    else:
        assert last["gemm_peak_gflop_s"] > 0 and last["limit_per_s"] >= last["qbuild_per_s"]
