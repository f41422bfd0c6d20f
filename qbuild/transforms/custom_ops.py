"""``custom_rmsnorm``: RMSNorm as the Cloud AI 100 custom op ``com.qti.aisw.onnx::CustomRMSNorm``.

Every RMSNorm module (a class named ``*RMSNorm`` with a ``weight`` or ``scale`` vector) gets a class swap
(weights untouched) whose forward calls the torch custom op ``qbuild::custom_rmsnorm``. Eagerly that op is
the usual math (``x * rsqrt(mean(x^2) + eps) * w`` in float32); under export it becomes one node
``CustomRMSNorm(hidden_states, weight, epsilon=eps)`` in domain ``com.qti.aisw.onnx``, and the exporter
appends an ONNX function of that name whose body is standard ops (Mul, ReduceMean, Add, Sqrt, Reciprocal),
so ONNX Runtime runs the graph while the qaic compiler sees its custom op. Gemma norms, which scale by
``1 + w``, pass ``w + 1`` (folded into a constant at export; the stored weight is not changed).
"""

from __future__ import annotations

from typing import Any

DOMAIN = "com.qti.aisw.onnx"
OP = "CustomRMSNorm"

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


def add_functions(model: Any, opset: int) -> bool:
    """Give ``model`` (ModelProto) the function bodies of the custom ops it uses; True when it changed."""
    from onnx import helper

    used = any(n.domain == DOMAIN and n.op_type == OP for n in model.graph.node)
    if not used:
        return False
    kept = [f for f in model.functions if not (f.domain == DOMAIN and f.name == OP)]
    del model.functions[:]
    model.functions.extend([*kept, rmsnorm_function(opset)])
    if not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    return True


def dynamo_translation_table() -> dict[Any, Any]:
    """For ``torch.onnx.export(dynamo=True)``: the custom op -> a ``CustomRMSNorm`` node (body added later)."""
    if "op" not in _REGISTERED:
        return {}
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
