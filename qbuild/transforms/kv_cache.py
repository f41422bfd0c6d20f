"""``kv_cache``: the static, retained-state KV cache of Cloud AI 100 (QEfficient's convention).

``apply(model)`` swaps the class of a loaded Hugging Face causal LM (in place, weights untouched) to a
subclass whose ``forward`` is::

    forward(input_ids [B,S] int64, position_ids [B,S] int64, past_key_0, past_value_0, ...)
        -> (logits [B,1,V] float32, past_key_0_RetainedState, past_value_0_RetainedState, ...)

Caches are ``[B, kv_heads, ctx_len, head_dim]`` for every layer (sliding-window and chunked layers keep a
full-length cache and restrict attention with their masks). The caches may also be passed as keyword
arguments ``past_key_{i}`` / ``past_value_{i}``.

* Position ids carry everything: a padding token has position -1. The new keys/values are scattered
  into the cache at their position ids (ScatterElements on axis 2; QEfficient's ``CtxScatter`` /
  ``CtxGather`` functions with ``kv_ops = "qaic"``, see :meth:`KVCausalLM.kv_update`). A padding token rewrites the slot
  of its row's last valid token with that token's own key/value (so duplicate indices carry identical
  values and the scatter is order-independent); a row that is all padding writes into slot
  ``ctx_len - 1``, which no query can see before a real token at that position overwrites it.
* The mask for a query at position ``p`` allows cache slots ``0..p`` (plus the window / chunk
  restrictions of the layer); masked scores take the dtype's minimum (finite, so an all-padding row
  stays finite). It is built from position ids only; there is no attention-mask input.
* Logits are computed for the last valid token of each row only (``argmax(position_ids)``).
* The fused form (ONNX Runtime's GroupQueryAttention, ``qbuild.transforms.models.llama.fused_attention``)
  narrows this contract: a row's valid tokens come first, at consecutive positions, and its padding is written
  at the slots after them (a row of padding only: the last slots of the cache), where no valid query looks
  before a real token overwrites them.

Family rewrites live in ``qbuild.transforms.models.<family>`` (looked up by ``config.model_type``).
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator
from typing import Any

import torch

#: config.model_type -> "module:Class" of the family's KV mixin
FAMILIES: dict[str, str] = {
    "llama": "qbuild.transforms.models.llama:KVLlama",
    "mistral": "qbuild.transforms.models.llama:KVLlama",
    "qwen2": "qbuild.transforms.models.llama:KVLlama",
    "qwen3": "qbuild.transforms.models.llama:KVLlama",
    "gpt2": "qbuild.transforms.models.gpt2:KVGPT2",
    "gemma3_text": "qbuild.transforms.models.gemma3:KVGemma3",
    "llama4_text": "qbuild.transforms.models.llama4:KVLlama4",
    "grok-1": "qbuild.transforms.models.grok1:KVGrok1",
    "llama_swiftkv": "qbuild.transforms.models.llama_swiftkv:KVLlamaSwiftKV",
}

_SWAPPED: dict[tuple[type, type], type] = {}


# ---------------------------------------------------------------------------------------------- ops
def scatter_plan(ctx_len: Any, position_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """What every cache write of one forward shares (computed once, not per layer and tensor): ``last [B,1]``,
    the index of the row's last valid token; ``pad [B,S]``; ``slot [B,S]``, the cache slot each token writes
    (padding rewrites its row's last valid token's slot; an all-padding row writes ``ctx_len - 1``)."""
    last = position_ids.argmax(dim=1, keepdim=True)  # [B,1] index of the row's last valid token
    top = position_ids.gather(1, last)  # [B,1] its position; -1 for an all-padding row
    pad = position_ids < 0  # [B,S]
    slot = torch.where(pad, top, position_ids)  # [B,S]
    slot = torch.where(slot < 0, torch.full_like(slot, ctx_len - 1), slot)
    return {"last": last, "pad": pad, "slot": slot}


def _static_key(name: str, heads: Any, head_dim: Any) -> tuple[str, int, int] | None:
    """A plan key for tensors of these static dims: plain ints, or the 0-d tensors a legacy (jit) trace gives for
    sizes; None for symbolic sizes (hashing one would specialise a dynamo export to the example's shape)."""
    dims = []
    for n in (heads, head_dim):
        if isinstance(n, int):
            dims.append(n)
        elif isinstance(n, torch.Tensor) and torch.jit.is_tracing():
            dims.append(int(n))  # a dict key only: nothing of it enters the graph
        else:
            return None
    return (name, *dims)  # type: ignore[return-value]


def _expanded(plan: dict[Any, Any], name: str, size: tuple[Any, Any, Any, Any]) -> torch.Tensor:
    """``plan[name] [B,S']`` expanded to ``size [B,H,S',D]``, made once per forward and static ``(H, D)``: the
    exported graph then computes it once instead of once per layer and tensor (keyed by the static dims only:
    batch and sequence are the same for every write of one forward)."""
    key = _static_key(name, size[1], size[3])
    index = plan.get(key) if key else None
    if index is None:
        index = plan[name][:, None, :, None].expand(*size)
        if key:
            plan[key] = index
    return index


def scatter_values(plan: dict[str, torch.Tensor], updates: torch.Tensor) -> torch.Tensor:
    """``updates [B,H,S,D]`` with each padding token's values replaced by its row's last valid token's."""
    b, h, _s, d = updates.shape
    index = _expanded(plan, "last", (b, h, 1, d))
    pad = plan.get("pad4")
    if pad is None:
        pad = plan["pad4"] = plan["pad"][:, None, :, None]
    return torch.where(pad, updates.gather(2, index), updates)  # a pad takes [B,H,1,D] of its row's last token


def scatter_slots(ctx_len: Any, position_ids: torch.Tensor,
                  updates: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The cache slots ``[B,S]`` and values ``[B,H,S,D]`` to write: padding rewrites the row's last valid
    token's slot with that token's values; an all-padding row writes slot ``ctx_len - 1`` (module doc)."""
    plan = scatter_plan(ctx_len, position_ids)
    return plan["slot"], scatter_values(plan, updates)


def ctx_scatter(cache: torch.Tensor, position_ids: torch.Tensor, updates: torch.Tensor,
                plan: dict[str, Any] | None = None) -> torch.Tensor:
    """Write ``updates [B,H,S,D]`` into ``cache [B,H,C,D]`` at slots ``position_ids [B,S]`` (see module doc).

    ``plan``: a dict shared by the writes of one forward (:func:`scatter_plan`, and the expanded scatter index
    per cache shape): the exported graph then computes them once instead of once per layer and tensor."""
    if plan is None:
        plan = scatter_plan(cache.shape[2], position_ids)
    return cache.scatter(2, _expanded(plan, "slot", tuple(updates.shape)), scatter_values(plan, updates))


def qaic_update(cache_k: torch.Tensor, cache_v: torch.Tensor, position_ids: torch.Tensor, k: torch.Tensor,
                v: torch.Tensor, invalid_index: int | None = None) -> tuple[torch.Tensor, ...]:
    """QEfficient's cache update (``QEffDynamicLayer.update``, reference 3.3): ``CtxScatter`` the new keys and
    values, then ``CtxGather`` every slot with slots past the row's largest position id given the invalid
    index (INT32_MAX; 0 with ONNX subfunctions, as QEfficient's ``InvalidIndexProvider``), and the values read
    there zeroed. Returns (new caches k, v, what attention reads k, v)."""
    from qbuild.transforms.custom_ops import INVALID_INDEX, ctx_gather
    from qbuild.transforms.custom_ops import ctx_scatter as scatter_op

    if invalid_index is None:
        invalid_index = INVALID_INDEX
    slot, k = scatter_slots(cache_k.shape[2], position_ids, k)
    _, v = scatter_slots(cache_v.shape[2], position_ids, v)
    cache_k, cache_v = scatter_op(cache_k, slot, k), scatter_op(cache_v, slot, v)  # [B,H,C,D]
    ctx_indices = torch.arange(cache_k.shape[2], dtype=torch.int64)[None, None, :]  # [1,1,C]
    limit = position_ids.max(dim=1, keepdim=True).values[:, :, None]  # [B,1,1]
    invalid = ctx_indices > limit  # [B,1,C]
    ctx_indices = torch.where(invalid, torch.full_like(ctx_indices, invalid_index), ctx_indices)  # [B,1,C]
    k_read, v_read = ctx_gather(cache_k, ctx_indices), ctx_gather(cache_v, ctx_indices)  # [B,H,C,D]
    v_read = torch.where(invalid[..., None], torch.zeros((), dtype=v_read.dtype), v_read)
    return cache_k, cache_v, k_read, v_read


@contextlib.contextmanager
def kv_ops(model: Any, ops: str) -> Iterator[None]:
    """Set a rewritten model's cache ops (``plain`` or ``qaic``) for the time of the block."""
    if ops not in ("plain", "qaic"):
        raise ValueError(f"unknown kv_ops {ops!r}; expected plain or qaic")
    if ops == "qaic":
        from qbuild.transforms.custom_ops import register_ctx_ops

        register_ctx_ops()  # before an exporter builds its table of custom ops
    before = model.__dict__.get("kv_ops")
    model.kv_ops = ops
    try:
        yield
    finally:
        if before is None:
            del model.kv_ops
        else:
            model.kv_ops = before


class KVLayerFunction:
    """Mixin put in front of a decoder layer's class for an export with ``compile.qaic.use_onnx_subfunctions``:
    the model's forward then calls each layer as a module, ``layer(h, ctx, past_k, past_v)``, so that the
    legacy exporter's ``export_modules_as_functions`` makes one ONNX function of the layer class, called once
    per layer. The layer keeps its weights and their names; :func:`layer_functions` swaps it back after."""

    def forward(self, h: torch.Tensor, ctx: dict[str, Any], past_k: torch.Tensor,
                past_v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        owner, i = self.__dict__["kv_owner"], self.__dict__["kv_index"]  # plain attributes, not submodules
        return owner.kv_layer(i, self, h, ctx, past_k, past_v)


@contextlib.contextmanager
def layer_functions(model: Any) -> Iterator[set[type]]:
    """Swap every decoder layer of a rewritten ``model`` to a :class:`KVLayerFunction` subclass of its class for
    the time of the block (and the cache's invalid index to 0, QEfficient's subfunction convention); yields the
    swapped classes, the ``export_modules_as_functions`` argument. Classes, attributes and the forward hooks
    the exporter leaves on every module are put back afterwards."""
    layers = list(model.kv_layers())
    before = [type(layer) for layer in layers]
    hooks = {id(m): (dict(m._forward_hooks), dict(m._forward_pre_hooks)) for m in model.modules()}
    for i, layer in enumerate(layers):
        base = type(layer)
        if (KVLayerFunction, base) not in _SWAPPED:
            _SWAPPED[(KVLayerFunction, base)] = type(f"KV{base.__name__}", (KVLayerFunction, base),
                                                     {"__module__": __name__})
        layer.__class__ = _SWAPPED[(KVLayerFunction, base)]
        layer.__dict__.update(kv_owner=model, kv_index=i)
    model.kv_sub_functions = True
    stack = contextlib.ExitStack()
    try:
        stack.enter_context(_exporter_patches())
        yield {type(layer) for layer in layers}
    finally:
        stack.close()
        del model.kv_sub_functions
        for layer, base in zip(layers, before, strict=True):
            layer.__class__ = base
            for name in ("kv_owner", "kv_index"):
                layer.__dict__.pop(name, None)
        for m in model.modules():
            if id(m) in hooks:
                forward, pre = hooks[id(m)]
                for kept, now in ((forward, m._forward_hooks), (pre, m._forward_pre_hooks)):
                    for key in [k for k in now if k not in kept]:
                        del now[key]


@contextlib.contextmanager
def _exporter_patches() -> Iterator[None]:
    """Two changes to the legacy exporter for the time of a subfunction export (QEfficient patches it too,
    ``apply_torch_patches``): it records no module attributes as function attributes (it would record every
    annotated attribute and fails on those that are not IValues, such as a Hugging Face model's ``config``;
    the layer functions take none), and it skips common-subexpression elimination, which would merge the
    layers' identical computations on shared inputs (rope, cache slots from position ids) into the first
    layer and give each layer a different signature, hence one function per layer."""
    try:
        from torch.onnx._internal.torchscript_exporter import utils
    except ImportError:  # another torch: its exporter as it is
        yield
        return
    patches = [(utils, "_get_module_attributes", lambda module: {}), (torch._C, "_jit_pass_cse", lambda graph: False)]
    kept = [(owner, name, getattr(owner, name)) for owner, name, _new in patches if hasattr(owner, name)]
    for owner, name, new in patches:
        setattr(owner, name, new)
    try:
        yield
    finally:
        for owner, name, original in kept:
            setattr(owner, name, original)


def causal_mask(
    position_ids: torch.Tensor, ctx_len: Any, *, window: int | None = None, chunk: int | None = None
) -> torch.Tensor:
    """Boolean ``[B,1,S,C]``: may the query at ``position_ids[b,s]`` see cache slot ``c``."""
    kv = torch.arange(ctx_len, dtype=position_ids.dtype, device=position_ids.device)[None, None, :]  # [1,1,C]
    q = position_ids[:, :, None]  # [B,S,1]
    allowed = kv <= q
    if window is not None:
        allowed = allowed & (kv > q - window)
    if chunk is not None:
        allowed = allowed & (torch.div(kv, chunk, rounding_mode="floor") == torch.div(q, chunk, rounding_mode="floor"))
    return allowed[:, None]  # [B,1,S,C]


def repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """``[B,Hkv,C,D] -> [B,Hkv*groups,C,D]`` (grouped-query attention)."""
    if groups == 1:
        return x
    b, h, c, d = x.shape
    return x[:, :, None].expand(b, h, groups, c, d).reshape(b, h * groups, c, d)


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    scaling: float,
    softcap: float | None = None,
    softmax_fp32: bool = True,
    repeat: bool = False,
    folded_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Masked attention of ``q [B,Hq,S,D]`` over the cache ``k, v [B,Hkv,C,D]``; returns ``[B,S,Hq*D]``.

    ``repeat``: grouped-query attention as QEfficient exports it (``repeat_kv``: the cache expanded per query
    head; the qaic graph keeps that form), else by folding the query heads (below). ``folded_mask``: ``mask``
    as :func:`fold_mask` gives it (once per forward), which spares the scores two reshapes per layer."""
    b, hq, s, d = q.shape
    if repeat and hq != k.shape[1]:
        k, v = repeat_kv(k, hq // k.shape[1]), repeat_kv(v, hq // v.shape[1])
    hkv = k.shape[1]
    groups = hq // hkv
    # grouped-query attention without repeat_kv's copy of the whole cache per query head: the ``groups`` query
    # heads that share a KV head are ``groups * S`` query rows of that head (head ``kv * groups + j`` reads KV
    # head ``kv``, as repeat_kv orders them); the same dot products, the cache read once
    if groups > 1:
        q = q.contiguous().reshape(b, hkv, groups * s, d)
    scores = torch.matmul(q, k.transpose(2, 3)) * scaling  # [B,Hkv,groups*S,C]
    unfold = groups > 1 and folded_mask is None
    if unfold:
        scores = scores.reshape(b, hq, s, k.shape[2])  # [B,Hq,S,C]
    elif groups > 1:
        mask = folded_mask  # [B,1,groups*S,C]: the mask of each folded query row
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = torch.where(mask, scores, torch.finfo(scores.dtype).min)
    if softmax_fp32:
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    else:
        probs = torch.softmax(scores, dim=-1)
    if unfold:
        probs = probs.reshape(b, hkv, groups * s, k.shape[2])
    out = torch.matmul(probs, v)  # [B,Hkv,groups*S,D]
    if groups > 1:
        out = out.reshape(b, hq, s, v.shape[-1])  # [B,Hq,S,D]
    return out.transpose(1, 2).reshape(b, s, hq * v.shape[-1])


def fold_mask(ctx: dict[str, Any], kind: Any, mask: torch.Tensor, groups: int) -> torch.Tensor | None:
    """``mask [B,1,S,C]`` for :func:`attend`'s folded query rows (row ``j * S + s`` is query head ``j`` of a KV
    head at position ``s``): ``[B,1,groups*S,C]``, made once per forward and mask kind; None for ``groups`` 1."""
    if groups == 1:
        return None
    key = ("folded_mask", kind, groups)
    if key not in ctx:
        ctx[key] = mask.repeat(1, 1, groups, 1)
    return ctx[key]


def last_valid(hidden: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """``hidden [B,S,H]`` at each row's largest position id: ``[B,1,H]``."""
    idx = position_ids.argmax(dim=1)  # [B]
    return hidden.gather(1, idx[:, None, None].expand(-1, 1, hidden.shape[-1]))


#: a head block is at most this large, or the largest other Linear weight if that is larger
HEAD_BLOCK_BYTES = 16 << 20
HEAD_BLOCKS = "kv_head_blocks"


def head_block_count(model: torch.nn.Module, weight: torch.Tensor) -> int:
    """How many column blocks the output head ``weight [V,H]`` is cut into: none larger than the model's largest
    other Linear weight (or :data:`HEAD_BLOCK_BYTES`), so that the head alone does not set the peak of ONNX
    Runtime's prepacking (125M Llama: a 94 MiB head against 6 MiB MLP weights)."""
    other = max((m.weight.numel() * m.weight.element_size() for m in model.modules()
                 if isinstance(m, torch.nn.Linear) and m.weight is not weight), default=0)
    size = weight.numel() * weight.element_size()
    return max(1, -(-size // max(other, HEAD_BLOCK_BYTES)))


@contextlib.contextmanager
def head_blocks(model: Any) -> Iterator[int]:
    """For the time of the block, a large bias-free output head computes its logits as column blocks of its
    weight, each its own parameter (a view: no copy), concatenated: the same dot products, and each block is
    its own initializer in the exported graph. ONNX Runtime prepacks one initializer at a time when a session
    opens, so its transient copy is one block, not the whole head (125M Llama: the compile stage's peak RSS
    -70 MiB). Yields the number of blocks (1: nothing changed)."""
    head = getattr(model, "lm_head", None)
    weight = getattr(head, "weight", None)
    if not isinstance(weight, torch.Tensor) or getattr(head, "bias", None) is not None:
        yield 1
        return
    n = head_block_count(model, weight)
    if n == 1:
        yield 1
        return
    size = -(-weight.shape[0] // n)
    model._modules[HEAD_BLOCKS] = torch.nn.ParameterList(
        [torch.nn.Parameter(w, requires_grad=False) for w in weight.detach().split(size, 0)])
    try:
        yield n
    finally:
        del model._modules[HEAD_BLOCKS]


# ------------------------------------------------------------------------------------- base class
class KVCausalLM:
    """Mixin put in front of the Hugging Face class; families override the ``kv_*`` hooks."""

    kv_family = "base"
    #: how the cache is written and read: ``plain`` (ScatterElements, the cache itself) or ``qaic``
    #: (QEfficient's CtxScatter / CtxGather functions); set per export with :func:`kv_ops`
    kv_ops = "plain"
    #: decoder layers called as modules (ONNX functions) and the invalid cache index 0: see
    #: :func:`layer_functions`
    kv_sub_functions = False

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, *past: torch.Tensor,
                **named: torch.Tensor) -> tuple[torch.Tensor, ...]:
        past_kv = self.kv_collect(past, named)
        position_ids = position_ids.to(torch.int64)
        ctx = self.kv_context(input_ids, position_ids, past_kv[0].shape[2])
        h = self.kv_embed(input_ids, position_ids)  # [B,S,H]
        new: list[torch.Tensor] = []
        for i, layer in enumerate(self.kv_layers()):
            if isinstance(layer, KVLayerFunction):  # an export with ONNX subfunctions: one function per layer
                h, k, v = layer(h, ctx, past_kv[2 * i], past_kv[2 * i + 1])
            else:
                h, k, v = self.kv_layer(i, layer, h, ctx, past_kv[2 * i], past_kv[2 * i + 1])
            new += [k, v]
        h = last_valid(h, position_ids)  # [B,1,H]: the norm and head act per position
        logits = self.kv_logits(self.kv_final_norm(h)).float()  # [B,1,V]
        return (logits, *new)

    def kv_collect(self, past: tuple[torch.Tensor, ...], named: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """The caches in layer order ``[k0, v0, k1, v1, ...]`` from positional or named arguments."""
        n = self.kv_num_layers()
        if named:
            unknown = set(named) - {f"past_{kind}_{i}" for i in range(n) for kind in ("key", "value")}
            if unknown or past:
                raise TypeError(f"pass the caches either positionally or as past_key_i/past_value_i; got {unknown}")
            past = tuple(named[f"past_{kind}_{i}"] for i in range(n) for kind in ("key", "value"))
        if len(past) != 2 * n:
            raise TypeError(f"expected {2 * n} caches (past_key_i, past_value_i for {n} layers), got {len(past)}")
        return list(past)

    def kv_num_layers(self) -> int:
        return len(self.kv_layers())

    def kv_cache_shape(self) -> tuple[int, int]:
        """``(num_kv_heads, head_dim)`` of every layer's cache."""
        raise NotImplementedError

    def kv_layers(self) -> Any:
        raise NotImplementedError

    def kv_context(self, input_ids: torch.Tensor, position_ids: torch.Tensor, ctx_len: Any) -> dict[str, Any]:
        """What every layer shares: position ids, masks, rotary tables."""
        raise NotImplementedError

    def kv_embed(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def kv_layer(self, i: int, layer: Any, h: torch.Tensor, ctx: dict[str, Any], past_k: torch.Tensor,
                 past_v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def kv_final_norm(self, h: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def kv_update(self, ctx: dict[str, Any], past_k: torch.Tensor, past_v: torch.Tensor, k: torch.Tensor,
                  v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Write ``k, v [B,Hkv,S,D]`` into the caches ``[B,Hkv,C,D]``: (new caches, what attention reads)."""
        if self.kv_ops == "qaic":
            invalid = 0 if self.kv_sub_functions else None  # QEfficient's InvalidIndexProvider
            return qaic_update(past_k, past_v, ctx["position_ids"], k, v, invalid)  # type: ignore[return-value]
        plan = ctx.get("scatter_plan")  # one per forward (every layer's cache has the same ctx_len)
        if plan is None:
            plan = ctx["scatter_plan"] = scatter_plan(past_k.shape[2], ctx["position_ids"])
        past_k = ctx_scatter(past_k, ctx["position_ids"], k, plan)
        past_v = ctx_scatter(past_v, ctx["position_ids"], v, plan)
        return past_k, past_v, past_k, past_v

    def kv_logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.kv_head(h)

    def kv_head(self, h: torch.Tensor) -> torch.Tensor:
        """``lm_head(h)``, or by column blocks while :func:`head_blocks` holds them (an ONNX Runtime export)."""
        blocks = self._modules.get(HEAD_BLOCKS)  # type: ignore[attr-defined]
        if blocks is None or self.kv_ops != "plain":
            return self.lm_head(h)  # type: ignore[attr-defined]
        return torch.cat([torch.nn.functional.linear(h, w) for w in blocks], dim=-1)

    def kv_prepare(self) -> dict[str, Any]:
        """Called once after the class swap (checks, weight-free set-up); returns report entries."""
        return {}

    def kv_empty_cache(self, batch_size: int, ctx_len: int) -> list[torch.Tensor]:
        """Zero caches ``[k0, v0, ...]`` for a fresh sequence."""
        heads, head_dim = self.kv_cache_shape()
        dtype = next(self.parameters()).dtype  # type: ignore[attr-defined]
        return [torch.zeros(batch_size, heads, ctx_len, head_dim, dtype=dtype) for _ in range(2 * self.kv_num_layers())]


# ------------------------------------------------------------------------------------- transform
def family_mixin(model_type: str) -> type:
    """The KV mixin class of a ``config.model_type``; unknown types list the supported ones."""
    if model_type not in FAMILIES:
        raise ValueError(f"no kv_cache rewrite for model_type {model_type!r}; supported: {', '.join(sorted(FAMILIES))}")
    module, _, cls = FAMILIES[model_type].partition(":")
    return getattr(importlib.import_module(module), cls)


def apply(model: Any) -> dict[str, Any]:
    """Rewrite ``model`` in place into the retained-state KV form; returns a JSON-able report."""
    if isinstance(model, KVCausalLM):
        raise ValueError("kv_cache is already applied to this model")
    model_type = model.config.model_type
    mixin = family_mixin(model_type)
    base = type(model)
    if (mixin, base) not in _SWAPPED:
        _SWAPPED[(mixin, base)] = type(f"KV{base.__name__}", (mixin, base), {"__module__": mixin.__module__})
    model.__class__ = _SWAPPED[(mixin, base)]
    extra = model.kv_prepare()
    heads, head_dim = model.kv_cache_shape()
    return {
        "family": mixin.kv_family,
        "model_type": model_type,
        "class": type(model).__name__,
        "num_layers": model.kv_num_layers(),
        "num_kv_heads": heads,
        "head_dim": head_dim,
        **extra,
    }
