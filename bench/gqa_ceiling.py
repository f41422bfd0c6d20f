"""What fused attention gains in decode: qbuild's fp32 decode in its two ONNX Runtime forms
(``compile.onnxruntime.attention=plain``, and ``auto``: ``com.microsoft::GroupQueryAttention`` doing RoPE, the
cache write in place and grouped-query attention in one node a layer), and the same weights in a hand-built ONNX
decode graph of that op (its other ops fused by hand too: the ceiling of this approach).

Usage: python bench/gqa_ceiling.py [--rounds 7] [--new-tokens 128] [--batch 1] [--quick]
The model is bench/decode.py's ~100M random Llama (``--quick``: its 2-layer one), built by qbuild; the hand-built
graph reads the load stage's safetensors. All three decode one token a step, batch 1, interleaved round by round
(this machine's speed drifts by 20 % within minutes); the gain is taken per round (fused / plain of the same
minute). ``--batch N``: qbuild's two builds decode N prompts together (their tokens must be equal; tok/s counts
every row), and the hand-built graph, batch 1 only, is checked but not timed. The fused and hand-built graphs
are checked against qbuild's plain one first: the same prompt fed one token a step (teacher forcing, from an
empty cache) must give the same logits (max abs difference printed; it must stay below 1e-3 of the logits'
spread) before any timing counts. Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import decode as D  # noqa: E402
from _machine import format_facts, machine_facts, summary  # noqa: E402


def gqa_graph(model_dir: Path, out: Path, ctx: int) -> tuple[Path, dict[str, Any]]:
    """Write the hand-built decode graph (one token, batch 1, caches of ``ctx`` positions) with ``model_dir``'s
    weights; its dims."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from safetensors.numpy import load_file

    cfg = json.loads((model_dir / "config.json").read_text())
    w = load_file(str(model_dir / "model.safetensors"))
    layers, hidden, heads = cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_attention_heads"]
    kv_heads, eps = cfg["num_key_value_heads"], float(cfg.get("rms_norm_eps", 1e-6))
    head_dim = cfg.get("head_dim") or hidden // heads
    theta = float((cfg.get("rope_parameters") or {}).get("rope_theta") or cfg.get("rope_theta") or 10000.0)
    positions = cfg["max_position_embeddings"]
    inits, nodes = [], []

    def init(name: str, array: Any) -> str:
        inits.append(numpy_helper.from_array(np.ascontiguousarray(array, dtype=np.float32), name))
        return name

    def linear(x: str, key: str, out_name: str) -> None:  # HF [out, in] -> MatMul's [in, out]
        nodes.append(helper.make_node("MatMul", [x, init(key, w[key].T)], [out_name]))

    inv = 1.0 / theta ** (np.arange(0, head_dim, 2) / head_dim)
    angles = np.outer(np.arange(positions), inv)
    init("cos", np.cos(angles))
    init("sin", np.sin(angles))
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, 1]),
              helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, [1]),
              helper.make_tensor_value_info("total_seq", TensorProto.INT32, [])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 1, cfg["vocab_size"]])]
    nodes.append(helper.make_node("Gather", [init("embed", w["model.embed_tokens.weight"]), "input_ids"], ["x0"]))
    x = "x0"
    for i in range(layers):
        p = f"model.layers.{i}."
        for kind in ("key", "value"):
            shape = [1, kv_heads, ctx, head_dim]
            inputs.append(helper.make_tensor_value_info(f"past_{kind}.{i}", TensorProto.FLOAT, shape))
            outputs.append(helper.make_tensor_value_info(f"present_{kind}.{i}", TensorProto.FLOAT, shape))
        norm = init(f"n1.{i}", w[p + "input_layernorm.weight"])
        nodes.append(helper.make_node("SimplifiedLayerNormalization", [x, norm], [f"h{i}"], epsilon=eps, axis=-1))
        for proj in ("q", "k", "v"):
            linear(f"h{i}", p + f"self_attn.{proj}_proj.weight", f"{proj}{i}")
        nodes.append(helper.make_node(
            "GroupQueryAttention", [f"q{i}", f"k{i}", f"v{i}", f"past_key.{i}", f"past_value.{i}", "seqlens_k",
                                    "total_seq", "cos", "sin"],
            [f"a{i}", f"present_key.{i}", f"present_value.{i}"], domain="com.microsoft", num_heads=heads,
            kv_num_heads=kv_heads, do_rotary=1))
        linear(f"a{i}", p + "self_attn.o_proj.weight", f"o{i}")
        nodes.append(helper.make_node("Add", [x, f"o{i}"], [f"r{i}"]))
        nodes.append(helper.make_node("SimplifiedLayerNormalization",
                                      [f"r{i}", init(f"n2.{i}", w[p + "post_attention_layernorm.weight"])],
                                      [f"h2{i}"], epsilon=eps, axis=-1))
        linear(f"h2{i}", p + "mlp.gate_proj.weight", f"g{i}")
        linear(f"h2{i}", p + "mlp.up_proj.weight", f"u{i}")
        nodes += [helper.make_node("Sigmoid", [f"g{i}"], [f"sg{i}"]),
                  helper.make_node("Mul", [f"g{i}", f"sg{i}"], [f"s{i}"]),
                  helper.make_node("Mul", [f"s{i}", f"u{i}"], [f"m{i}"])]
        linear(f"m{i}", p + "mlp.down_proj.weight", f"d{i}")
        nodes.append(helper.make_node("Add", [f"r{i}", f"d{i}"], [f"x{i + 1}"]))
        x = f"x{i + 1}"
    nodes.append(helper.make_node("SimplifiedLayerNormalization", [x, init("nf", w["model.norm.weight"])], ["hf"],
                                  epsilon=eps, axis=-1))
    head = w.get("lm_head.weight", w["model.embed_tokens.weight"])
    nodes.append(helper.make_node("MatMul", ["hf", init("head", head.T)], ["logits"]))
    graph = helper.make_graph(nodes, "gqa_decode", inputs, outputs, inits)
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    path = out / "gqa.onnx"
    onnx.save(model, str(path), save_as_external_data=True, location="gqa.onnx.data")
    return path, {"layers": layers, "kv_heads": kv_heads, "head_dim": head_dim, "ctx": ctx, "nodes": len(nodes)}


class GQADecoder:
    """The hand-built graph's session, caches bound in place (present = past buffers)."""

    def __init__(self, path: Path, dims: dict[str, Any], threads: int) -> None:
        import numpy as np
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        so.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        shape = (1, dims["kv_heads"], dims["ctx"], dims["head_dim"])
        # the arrays own the memory the OrtValues point at: keep them alive
        names = [f"past_{k}.{i}" for i in range(dims["layers"]) for k in ("key", "value")]
        self.arrays = {name: np.zeros(shape, np.float32) for name in names}
        self.caches = {name: ort.OrtValue.ortvalue_from_numpy(a) for name, a in self.arrays.items()}
        self.io = self.session.io_binding()
        self.io.bind_output("logits")  # first: get_outputs() follows the binding order
        for name, value in self.caches.items():
            self.io.bind_ortvalue_input(name, value)
            self.io.bind_ortvalue_output(name.replace("past_", "present_"), value)

    def step(self, token: int, position: int) -> Any:
        import numpy as np

        self.io.bind_cpu_input("input_ids", np.array([[token]], np.int64))
        self.io.bind_cpu_input("seqlens_k", np.array([position], np.int32))
        self.io.bind_cpu_input("total_seq", np.array(position + 1, np.int32))
        self.session.run_with_iobinding(self.io)
        return self.io.get_outputs()[0].numpy()[0, 0].copy()  # a view of the output buffer the next run reuses

    def generate(self, prompt: list[int], new_tokens: int) -> tuple[list[int], float]:
        """Greedy tokens (the prompt fed one token a step, from empty caches) and the decode seconds after it."""
        for a in self.arrays.values():  # the OrtValues are views of these
            a[...] = 0
        for pos, t in enumerate(prompt[:-1]):
            self.step(t, pos)
        logits, tokens = self.step(prompt[-1], len(prompt) - 1), []
        t0 = time.perf_counter()
        for pos in range(len(prompt), len(prompt) + new_tokens - 1):
            tokens.append(int(logits.argmax()))
            logits = self.step(tokens[-1], pos)
        tokens.append(int(logits.argmax()))
        return tokens, time.perf_counter() - t0


def main() -> None:
    import numpy as np
    import onnx

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--new-tokens", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=1,
                    help="prompts decoded together (9..32 tokens); above 1 the hand-built batch-1 graph is left out")
    ap.add_argument("--quick", action="store_true", help="bench/decode.py's 2-layer model, 3 rounds")
    args = ap.parse_args()
    a = argparse.Namespace(**(D.QUICK if args.quick else D.DEFAULTS), threads=args.threads)
    a.new_tokens = args.new_tokens or a.new_tokens
    rounds = 3 if args.quick else args.rounds
    rng = np.random.RandomState(0)
    prompt = rng.randint(3, a.vocab, D.PROMPT).tolist()
    batch = [prompt, *(rng.randint(3, a.vocab, rng.randint(9, D.PROMPT + 1)).tolist() for _ in range(args.batch - 1))]

    from qbuild.api import build
    from qbuild.runtime.generate import KVRuntime

    with tempfile.TemporaryDirectory() as tmp:
        manifest, runtimes = D.ROOT / "manifests" / "tiny-llama-kv.yaml", {}
        for form in ("plain", "auto"):  # qbuild's two ONNX Runtime forms of the same model (one load, two exports)
            result = build(manifest, [*D._overrides(a, "none"), f"compile.onnxruntime.attention={form}",
                                      f"seq.batch_size={args.batch}"], cache_dir=Path(tmp))
            runtimes[form] = KVRuntime(Path(result.artifacts["compiled"]), ctx_len=D.CTX, buckets=[D.PROMPT],
                                       num_threads=a.threads)
        if not runtimes["auto"].in_place:
            raise SystemExit("qbuild's default build of this Llama did not export GroupQueryAttention")
        path, dims = gqa_graph(Path(result.artifacts["model"]), Path(tmp), D.CTX)
        gqa = GQADecoder(path, dims, a.threads)
        reference = runtimes["plain"].forced_logits(prompt[:1], prompt[1:])  # one token a step, from empty caches
        diffs = {"fused": runtimes["auto"].forced_logits(prompt[:1], prompt[1:]),
                 "hand": np.stack([gqa.step(t, pos) for pos, t in enumerate(prompt[:-1])])}
        diffs = {k: float(np.abs(v - reference).max()) / float(reference.std()) for k, v in diffs.items()}
        if max(diffs.values()) > 1e-3:
            raise SystemExit(f"the graphs do not compute the same model: max abs logit difference to qbuild's plain "
                             f"graph, of the logits' spread: {diffs}")
        tokens = {form: rt.generate(batch, 8, None).tokens for form, rt in runtimes.items()}
        if tokens["plain"] != tokens["auto"]:
            raise SystemExit(f"the fused and plain builds generate different tokens: {tokens}")
        gqa.generate(prompt, 8)
        rates: dict[str, list[float]] = {"plain": [], "fused": [], **({"hand": []} if args.batch == 1 else {})}
        for _ in range(rounds):
            for name, rt in (("plain", runtimes["plain"]), ("fused", runtimes["auto"])):
                g = rt.generate(batch, a.new_tokens, None)  # no EOS: every row decodes every step
                rates[name].append(len(batch) * (a.new_tokens - 1) / g.decode_s)
            if "hand" in rates:
                _, seconds = gqa.generate(prompt, a.new_tokens)
                rates["hand"].append((a.new_tokens - 1) / seconds)
        nodes = {form: len(onnx.load(str(rt.sessions.artifact_dir / "model.onnx"), load_external_data=False).graph.node)
                 for form, rt in runtimes.items()}
    s = {k: summary(v) for k, v in rates.items()}
    facts = machine_facts()
    print(format_facts(facts))
    print(f"model: bench/decode.py's random Llama, {a.layers} layers, hidden {a.hidden}; batch {args.batch} (prompts "
          f"of {[len(p) for p in batch]} tokens), {a.new_tokens} new tokens, {rounds} interleaved rounds, threads "
          f"{a.threads}; tok/s counts every row's tokens; the fused and plain builds' tokens are equal")
    print(f"nodes a step: qbuild plain {nodes['plain']}, qbuild fused {nodes['auto']}, hand-built {dims['nodes']}; "
          f"logits equal qbuild plain's to {diffs['fused']:.1e} (fused) and {diffs['hand']:.1e} (hand-built) of "
          f"their spread")
    print(f"{'':<44}{'tok/s min':>10}{'median':>9}{'max':>9}")
    labels = {"plain": "qbuild fp32, attention=plain", "fused": "qbuild fp32, attention=auto (GroupQueryAttn)",
              "hand": "hand-built GroupQueryAttention graph"}
    for k, label in labels.items():
        if k in s:
            print(f"{label:<44}{s[k]['min']:>10.1f}{s[k]['median']:>9.1f}{s[k]['max']:>9.1f}")
    gain = [f / p for f, p in zip(rates["fused"], rates["plain"], strict=True)]  # per round: same minute
    left = [h / f for h, f in zip(rates.get("hand", []), rates["fused"], strict=False)] or [0.0]
    print(f"fused / plain per round: min {min(gain):.2f}x, median {statistics.median(gain):.2f}x"
          + (f"; hand-built / fused: median {statistics.median(left):.2f}x (what is left)" if "hand" in rates else ""))
    has_hand = "hand" in s

    def hand(value: float) -> float | None:
        return round(value, 3) if has_hand else None

    print(json.dumps({"bench": "gqa_ceiling", "quick": args.quick, "rounds": rounds, "batch": args.batch,
                      "plain_tok_s": round(s["plain"]["median"], 2), "plain_tok_s_min": round(s["plain"]["min"], 2),
                      "fused_tok_s": round(s["fused"]["median"], 2), "fused_tok_s_min": round(s["fused"]["min"], 2),
                      "gqa_tok_s": hand(s["hand"]["median"]) if has_hand else None,
                      "gqa_tok_s_min": hand(s["hand"]["min"]) if has_hand else None,
                      "fused_over_plain": round(statistics.median(gain), 3),
                      "fused_over_plain_min": round(min(gain), 3),
                      "hand_over_fused": hand(statistics.median(left)),
                      "nodes": {"plain": nodes["plain"], "fused": nodes["auto"], "hand": dims["nodes"]},
                      "gqa_nodes": dims["nodes"], "logit_diff_of_spread": diffs["hand"],
                      "fused_logit_diff_of_spread": diffs["fused"], "machine": facts}))


if __name__ == "__main__":
    main()
