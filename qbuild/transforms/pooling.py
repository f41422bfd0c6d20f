"""Pooling of encoder outputs, applied inside the exported graph (``pooling`` group).

Built-in methods take ``(last_hidden_states [B, S, H], attention_mask [B, S])``; masked positions never
contribute. ``pooling.method`` may also name a user function ``module:function`` with that signature.
``auto`` takes the pooling and normalisation from sentence-transformers metadata in the model directory
(``modules.json``, ``1_Pooling/config.json``), else mean without normalisation.

Everything except the pooling functions themselves and :func:`pooled_module` is torch-free.
"""

from __future__ import annotations

import ast
import hashlib
import importlib
import importlib.util
import inspect
import json
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qbuild.errors import ManifestError

if TYPE_CHECKING:
    import torch

#: built-in methods: mean, max, cls, avg (QEfficient's average_pool, made batch-correct), none
BUILTIN = ("mean", "max", "cls", "avg", "none")
#: every accepted value of pooling.method besides ``module:function``
METHODS = ("auto", *BUILTIN)
_CUSTOM = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
#: sentence-transformers' legacy Pooling config flags -> mode name
_ST_LEGACY = {
    "pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max", "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens", "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}
_SIG_HINT = "define it as def f(last_hidden_states, attention_mask) returning [batch, hidden] (or [batch, seq, hidden])"
_OPTIONS = f"{', '.join(METHODS)}, or module:function taking (last_hidden_states, attention_mask)"


# --- the pooling functions (torch) ----------------------------------------------------------------


def _mask3(attention_mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return attention_mask.unsqueeze(-1).to(like.dtype)  # [B, S, 1]


def mean_pooling(last_hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean over unmasked positions (sentence-transformers' formula): ``[B, H]``."""
    mask = _mask3(attention_mask, last_hidden_states)
    return (last_hidden_states * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


def avg_pooling(last_hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """QEfficient's ``average_pool`` for every batch row: masked sum / token count (no clamp): ``[B, H]``."""
    keep = attention_mask.unsqueeze(-1).bool()
    summed = last_hidden_states.masked_fill(~keep, 0.0).sum(1)
    return summed / attention_mask.sum(1, keepdim=True).to(last_hidden_states.dtype)


def max_pooling(last_hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Per-feature maximum over unmasked positions (not in place): ``[B, H]``."""
    import torch

    keep = attention_mask.unsqueeze(-1).bool()
    lowest = torch.finfo(last_hidden_states.dtype).min
    return last_hidden_states.masked_fill(~keep, lowest).max(dim=1).values


def cls_pooling(last_hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The first token's state: ``[B, H]``."""
    return last_hidden_states[:, 0]


def no_pooling(last_hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Token embeddings ``[B, S, H]`` with masked positions zeroed."""
    return last_hidden_states * _mask3(attention_mask, last_hidden_states)


_FUNCTIONS: dict[str, Callable[..., Any]] = {
    "mean": mean_pooling, "max": max_pooling, "cls": cls_pooling, "avg": avg_pooling, "none": no_pooling,
}


# --- names and user functions (no torch) ----------------------------------------------------------


def is_custom(method: str) -> bool:
    return ":" in method


def _error(msg: str, hint: str | None = None) -> ManifestError:
    return ManifestError(f"pooling.method: {msg}", key="pooling.method", hint=hint)


def check_method(method: str) -> None:
    """Cheap plan-time check: a known name, or ``module:function`` whose module can be found."""
    from qbuild.manifest.validate import suggest

    if method in METHODS:
        return
    if not is_custom(method):
        raise _error(f"unknown pooling {method!r}; options: {_OPTIONS}{suggest(method, METHODS)}")
    if not _CUSTOM.match(method):
        raise _error(f"{method!r} is not of the form module:function (e.g. mypkg.pool:first_token); "
                     f"options: {_OPTIONS}")
    module, _, func = method.partition(":")
    origin = _find_module(module)
    names = _top_level_names(origin) if origin else None
    if names is None:
        return  # not a readable .py file: the import at export time checks it
    if func not in names:
        funcs = ", ".join(sorted(n for n in names if not n.startswith("_"))) or "(none)"
        raise _error(f"module {module!r} ({origin}) defines no {func!r}; it defines: {funcs}")
    node = names[func]
    if isinstance(node, ast.Constant):
        raise _error(f"{method} is a {type(node.value).__name__} constant, not a function; it must be callable "
                     "as fn(last_hidden_states, attention_mask)")
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        _check_def(method, node.args)


def _check_def(method: str, a: ast.arguments) -> None:
    """The ``def`` must accept exactly two positional arguments (read from the source, nothing imported)."""
    positional = len(a.posonlyargs) + len(a.args)
    required = positional - len(a.defaults)
    kw_required = [arg.arg for arg, d in zip(a.kwonlyargs, a.kw_defaults, strict=True) if d is None]
    if (positional < 2 and a.vararg is None) or required > 2 or kw_required:
        shown = ", ".join(x.arg for x in [*a.posonlyargs, *a.args, *a.kwonlyargs])
        raise _error(f"{method}({shown}) cannot be called as fn(last_hidden_states, attention_mask)", hint=_SIG_HINT)


def _find_module(module: str) -> Path | None:
    """The module's source file (None for a built-in or namespace module); raise when it cannot be found."""
    with _cwd_on_path():
        try:
            spec = importlib.util.find_spec(module)
        except (ImportError, ValueError) as exc:
            spec, why = None, f"{type(exc).__name__}: {exc}"
        else:
            why = "not found"
    if spec is None:
        raise _error(f"cannot find module {module!r} for a user pooling function ({why})",
                     hint="the module must be importable: on PYTHONPATH or in the working directory")
    origin = spec.origin
    return Path(origin) if origin and origin.endswith(".py") else None


def _top_level_names(path: Path) -> dict[str, ast.AST] | None:
    """Names bound at a module's top level -> their def or assigned value, read with ``ast`` (nothing is
    executed); None if unreadable or a star import may bind anything."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (OSError, SyntaxError, ValueError):
        return None
    names: dict[str, ast.AST] = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names[node.name] = node
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            if any(a.name == "*" for a in node.names):
                return None
            names |= {(a.asname or a.name).split(".")[0]: node for a in node.names}
        elif isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            names[node.targets[0].id] = node.value
        else:
            names |= {n.id: node for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
    return names


class _cwd_on_path:
    """Make the working directory importable for the duration (console scripts do not add it)."""

    def __enter__(self) -> None:
        self.added = "" not in sys.path and str(Path.cwd()) not in sys.path
        if self.added:
            sys.path.append(str(Path.cwd()))

    def __exit__(self, *exc: object) -> None:
        if self.added and str(Path.cwd()) in sys.path:
            sys.path.remove(str(Path.cwd()))


def source_digest(method: str) -> str | None:
    """sha256 of a user function's module file (part of the export key), None for built-ins."""
    if not is_custom(method):
        return None
    origin = _find_module(method.partition(":")[0])
    return hashlib.sha256(origin.read_bytes()).hexdigest() if origin else None


def load_function(method: str) -> Callable[..., Any]:
    """The pooling callable for ``method``: a built-in, or an imported and validated user function."""
    if method in _FUNCTIONS:
        return _FUNCTIONS[method]
    check_method(method)
    if not is_custom(method):
        raise _error(f"{method!r} must be resolved before export (use resolve_pooling)")
    module, _, name = method.partition(":")
    with _cwd_on_path():
        try:
            mod = importlib.import_module(module)
        except Exception as exc:
            raise _error(f"importing {module!r} failed: {type(exc).__name__}: {exc}") from exc
    fn = getattr(mod, name, None)
    if fn is None:
        raise _error(f"module {module!r} has no attribute {name!r}")
    if not callable(fn):
        raise _error(f"{method} is a {type(fn).__name__}, not a function; it must be callable as "
                     "fn(last_hidden_states, attention_mask)")
    _check_signature(method, fn)
    return fn


def _check_signature(method: str, fn: Callable[..., Any]) -> None:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return  # a builtin without a signature: the export's trial call checks it
    try:
        sig.bind(object(), object())
    except TypeError as exc:
        raise _error(f"{method}{sig} cannot be called as fn(last_hidden_states, attention_mask): {exc}",
                     hint=_SIG_HINT) from exc


# --- sentence-transformers metadata and resolution ------------------------------------------------


@dataclass(frozen=True)
class Pooling:
    """A resolved pooling: the method, whether to L2-normalise, and where the choice came from."""

    method: str
    normalize: bool
    origin: str

    def as_dict(self) -> dict[str, Any]:
        return {"method": self.method, "normalize": self.normalize, "origin": self.origin}


def st_metadata(model_dir: Path | None) -> tuple[str | None, bool | None]:
    """(pooling, normalize) from sentence-transformers files in ``model_dir``; (None, None) without them."""
    modules_file = Path(model_dir) / "modules.json" if model_dir else None
    if modules_file is None or not modules_file.is_file():
        return None, None
    try:
        modules = json.loads(modules_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise _error(f"auto: cannot read {modules_file}: {exc}", hint="set pooling.method explicitly") from exc
    types = [str(m.get("type", "")) for m in modules]
    normalize = any(t.endswith(".Normalize") for t in types)
    method = None
    for entry in modules:
        if str(entry.get("type", "")).endswith(".Pooling"):
            method = _st_pooling_mode(Path(model_dir) / str(entry.get("path", "")) / "config.json")  # type: ignore[arg-type]
    return method, normalize


def _st_pooling_mode(config_file: Path) -> str:
    try:
        cfg = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise _error(f"auto: cannot read {config_file}: {exc}", hint="set pooling.method explicitly") from exc
    mode = cfg.get("pooling_mode")  # sentence-transformers >= 6: one name or a list
    if mode is None:
        modes = [name for flag, name in _ST_LEGACY.items() if cfg.get(flag)] or ["mean"]
    else:
        modes = [mode] if isinstance(mode, str) else list(mode)
    if len(modes) != 1 or modes[0] not in ("mean", "max", "cls"):
        raise _error(f"auto: the sentence-transformers pooling {'+'.join(map(str, modes))} in {config_file} "
                     "is not one of mean, max, cls", hint="set pooling.method explicitly")
    return str(modes[0])


def resolve_pooling(method: str, normalize: bool | None, model_dir: Path | None) -> Pooling:
    """Apply ``auto`` / ``normalize: null`` using the model directory's sentence-transformers metadata."""
    st_method, st_norm = st_metadata(model_dir) if method == "auto" or normalize is None else (None, None)
    origins = []
    if method == "auto":
        method = st_method or "mean"
        origins.append("method from sentence-transformers metadata" if st_method else "method default (mean)")
    if normalize is None:
        normalize = bool(st_norm)
        origins.append("normalize from sentence-transformers metadata" if st_norm is not None
                       else "normalize default (false)")
    return Pooling(method, normalize, "; ".join(origins) or "manifest")


# --- the in-graph wrapper (torch) -----------------------------------------------------------------


def pooled_module(model: Any, pooling: Pooling) -> torch.nn.Module:
    """``forward(input_ids, attention_mask)`` -> pooled float32 ``[B, H]`` (``[B, S, H]`` for none)."""
    import torch

    fn = load_function(pooling.method)

    class PooledModel(torch.nn.Module):
        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            hidden = self.inner(input_ids=input_ids, attention_mask=attention_mask)[0]  # [B, S, H]
            out = fn(hidden, attention_mask)  # [B, H] or [B, S, H]
            if pooling.normalize:
                out = torch.nn.functional.normalize(out, p=2.0, dim=-1)
            return out.float()

    return PooledModel(model).eval()
