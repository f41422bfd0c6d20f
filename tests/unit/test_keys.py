"""Keys are sha256 of canonical JSON; reasons name the changed values."""

from __future__ import annotations

from qbuild.plan.keys import canonical_json, digest, tool_version
from qbuild.plan.planner import explain


def test_canonical_json_ignores_key_order() -> None:
    assert canonical_json({"b": 1, "a": [1, 2]}) == '{"a":[1,2],"b":1}'
    assert digest({"b": 1, "a": 2}) == digest({"a": 2, "b": 1})
    assert digest({"a": 1}) != digest({"a": 1.5})


def test_tool_version_reads_metadata() -> None:
    import onnxruntime

    assert tool_version("onnxruntime") == onnxruntime.__version__
    assert tool_version("no-such-dist-qbuild") == "absent"


def _ident(**kw: object) -> dict:
    base = {"stage": "compile", "params": {"threads": 2, "model": {"dtype": "float32"}}, "sources": {},
            "upstream": {"export": "k1"}, "tools": {"onnxruntime": "1.31.1"}, "code": {"stages/compile.py": "a"}}
    return {**base, **kw}


def test_explain_names_each_change_with_values() -> None:
    """Changed params are named by the manifest keys they were read from; everything else by what it is."""
    prev = {"identity": _ident(), "reads": {"compile.onnxruntime.threads": 2, "compile.qaic.timeout_s": 5}}
    now = _ident(params={"threads": 1, "model": {"dtype": "float32"}}, tools={"onnxruntime": "1.32.0"},
                 upstream={"export": "k2"}, sources={"model.safetensors": "x"},
                 code={"stages/compile.py": "b", "backends/onnxruntime.py": "c"})
    assert explain(prev, now, {"compile.onnxruntime.threads": 1, "compile.qaic.timeout_s": 5}) == [
        "compile.onnxruntime.threads: 2 -> 1",
        "onnxruntime 1.31.1 -> 1.32.0",
        "weights: model.safetensors added",
        "recipe code: qbuild/backends/onnxruntime.py added",
        "recipe code: qbuild/stages/compile.py changed",
        "upstream export rebuilt",
    ]
    # params changed although no manifest value did (a machine fact): the params fields are named
    machine = _ident(params={"threads": 2, "model": {"dtype": "bfloat16"}})
    assert explain({"identity": _ident(), "reads": {}}, machine, {}) == ["model.dtype: float32 -> bfloat16"]
    assert explain(None, now, {}) == ["no record"]
    assert explain({"identity": _ident(sources={"a": "1"})}, _ident(sources={"a": "2"}), {}) == ["weights: a changed"]
