"""QEfficient's model classes on qbuild's build graph: ``from_pretrained`` -> ``export`` -> ``compile`` ->
``generate``, each call composing the model's manifest (``model.manifest``) and building it.

QEfficient keeps exports and QPCs in directories named by hashes of the config; here every artifact is a
cache entry keyed by the weights' digests, the tool versions and the exact settings, shared with the CLI.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from qbuild.errors import ManifestError, PlanError
from qbuild.execute.reporter import Reporter
from qbuild.qeff.manifest import ApiManifest, check_kwargs, check_type, int_list, set_key
from qbuild.qeff.runnable import CompiledModel, ExecInfo

if TYPE_CHECKING:
    import numpy as np

    from qbuild.execute.executor import BuildResult

PathLike = str | os.PathLike
_M = TypeVar("_M", bound="QEFFTransformersBase")

_DTYPES = ("float32", "float16", "bfloat16")

#: compile keyword (QEfficient's name) -> the manifest key it sets, its types and what they mean
_QAIC: dict[str, tuple[str, tuple[type, ...], str]] = {
    "num_cores": ("compile.qaic.num_cores", (int,), "an int"),
    "num_devices": ("compile.qaic.num_devices", (int,), "an int"),
    "mxfp6_matmul": ("compile.qaic.mxfp6_matmul", (bool,), "a bool"),
    "mos": ("compile.qaic.mos", (int, type(None)), "an int or None"),
    "aic_enable_depth_first": ("compile.qaic.aic_enable_depth_first", (bool,), "a bool"),
    "ols": ("compile.qaic.ols", (int, type(None)), "an int or None"),
    "aic_hw_version": ("compile.qaic.aic_hw_version", (str, type(None)), "ai100, ai200 or None"),
    "convert_to_fp16": ("compile.qaic.convert_to_fp16", (bool,), "a bool"),
    "node_precision_info": ("compile.qaic.node_precision_info", (str, os.PathLike, type(None)), "a path or None"),
    "device_group": ("compile.qaic.device_group", (list, tuple, type(None)), "a list of card ids or None"),
    "extra_flags": ("compile.qaic.extra_flags", (dict,), "a dict of compiler flags"),
    "use_onnx_subfunctions": ("compile.qaic.use_onnx_subfunctions", (bool,), "a bool"),
}
#: with ``enable_qnn=True`` these compiler keywords go to ``compile.qnn`` (QEfficient's qnn path takes them too)
_QNN_SHARED = ("num_cores", "num_devices", "mxfp6_matmul", "mos", "aic_enable_depth_first")
_QNN_ARGS = ("enable_qnn", "qnn_config")
#: QEfficient compile keywords that qbuild does not support yet, with the default that asks for nothing
_COMPILE_NOT_YET: dict[str, Any] = {
    "offload_pt_weights": True, "specializations": None, "mdp_load_partition_config": None,
}
_CAUSAL_NOT_YET: dict[str, Any] = {
    "full_batch_size": None, "kv_cache_batch_size": None, "num_speculative_tokens": None, "prefill_only": None,
    "comp_ctx_lengths_prefill": None, "comp_ctx_lengths_decode": None, "enable_chunking": False,
    "retain_full_kv": None, "layerwise": False, "layerwise_window_size": 1, "kv_cache_prefix": None,
    "moe_prefill_packed_chunk_size": 256,
}


class QEFFTransformersBase:
    """A transformers model with a qbuild manifest: ``from_pretrained`` a directory, a hub id from the local
    Hugging Face cache, or a loaded model; every later call builds that manifest through the cache."""

    _task: ClassVar[str] = ""
    _transforms: ClassVar[list[str]] = []
    _load_not_yet: ClassVar[dict[str, Any]] = {}

    def __init__(self, model: Any, **kwargs: Any) -> None:
        """Wrap ``model`` (a loaded transformers model, a directory or a hub id); see :meth:`from_pretrained`."""
        where = f"{type(self).__name__}.from_pretrained"
        self._cache = Path(kwargs.pop("qbuild_cache_dir", None) or _default_cache())
        check_kwargs(where, kwargs, ["dtype", "torch_dtype", "revision", "attn_implementation", "name",
                                     *self._load_options()], {**self._load_not_yet, "low_cpu_mem_usage": False})
        self._base: dict[str, Any] = {"defaults": ["_self_"], "model": {"task": self._task}}
        self._arguments: dict[str, str] = {}
        self._source(where, model, kwargs)
        self._common(where, kwargs)
        self._load(where, kwargs)
        self._compile: dict[str, Any] = {}
        self.compile_arguments: dict[str, Any] = {}
        self.onnx_path: Path | None = None
        self.qpc_path: Path | None = None
        self.notes: list[str] = []  # the last build's plan notes (settings the chosen backend does not use)
        self._compiled: CompiledModel | None = None
        self.last_build: BuildResult | None = None  # per stage: name, key, state (built / cached), seconds
        self._set_compile(self._compile_defaults())
        from qbuild.stages.load import resolve_model

        resolve_model(self.manifest.compose(self._cache).manifest)  # bad input, a hub id not cached: fail now

    @classmethod
    def from_pretrained(cls: type[_M], pretrained_model_name_or_path: Any, *args: Any, **kwargs: Any) -> _M:
        """A local ``save_pretrained`` directory (or ``pkg:MODULE``), a hub id resolved from the local Hugging
        Face cache (never downloaded), or an already-loaded transformers model (saved into the cache by
        content, so its weights key the build). Keywords: QEfficient's; ``qbuild_cache_dir``: qbuild's cache
        (default ``$QBUILD_CACHE`` or ``./cache``); ``name``: the manifest's name."""
        if args:
            raise ManifestError(f"{cls.__name__}.from_pretrained takes one positional argument (the model); "
                                f"pass the others by keyword, got {len(args)} more", key="args")
        return cls(pretrained_model_name_or_path, **kwargs)

    # --- the manifest --------------------------------------------------------------------------------

    @property
    def manifest(self) -> ApiManifest:
        """The manifest equivalent to this model's calls: ``model.manifest.save("x.yaml")``, then
        ``qbuild x.yaml`` builds the same entries."""
        data = {**self._base}
        data["name"] = self._name
        data = _merged(data, self._compile)
        return ApiManifest(_order(data), arguments=self._arguments)

    @property
    def cache_dir(self) -> Path:
        return self._cache

    def _load_options(self) -> list[str]:
        return []

    def _load(self, where: str, kwargs: dict[str, Any]) -> None:
        """Class-specific from_pretrained keywords."""

    def _source(self, where: str, model: Any, kwargs: dict[str, Any]) -> None:
        if isinstance(model, (str, os.PathLike)):
            text = os.fspath(model)
            local = Path(text).expanduser()
            if text.startswith("pkg:") or local.is_dir():
                from qbuild.stages.load import resolve_path

                path = resolve_path(text) if text.startswith("pkg:") else local
                if not (path / "config.json").is_file():
                    raise PlanError(f"{where}: {path} has no config.json",
                                    hint="pass a directory written by save_pretrained()")
                self._base["model"]["path"] = str(path.resolve())
                self._name = _dir_name(path.resolve())
            else:
                self._base["model"]["name"] = text
                self._name = _stem(text.rsplit("/", 1)[-1])
            self._arguments["model.path"] = self._arguments["model.name"] = "pretrained_model_name_or_path"
            return
        if hasattr(model, "save_pretrained") and hasattr(model, "config"):
            from qbuild.qeff.saved import save_model

            path = save_model(model, self._cache)
            self._base["model"]["path"] = str(path)
            if self._task == "causal_lm":  # greedy verification tokenises its prompts: a loaded model has no tokenizer
                self._base["verify"] = {"enabled": False}
            self._name = _stem(str(getattr(model.config, "model_type", "") or "model"))
            self._loaded_dtype = str(getattr(model, "dtype", "torch.float32")).replace("torch.", "")
            return
        raise ManifestError(f"{where}: pretrained_model_name_or_path must be a directory, a hub id or a loaded "
                            f"transformers model, got {type(model).__name__}", key="pretrained_model_name_or_path")

    def _common(self, where: str, kwargs: dict[str, Any]) -> None:
        model = self._base["model"]
        if "dtype" in kwargs and "torch_dtype" in kwargs:
            raise ManifestError(f"{where}: give dtype or torch_dtype, not both", key="torch_dtype")
        dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
        if dtype is None and getattr(self, "_loaded_dtype", "float32") != "float32":
            dtype = self._loaded_dtype
        if dtype is not None and dtype != "auto":
            shown = str(dtype).replace("torch.", "")
            if shown not in _DTYPES:
                raise ManifestError(f"{where}: dtype {dtype!r} is not one of {', '.join(_DTYPES)}",
                                    key="dtype" if "dtype" in kwargs else "torch_dtype")
            if shown != "float32":
                model["dtype"] = shown
            self._arguments["model.dtype"] = "dtype" if "dtype" in kwargs else "torch_dtype"
        if kwargs.get("revision") not in (None, "main"):
            if "name" not in model:
                raise ManifestError(f"{where}: revision is for a hub id, not a local directory or model",
                                    key="revision")
            check_type(where, "revision", kwargs["revision"], (str,), "a str")
            model["revision"] = kwargs["revision"]
            self._arguments["model.revision"] = "revision"
        if kwargs.get("attn_implementation") not in (None, "eager"):
            raise ManifestError(f"{where}: attn_implementation={kwargs['attn_implementation']!r}: qbuild exports "
                                "with eager attention, as QEfficient does", key="attn_implementation",
                                hint="leave attn_implementation unset (or 'eager')")
        if kwargs.get("name") is not None:
            check_type(where, "name", kwargs["name"], (str,), "a str")
            self._name = kwargs["name"]
            self._arguments["name"] = "name"

    # --- compile settings ----------------------------------------------------------------------------

    def _compile_defaults(self) -> dict[str, Any]:
        return {}

    def _set_compile(self, settings: dict[str, Any]) -> None:
        """Replace the compile settings (each compile() call says everything; nothing lingers)."""
        self._compile = {}
        for key, value in settings.items():
            set_key(self._compile, key, value)

    def _qaic_settings(self, where: str, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Manifest keys of the backend and compiler keywords given (QEfficient's names)."""
        out: dict[str, Any] = {}
        backend = kwargs.pop("backend", "auto")
        if backend not in ("qaic", "onnxruntime", "auto", "qnn"):
            raise ManifestError(f"{where}: backend={backend!r}; choose qaic, onnxruntime, qnn or auto", key="backend")
        enable_qnn, qnn_config = kwargs.pop("enable_qnn", False), kwargs.pop("qnn_config", None)
        check_type(where, "enable_qnn", enable_qnn, (bool,), "a bool")
        check_type(where, "qnn_config", qnn_config, (str, os.PathLike, type(None)), "a path or None")
        if qnn_config is not None and not enable_qnn and backend != "qnn":
            raise ManifestError(f"{where}: qnn_config is for the QNN path; pass enable_qnn=True too", key="qnn_config")
        if enable_qnn:
            if backend not in ("auto", "qnn"):
                raise ManifestError(f"{where}: enable_qnn=True compiles with QNN, but backend={backend!r}",
                                    key="enable_qnn", hint="drop backend= or set backend='qnn'")
            backend = "qnn"
            self._arguments["compile.backend"] = "enable_qnn"
        else:
            self._arguments["compile.backend"] = "backend"
        out["compile.backend"] = backend
        if qnn_config is not None:
            out["compile.qnn.config"] = os.fspath(qnn_config)
            self._arguments["compile.qnn.config"] = "qnn_config"
        for name, (key, kinds, what) in _QAIC.items():
            if name in kwargs:
                value = kwargs.pop(name)
                check_type(where, name, value, kinds, what)
                value = os.fspath(value) if isinstance(value, os.PathLike) else value
                if backend == "qnn":
                    if name not in _QNN_SHARED:
                        raise ManifestError(f"{where}: {name} is a qaic-exec setting the QNN path does not take",
                                            key=name, hint=f"QNN takes: {', '.join(_QNN_SHARED)}, qnn_config")
                    key = key.replace("compile.qaic.", "compile.qnn.")
                out[key] = list(value) if isinstance(value, tuple) else value
                self._arguments[key] = name
        ort = kwargs.pop("onnxruntime", None)
        if ort is not None:
            check_type(where, "onnxruntime", ort, (dict,), "a dict of compile.onnxruntime settings")
            for k, v in ort.items():
                out[f"compile.onnxruntime.{k}"] = v
                self._arguments[f"compile.onnxruntime.{k}"] = f"onnxruntime[{k!r}]"
        verify = kwargs.pop("verify", True)
        check_type(where, "verify", verify, (bool,), "a bool")
        if not verify:
            out["verify.enabled"] = False
        return out

    def _check_compile_paths(self, where: str, onnx_path: Any, compile_dir: Any) -> None:
        for name, value in (("onnx_path", onnx_path), ("compile_dir", compile_dir)):
            if value is not None:
                raise ManifestError(f"{where}: {name}={value!r}: qbuild keys and stores exports and compiled "
                                    "artifacts in its cache", key=name,
                                    hint="leave it unset; compile() returns the artifact's path")

    # --- the graph -----------------------------------------------------------------------------------

    def _build(self, until: str | None = None) -> tuple[BuildResult, Callable[[], None]]:
        """Build (what is cached is reused); the entries it used stay held against ``qbuild cache gc`` / ``rm``
        until the returned ``release()`` is called."""
        from qbuild.api import build_held

        reporter = _Notes()
        result, release = build_held(self.manifest.compose(self._cache), self._cache, reporter, until=until)
        self.notes = reporter.notes
        self.last_build = result
        if "onnx" in result.artifacts:
            self.onnx_path = Path(result.artifacts["onnx"])
        return result, release

    def export(self, export_dir: Any = None) -> Path:
        """Load and export (cached when already built); returns the ONNX file's path."""
        self._check_compile_paths(f"{type(self).__name__}.export", None, export_dir)
        _, release = self._build(until="export")
        release()
        assert self.onnx_path is not None
        return self.onnx_path

    def _compile_and_open(self) -> Path:
        if self._compiled is not None:
            self._compiled.close()  # the previous settings' entries
        result, release = self._build()  # held while the compiled model lives
        self.qpc_path = Path(result.artifacts["compiled"])
        self._compiled = CompiledModel.from_build(self.manifest.compose(self._cache), result).holding(release)
        return self.qpc_path

    def compiled(self) -> CompiledModel:
        """The compiled model of the current settings (built now if it is not yet)."""
        if self._compiled is None:
            self._compile_and_open()
        assert self._compiled is not None
        return self._compiled

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._name!r}, cache={str(self._cache)!r})"


class QEFFAutoModel(QEFFTransformersBase):
    """Encoders (``AutoModel``): embeddings pooled inside the graph. ``pooling``: ``auto`` (default:
    sentence-transformers metadata, else mean), ``mean``, ``max``, ``cls``, ``avg``, ``none`` or None (token
    embeddings, QEfficient's no-pooling), or a module-level function ``(last_hidden_states, attention_mask)``;
    ``normalize``: L2-normalise (None: from the metadata)."""

    _task = "embedding"

    def _load_options(self) -> list[str]:
        return ["pooling", "normalize"]

    def _load(self, where: str, kwargs: dict[str, Any]) -> None:
        pooling = kwargs.get("pooling", "auto")
        if pooling is None:
            pooling = "none"
        elif callable(pooling):
            pooling = _function_name(where, pooling)
        check_type(where, "pooling", pooling, (str,), "a pooling name or a module-level function")
        normalize = kwargs.get("normalize")
        check_type(where, "normalize", normalize, (bool, type(None)), "a bool or None")
        self._base["pooling"] = {"method": pooling} | ({"normalize": normalize} if normalize is not None else {})
        self._arguments.update({"pooling.method": "pooling", "pooling.normalize": "normalize"})

    def _compile_defaults(self) -> dict[str, Any]:
        return {"seq.lengths": [32], "seq.batch_size": 1, "compile.backend": "auto"}

    def compile(self, onnx_path: Any = None, compile_dir: Any = None, *, seq_len: int | Sequence[int] = 32,
                batch_size: int = 1, **kwargs: Any) -> Path:
        """Build (load, export, compile, verify; cached stages reused) with one specialisation per ``seq_len``
        bucket and ``batch_size`` rows; ``backend``: qaic, onnxruntime or auto (qaic where its SDK is
        found); ``num_cores``, ``num_devices``, ``mxfp6_matmul``, ``mos``, ``aic_enable_depth_first``, ...:
        the qaic compiler's settings (``compile.qaic.*``; with another backend the plan notes them as
        unused); ``onnxruntime={...}``: ``compile.onnxruntime.*``; ``verify=False`` skips verification.
        Returns the compiled artifact's directory."""
        where = "QEFFAutoModel.compile"
        self._check_compile_paths(where, onnx_path, compile_dir)
        check_kwargs(where, kwargs, [*_QAIC, *_QNN_ARGS, "backend", "onnxruntime", "verify"], _COMPILE_NOT_YET)
        self.compile_arguments = {"seq_len": seq_len, "batch_size": batch_size, **kwargs}
        lengths = int_list(where, "seq_len", seq_len)
        check_type(where, "batch_size", batch_size, (int,), "an int")
        settings = {"seq.lengths": lengths, "seq.batch_size": batch_size, **self._qaic_settings(where, kwargs)}
        if max(lengths) > 128:  # every bucket must fit seq.ctx_len (unused by encoders otherwise)
            settings["seq.ctx_len"] = max(lengths)
        self._arguments.update({"seq.lengths": "seq_len", "seq.batch_size": "batch_size", "seq.ctx_len": "seq_len"})
        self._set_compile(settings)
        self._compiled = None
        return self._compile_and_open()

    def generate(self, inputs: Mapping[str, Any], device_ids: Any = None, runtime_ai100: bool = True) -> np.ndarray:
        """The pooled output ``[batch, hidden]`` (numpy) of tokenised ``inputs``: ``tokenizer(texts,
        return_tensors="pt")`` or a dict of ``input_ids`` / ``attention_mask``; runs the compiled artifact
        (built first if needed)."""
        _runtime_args("QEFFAutoModel.generate", device_ids, runtime_ai100)
        return self.compiled().encode(inputs)

    def embed(self, texts: str | Sequence[str]) -> np.ndarray:
        """Embeddings of ``texts`` with the model's own tokenizer (``qbuild embed``)."""
        return self.compiled().embed(texts)


class QEFFAutoModelForCausalLM(QEFFTransformersBase):
    """Causal LMs, exported the Cloud AI 100 way (retained-state KV cache: ``transforms: [kv_cache]``),
    compiled with prefill buckets and a decode specialisation, generating greedily."""

    _task = "causal_lm"
    _load_not_yet = {"continuous_batching": False, "qaic_config": None, "max_seq_len_cached": None,
                     "layerwise": False, "full_batch_size": None}

    def _load(self, where: str, kwargs: dict[str, Any]) -> None:
        self._base["transforms"] = {"apply": ["kv_cache"]}

    def _compile_defaults(self) -> dict[str, Any]:
        return {"seq.lengths": [32], "seq.ctx_len": 128, "seq.batch_size": 1, "compile.backend": "auto"}

    def compile(self, onnx_path: Any = None, compile_dir: Any = None, *, prefill_seq_len: int | Sequence[int] = 32,
                ctx_len: int = 128, batch_size: int = 1, mxint8_kv_cache: bool = False, **kwargs: Any) -> Path:
        """Build (load, export, compile, verify; cached stages reused): prefill graph(s) of ``prefill_seq_len``
        tokens (an int, or a list of buckets) and a decode graph, a ``ctx_len`` KV cache, ``batch_size``
        rows; ``mxint8_kv_cache``: an MXINT8 cache (qaic); other keywords as :meth:`QEFFAutoModel.compile`.
        Returns the compiled artifact's directory."""
        where = "QEFFAutoModelForCausalLM.compile"
        self._check_compile_paths(where, onnx_path, compile_dir)
        check_kwargs(where, kwargs, [*_QAIC, *_QNN_ARGS, "backend", "onnxruntime", "verify"],
                     {**_COMPILE_NOT_YET, **_CAUSAL_NOT_YET})
        self.compile_arguments = {"prefill_seq_len": prefill_seq_len, "ctx_len": ctx_len, "batch_size": batch_size,
                                  "mxint8_kv_cache": mxint8_kv_cache, **kwargs}
        lengths = int_list(where, "prefill_seq_len", prefill_seq_len)
        check_type(where, "ctx_len", ctx_len, (int,), "an int")
        check_type(where, "batch_size", batch_size, (int,), "an int")
        check_type(where, "mxint8_kv_cache", mxint8_kv_cache, (bool,), "a bool")
        settings = {"seq.lengths": lengths, "seq.ctx_len": ctx_len, "seq.batch_size": batch_size,
                    **self._qaic_settings(where, kwargs)}
        if mxint8_kv_cache:
            settings[f"compile.{'qnn' if settings['compile.backend'] == 'qnn' else 'qaic'}.mxint8_kv_cache"] = True
        self._arguments.update({"seq.lengths": "prefill_seq_len", "seq.ctx_len": "ctx_len",
                                "seq.batch_size": "batch_size", "compile.qaic.mxint8_kv_cache": "mxint8_kv_cache"})
        self._set_compile(settings)
        self._compiled = None
        return self._compile_and_open()

    def generate(self, tokenizer: Any, prompts: str | Sequence[str], device_id: Any = None,
                 runtime_ai100: bool = True, generation_len: int | None = None, **kwargs: Any) -> ExecInfo:
        """Greedy generation for each prompt (built first if needed): the new token ids and texts, with timings
        (QEfficient's ``CloudAI100ExecInfo``). ``generation_len``: new tokens at most (default: what
        ``ctx_len`` leaves)."""
        where = "QEFFAutoModelForCausalLM.generate"
        check_kwargs(where, kwargs, [], {"write_io": False, "prompts_txt_file_path": None, "automation": False,
                                         "iteration": 1})
        _runtime_args(where, device_id, runtime_ai100)
        if tokenizer is None:
            raise ManifestError(f"{where}: pass the model's tokenizer (AutoTokenizer.from_pretrained(...))",
                                key="tokenizer")
        return self.compiled().generate(tokenizer, prompts, generation_len=generation_len)


def transform_lm(model: Any) -> Any:
    """Apply the causal-LM rewrites (the retained-state KV cache, ``kv_cache``) to a loaded transformers
    model in place and return it in eval mode (QEfficient's ``transform_lm``). The weights are hashed before
    and after: a rewrite that changed one raises :class:`~qbuild.errors.TransformError`. A model already
    transformed is returned as it is."""
    from qbuild.errors import TransformError
    from qbuild.transforms import apply_transforms
    from qbuild.transforms.kv_cache import KVCausalLM

    if not hasattr(model, "config") or not hasattr(model, "state_dict"):
        raise TransformError(f"transform_lm: expected a loaded transformers model, got {type(model).__name__}")
    if isinstance(model, KVCausalLM):
        return model.eval()
    before = _weights_digest(model)
    apply_transforms(model, ["kv_cache"])
    if _weights_digest(model) != before:
        raise TransformError("transform_lm: the kv_cache rewrite changed the model's weights")
    model.qeff_transformed = True
    return model.eval()


def _weights_digest(model: Any) -> str:
    """sha256 over every parameter and buffer: name, dtype, shape and bytes."""
    import hashlib

    import torch

    h = hashlib.sha256()
    for name, t in sorted(model.state_dict(keep_vars=False).items()):
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class _Notes(Reporter):
    """Keeps the plan's notes (the backend chosen, settings it does not use); ignores the other events."""

    def __init__(self) -> None:
        self.notes: list[str] = []

    def emit(self, event: dict[str, Any]) -> None:
        if event.get("event") == "plan":
            self.notes = list(event.get("notes", []))


def _runtime_args(where: str, device_ids: Any, runtime_ai100: Any) -> None:
    if device_ids is not None:
        raise ManifestError(f"{where}: device selection (device_ids) is not supported by qbuild yet",
                            key="device_ids", hint="leave it unset; compile.qaic.device_group picks the cards")
    if runtime_ai100 is not True:
        raise ManifestError(f"{where}: runtime_ai100={runtime_ai100!r}: qbuild runs the compiled artifact only",
                            key="runtime_ai100", hint="for PyTorch outputs run the transformers model directly")


def _function_name(where: str, fn: Callable[..., Any]) -> str:
    """``module:function`` of a pooling function importable by name (what ``pooling.method`` takes)."""
    module, qualname = getattr(fn, "__module__", None), getattr(fn, "__qualname__", "")
    if not module or module == "__main__" or "<" in qualname or "." in qualname:
        raise ManifestError(f"{where}: pooling function {qualname or fn!r} must be defined at the top level of an "
                            "importable module (the manifest names it as module:function)", key="pooling")
    return f"{module}:{qualname}"


def _dir_name(path: Path) -> str:
    """A model directory's name: past generic parts (``model``, a snapshot's commit hash)."""
    import re

    for part in reversed(path.parts):
        if part.lower() not in ("model", "models", "snapshots", "/") and not re.fullmatch(r"[0-9a-f]{40}", part):
            return _stem(part.removeprefix("models--").split("--")[-1])
    return "model"


def _stem(text: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.").lower()[:100] or "model"


def _default_cache() -> Path:
    from qbuild.store import default_cache_dir

    return default_cache_dir()


def _merged(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in base.items()}
    for k, v in extra.items():
        out[k] = _merged(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


_ORDER = ("defaults", "name", "model", "transforms", "pooling", "seq", "export", "compile", "verify", "cache")


def _order(data: dict[str, Any]) -> dict[str, Any]:
    return {k: data[k] for k in sorted(data, key=lambda k: _ORDER.index(k) if k in _ORDER else len(_ORDER))}
