"""Cloud AI 100 custom ops as ONNX functions: ``CustomRMSNorm`` and the KV cache's ``CtxScatter`` / ``CtxGather``.

``custom_rmsnorm``: RMSNorm as the Cloud AI 100 custom op ``com.qti.aisw.onnx::CustomRMSNorm``.

Every RMSNorm module (a class named ``*RMSNorm`` with a ``weight`` or ``scale`` vector) gets a class swap
(weights untouched) whose forward calls the torch custom op ``qbuild::custom_rmsnorm``. Eagerly that op is
the usual math (``x * rsqrt(mean(x^2) + eps) * w`` in float32); under export it becomes one node
``CustomRMSNorm(hidden_states, weight, epsilon=eps)`` in domain ``com.qti.aisw.onnx``, and the exporter
appends an ONNX function of that name whose body is standard ops (Mul, ReduceMean, Add, Sqrt, Reciprocal),
so ONNX Runtime runs the graph while the qaic compiler sees its custom op. Gemma norms, which scale by
``1 + w``, pass ``w + 1`` (folded into a constant at export; the stored weight is not changed).

``CtxScatter(data, position_ids, updates)`` and ``CtxGather(data, ctx_indices)`` (domain
``com.qualcomm.cloud``, QEfficient's ``customop/ctx_scatter_gather.py``; ../shared/reference/qefficient.md
3.3) write and read the retained-state KV cache: the scatter is ``ScatterND`` at ``[batch, head,
position]``, the gather ``GatherND(batch_dims=2)``. An index past the cache (INT32_MAX, the "invalid index"
QEfficient writes for positions beyond the row's last valid token) reads the last slot in the function
body, where QEfficient's ORT tests patch the constant to 0 instead: either way the row is never seen (the
mask hides its key, the caller zeroes its value), so ONNX Runtime runs the exported graph unchanged.
``swapped_rmsnorm`` and the KV rewrite's ``kv_ops = "qaic"`` put these ops in a graph for the time of an
export (qbuild.tasks.kv_causal_lm).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

DOMAIN = "com.qti.aisw.onnx"
OP = "CustomRMSNorm"
CTX_DOMAIN = "com.qualcomm.cloud"
CTX_SCATTER, CTX_GATHER = "CtxScatter", "CtxGather"
#: the "invalid index" of a cache slot beyond the row's last valid position (QEfficient's InvalidIndexProvider)
INVALID_INDEX = 2**31 - 1

_REGISTERED: dict[str, Any] = {}
_SWAPPED: dict[type, type] = {}


def _torch_op() -> Any:
    """``torch.ops.qbuild.custom_rmsnorm``, defined once, with a legacy-exporter symbolic."""
    if "op" in _REGISTERED:
        return _REGISTERED["op"]
    import torch

    schema = "(Tensor x, Tensor weight, float eps) -> Tensor"  # explicit: annotations here are strings

    @torch.library.custom_op("qbuild::custom_rmsnorm", mutates_args=(), schema=schema)
    def custom_rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
        return (h * weight.float()).to(x.dtype)

    @custom_rmsnorm.register_fake
    def _(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        return torch.empty_like(x)

    from torch.onnx import symbolic_helper

    @symbolic_helper.parse_args("v", "v", "f")
    def symbolic(g: Any, x: Any, weight: Any, eps: float) -> Any:
        out = g.op(f"{DOMAIN}::{OP}", x, weight, epsilon_f=eps)
        out.setType(x.type())
        return out

    for opset in range(13, 22):
        torch.onnx.register_custom_op_symbolic("qbuild::custom_rmsnorm", symbolic, opset)
    _REGISTERED["op"] = torch.ops.qbuild.custom_rmsnorm.default
    return _REGISTERED["op"]


class CustomRMSNormMixin:
    """Forward of a swapped RMSNorm: the custom op on ``weight`` (+1 for Gemma-style norms)."""

    qbuild_weight_offset = 0.0

    def forward(self, x: Any) -> Any:
        weight = getattr(self, "weight", None)
        if weight is None:
            weight = self.scale  # type: ignore[attr-defined]  # Grok-1 names it scale
        if self.qbuild_weight_offset:
            weight = weight + self.qbuild_weight_offset
        eps = getattr(self, "variance_epsilon", None) or getattr(self, "eps", 1e-6)
        return _torch_op()(x, weight, float(eps))


def _is_rmsnorm(module: Any) -> bool:
    name = type(module).__name__
    has_vector = getattr(module, "weight", None) is not None or getattr(module, "scale", None) is not None
    return name.endswith("RMSNorm") and has_vector and not isinstance(module, CustomRMSNormMixin)


def apply_custom_rmsnorm(model: Any) -> dict[str, Any]:
    """Swap every RMSNorm in ``model`` to the custom op; returns the swapped class names and count."""
    _torch_op()
    swapped: dict[str, int] = {}
    for module in model.modules():
        if not _is_rmsnorm(module):
            continue
        base = type(module)
        if base not in _SWAPPED:
            offset = 1.0 if base.__name__.startswith("Gemma") else 0.0
            _SWAPPED[base] = type(f"Custom{base.__name__}", (CustomRMSNormMixin, base),
                                  {"qbuild_weight_offset": offset, "__module__": __name__})
        module.__class__ = _SWAPPED[base]
        swapped[base.__name__] = swapped.get(base.__name__, 0) + 1
    return {"domain": DOMAIN, "op": OP, "swapped": swapped}


@contextlib.contextmanager
def swapped_rmsnorm(model: Any) -> Iterator[dict[str, Any]]:
    """``apply_custom_rmsnorm`` for the time of the block, then the swapped modules get their classes back
    (a model shared with other builds in this process is left as it was); yields the report."""
    before = {id(module): type(module) for module in model.modules() if _is_rmsnorm(module)}
    report = apply_custom_rmsnorm(model)
    try:
        yield report
    finally:
        for module in model.modules():
            if id(module) in before:
                module.__class__ = before[id(module)]


# ------------------------------------------------------------------------------------ KV cache ops
def _ctx_ops() -> tuple[Any, Any]:
    """``torch.ops.qbuild.ctx_scatter`` / ``ctx_gather``, defined once, with legacy-exporter symbolics."""
    if "ctx" in _REGISTERED:
        return _REGISTERED["ctx"]
    import torch
    from torch.onnx import symbolic_helper

    @torch.library.custom_op("qbuild::ctx_scatter", mutates_args=(),
                             schema="(Tensor data, Tensor position_ids, Tensor updates) -> Tensor")
    def ctx_scatter(data: torch.Tensor, position_ids: torch.Tensor, updates: torch.Tensor) -> torch.Tensor:
        b, h, s, d = updates.shape
        return data.scatter(2, position_ids[:, None, :, None].expand(b, h, s, d), updates)  # [B,H,C,D]

    @ctx_scatter.register_fake
    def _(data: torch.Tensor, position_ids: torch.Tensor, updates: torch.Tensor) -> torch.Tensor:
        return torch.empty_like(data)

    @torch.library.custom_op("qbuild::ctx_gather", mutates_args=(),
                             schema="(Tensor data, Tensor ctx_indices) -> Tensor")
    def ctx_gather(data: torch.Tensor, ctx_indices: torch.Tensor) -> torch.Tensor:
        b, h, c, d = data.shape
        idx = ctx_indices.clamp(max=c - 1).expand(b, h, ctx_indices.shape[-1])  # [B,H,Ci]: invalid -> last slot
        return data.gather(2, idx[..., None].expand(b, h, idx.shape[-1], d))  # [B,H,Ci,D]

    @ctx_gather.register_fake
    def _(data: torch.Tensor, ctx_indices: torch.Tensor) -> torch.Tensor:
        return data.new_empty((data.shape[0], data.shape[1], ctx_indices.shape[-1], data.shape[3]))

    @symbolic_helper.parse_args("v", "v", "v")
    def scatter_symbolic(g: Any, data: Any, position_ids: Any, updates: Any) -> Any:
        out = g.op(f"{CTX_DOMAIN}::{CTX_SCATTER}", data, position_ids, updates)
        out.setType(data.type())
        return out

    @symbolic_helper.parse_args("v", "v")
    def gather_symbolic(g: Any, data: Any, ctx_indices: Any) -> Any:
        out = g.op(f"{CTX_DOMAIN}::{CTX_GATHER}", data, ctx_indices)
        out.setType(data.type())
        return out

    for opset in range(13, 22):
        torch.onnx.register_custom_op_symbolic("qbuild::ctx_scatter", scatter_symbolic, opset)
        torch.onnx.register_custom_op_symbolic("qbuild::ctx_gather", gather_symbolic, opset)
    _REGISTERED["ctx"] = (torch.ops.qbuild.ctx_scatter.default, torch.ops.qbuild.ctx_gather.default)
    return _REGISTERED["ctx"]


def register_ctx_ops() -> None:
    """Define the torch ops of CtxScatter / CtxGather (and their legacy-exporter symbolics) now."""
    _ctx_ops()


def ctx_scatter(data: Any, position_ids: Any, updates: Any) -> Any:
    """``CtxScatter``: ``updates [B,H,S,D]`` written into ``data [B,H,C,D]`` at slots ``position_ids [B,S]``."""
    return _ctx_ops()[0](data, position_ids, updates)


def ctx_gather(data: Any, ctx_indices: Any) -> Any:
    """``CtxGather``: the rows ``ctx_indices [B|1,1,Ci]`` of ``data [B,H,C,D]``: ``[B,H,Ci,D]``."""
    return _ctx_ops()[1](data, ctx_indices)


# ------------------------------------------------------------------------------------ ONNX side
def rmsnorm_function(opset: int) -> Any:
    """The ``FunctionProto`` of ``CustomRMSNorm`` with a standard-op body for default-domain ``opset``."""
    from onnx import AttributeProto, TensorProto, helper

    eps = helper.make_node("Constant", [], ["eps"])
    eps.attribute.append(AttributeProto(name="value_float", ref_attr_name="epsilon", type=AttributeProto.FLOAT))
    if opset >= 18:
        axes = [helper.make_node("Constant", [], ["axes"], value=helper.make_tensor("a", TensorProto.INT64, [1], [-1]))]
        mean = helper.make_node("ReduceMean", ["sq", "axes"], ["ms"], keepdims=1)
    else:
        axes, mean = [], helper.make_node("ReduceMean", ["sq"], ["ms"], axes=[-1], keepdims=1)
    nodes = [
        eps, *axes,
        helper.make_node("Mul", ["hidden_states", "hidden_states"], ["sq"]),
        mean,
        helper.make_node("CastLike", ["eps", "ms"], ["eps_t"]),
        helper.make_node("Add", ["ms", "eps_t"], ["var"]),
        helper.make_node("Sqrt", ["var"], ["rms"]),
        helper.make_node("Reciprocal", ["rms"], ["inv"]),
        helper.make_node("Mul", ["hidden_states", "inv"], ["normed"]),
        helper.make_node("CastLike", ["weight", "normed"], ["w"]),
        helper.make_node("Mul", ["normed", "w"], ["output"]),
    ]
    return helper.make_function(DOMAIN, OP, ["hidden_states", "weight"], ["output"], nodes,
                                [helper.make_opsetid("", opset)], attributes=["epsilon"])


def _const(name: str, values: list[int], scalar: bool = False) -> Any:
    from onnx import TensorProto, helper

    dims = [] if scalar else [len(values)]
    return helper.make_node("Constant", [], [name], value=helper.make_tensor(name, TensorProto.INT64, dims, values))


def ctx_scatter_function(opset: int) -> Any:
    """``CtxScatter(data, position_ids, updates)``: ``ScatterND`` at indices ``[batch, head, position]``."""
    from onnx import helper

    n = helper.make_node
    nodes = [
        _const("i0", [0]), _const("i1", [1]), _const("zero", [0], scalar=True), _const("one", [1], scalar=True),
        _const("ax_b", [1, 2, 3]), _const("ax_h", [0, 2, 3]), _const("ax_p", [1, 3]),
        n("Shape", ["data"], ["sd"]), n("Shape", ["position_ids"], ["sp"]),
        n("Gather", ["sd", "i0"], ["b1"]), n("Gather", ["sd", "i1"], ["h1"]), n("Gather", ["sp", "i1"], ["s1"]),
        n("Concat", ["b1", "h1", "s1", "i1"], ["exp_shape"], axis=0),  # [B,H,S,1]
        n("Squeeze", ["b1", "i0"], ["b"]), n("Squeeze", ["h1", "i0"], ["h"]),
        n("Range", ["zero", "b", "one"], ["br"]), n("Unsqueeze", ["br", "ax_b"], ["bu"]),
        n("Expand", ["bu", "exp_shape"], ["batch_idx"]),
        n("Range", ["zero", "h", "one"], ["hr"]), n("Unsqueeze", ["hr", "ax_h"], ["hu"]),
        n("Expand", ["hu", "exp_shape"], ["head_idx"]),
        n("Unsqueeze", ["position_ids", "ax_p"], ["pu"]), n("Expand", ["pu", "exp_shape"], ["ctx_idx"]),
        n("Concat", ["batch_idx", "head_idx", "ctx_idx"], ["indices"], axis=3),  # [B,H,S,3]
        n("ScatterND", ["data", "indices", "updates"], ["output"]),
    ]
    return helper.make_function(CTX_DOMAIN, CTX_SCATTER, ["data", "position_ids", "updates"], ["output"], nodes,
                                [helper.make_opsetid("", opset)])


def ctx_gather_function(opset: int) -> Any:
    """``CtxGather(data, ctx_indices)``: ``GatherND(batch_dims=2)``; an index past the cache reads its last slot."""
    from onnx import helper

    n = helper.make_node
    nodes = [
        _const("i0", [0]), _const("i2", [2]), _const("i3", [3]), _const("last", [-1]), _const("end", [2**62]),
        _const("one", [1]),
        n("Shape", ["data"], ["sd"]), n("Shape", ["ctx_indices"], ["si"]),
        n("Slice", ["sd", "i0", "i2"], ["bh"]), n("Slice", ["si", "last", "end"], ["ci"]),
        n("Concat", ["bh", "ci"], ["target"], axis=0),  # [B,H,Ci]
        n("Slice", ["sd", "i2", "i3"], ["c"]), n("Sub", ["c", "one"], ["c_last"]),
        n("Min", ["ctx_indices", "c_last"], ["valid"]),  # INT32_MAX -> the last slot (never seen)
        n("Expand", ["valid", "target"], ["idx"]), n("Unsqueeze", ["idx", "last"], ["idx4"]),  # [B,H,Ci,1]
        n("GatherND", ["data", "idx4"], ["output"], batch_dims=2),  # [B,H,Ci,D]
    ]
    return helper.make_function(CTX_DOMAIN, CTX_GATHER, ["data", "ctx_indices"], ["output"], nodes,
                                [helper.make_opsetid("", opset)])


#: (domain, op) -> the function builder, for each custom op qbuild emits
FUNCTIONS = {(DOMAIN, OP): rmsnorm_function, (CTX_DOMAIN, CTX_SCATTER): ctx_scatter_function,
             (CTX_DOMAIN, CTX_GATHER): ctx_gather_function}


def add_functions(model: Any, opset: int) -> bool:
    """Give ``model`` (ModelProto) the function bodies of the custom ops it uses, in its graph or in the body
    of another function (a decoder layer exported as a function); True when it changed."""
    from onnx import helper

    calls = {(nd.domain, nd.op_type) for nd in model.graph.node}
    calls |= {(nd.domain, nd.op_type) for f in model.functions if (f.domain, f.name) not in FUNCTIONS for nd in f.node}
    used = [key for key in FUNCTIONS if key in calls]
    if not used:
        return False
    kept = [f for f in model.functions if (f.domain, f.name) not in used]
    del model.functions[:]
    model.functions.extend([*kept, *(FUNCTIONS[key](opset) for key in used)])
    for domain in dict.fromkeys(d for d, _ in used):
        if not any(o.domain == domain for o in model.opset_import):
            model.opset_import.append(helper.make_opsetid(domain, 1))
    return True


def dynamo_translation_table() -> dict[Any, Any]:
    """For ``torch.onnx.export(dynamo=True)``: each registered custom op -> its node (bodies added later)."""
    table = {}
    if "op" in _REGISTERED:
        table.update(_rmsnorm_translation())
    if "ctx" in _REGISTERED:
        table.update(_ctx_translation())
    return table


def _ctx_translation() -> dict[Any, Any]:
    import onnxscript
    from onnx.defs import OpSchema

    floats = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]
    param = OpSchema.FormalParameter
    scatter_schema = OpSchema(
        CTX_SCATTER, CTX_DOMAIN, 1,
        inputs=[param("data", "T"), param("position_ids", "I"), param("updates", "T")],
        outputs=[param("output", "T")],
        type_constraints=[("T", floats, "float tensors"), ("I", ["tensor(int64)"], "indices")],
    )
    gather_schema = OpSchema(
        CTX_GATHER, CTX_DOMAIN, 1, inputs=[param("data", "T"), param("ctx_indices", "I")],
        outputs=[param("output", "T")],
        type_constraints=[("T", floats, "float tensors"), ("I", ["tensor(int64)"], "indices")],
    )
    opset = onnxscript.values.Opset(CTX_DOMAIN, 1)
    scatter_op = onnxscript.values.Op(opset, CTX_SCATTER, scatter_schema)
    gather_op = onnxscript.values.Op(opset, CTX_GATHER, gather_schema)

    def scatter(data: Any, position_ids: Any, updates: Any) -> Any:
        return scatter_op(data, position_ids, updates)

    def gather(data: Any, ctx_indices: Any) -> Any:
        return gather_op(data, ctx_indices)

    scatter_torch, gather_torch = _REGISTERED["ctx"]
    return {scatter_torch: scatter, gather_torch: gather}


def _rmsnorm_translation() -> dict[Any, Any]:
    import onnxscript
    from onnx.defs import OpSchema

    schema = OpSchema(
        OP, DOMAIN, 1,
        inputs=[OpSchema.FormalParameter("hidden_states", "T"), OpSchema.FormalParameter("weight", "T")],
        outputs=[OpSchema.FormalParameter("output", "T")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "float tensors")],
        attributes=[OpSchema.Attribute("epsilon", OpSchema.AttrType.FLOAT, "added to the mean square")],
    )
    custom_rmsnorm = onnxscript.values.Op(onnxscript.values.Opset(DOMAIN, 1), OP, schema)

    def translate(x: Any, weight: Any, eps: float) -> Any:
        return custom_rmsnorm(x, weight, epsilon=eps)

    return {_REGISTERED["op"]: translate}
