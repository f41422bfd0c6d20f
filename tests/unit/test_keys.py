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
    base = {"stage": "compile", "version": 1, "params": {"compile.num_cores": 2}, "sources": {},
            "upstream": {"export": "k1"}, "tools": {"onnxruntime": "1.31.1"}}
    return {**base, **kw}


def test_explain_names_each_change_with_values() -> None:
    prev = _ident()
    now = _ident(params={"compile.num_cores": 1}, tools={"onnxruntime": "1.32.0"},
                 upstream={"export": "k2"}, sources={"model.safetensors": "x"}, version=2)
    assert explain(prev, now) == [
        "stage version 1 -> 2",
        "compile.num_cores: 2 -> 1",
        "onnxruntime 1.31.1 -> 1.32.0",
        "weights: model.safetensors added",
        "upstream export rebuilt",
    ]
    assert explain(None, now) == ["no record"]
    assert explain(_ident(sources={"a": "1"}), _ident(sources={"a": "2"})) == ["weights: a changed"]
