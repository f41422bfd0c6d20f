"""The manifest schema: one frozen dataclass per config group.

Field metadata drives validation (``qbuild.manifest.validate``):
``choices`` (allowed values), ``min`` / ``max`` (inclusive range; ``why`` is shown with a range error),
``help`` (shown in errors). Floats must be finite.
Two more facts are declared here for the keys (``tests/unit/test_key_property.py`` walks them):
``content=True``: the value locates files whose content, not the value, is keyed (a copy elsewhere
builds nothing new); ``key=False``: the value cannot change any output (a time limit).
Cross-field rules live in ``check_manifest``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

#: seq.batch_size / verify.batch_size at most: a sanity bound (2**32 asked for a 1 TiB input buffer)
MAX_BATCH = 4096


def _f(default: Any = None, *, factory: Any = None, **meta: Any) -> Any:
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class ModelSpec:
    """Where the weights come from: exactly one of ``path``, ``name`` or ``init: random``."""

    task: str = _f("causal_lm", choices=["causal_lm", "embedding", "image-text-to-text"])
    path: str | None = _f(None, content=True, help="local directory in save_pretrained format")
    name: str | None = _f(None, content=True, help="hub id, resolved from the local Hugging Face cache")
    revision: str = _f("main", content=True)
    init: str | None = _f(None, choices=[None, "random"], help="random: initialise from `architecture`")
    architecture: str | None = _f(None, help="transformers model_type for init: random, e.g. llama")
    config: dict[str, Any] = _f(factory=dict, help="config overrides (init: random) ")
    seed: int = _f(0, min=0, max=2**64 - 1, why="torch.manual_seed takes at most 2**64 - 1")
    dtype: str = _f("float32", choices=["float32", "float16", "bfloat16"])
    tokenizer: str | None = _f(None, content=True, help="tokenizer directory; default: the model directory; "
                                          "train-bpe: train a byte-level BPE with vocab = model vocab")
    # issue 15: several LoRA adapters compiled into one program (ids 1.. in list order; 0 is the base model).
    # Each is {name, path} (a peft adapter directory: its files' content is keyed, not its path) or {name, seed}
    # (a random adapter shaped by model.lora, made by the adapters stage); [] (default) changes no key.
    adapters: list[dict[str, Any]] = _f(factory=list, help="LoRA adapters served from one program, ids 1.. in "
                                                           "this order: {name: N, path: DIR} (a peft adapter "
                                                           "directory) or {name: N, seed: S, alpha: A (optional)} "
                                                           "(a random adapter shaped by model.lora)")
    lora: LoraSpec = _f(factory=lambda: LoraSpec(), help="r, alpha and target_modules of model.adapters' random "
                                                         "adapters (dropout is not used)")


@dataclass(frozen=True)
class TransformsSpec:
    """Module rewrites applied before export, by registered name, in order."""

    apply: list[str] = _f(factory=list)


@dataclass(frozen=True)
class PoolingSpec:
    """Pooling of encoder outputs (embedding models), applied inside the exported graph."""

    method: str = _f("auto", help="auto (sentence-transformers metadata in the model directory, else mean), "
                                  "mean, max, cls, avg, none (token embeddings), or module:function taking "
                                  "(last_hidden_states, attention_mask)")
    normalize: bool | None = _f(None, help="L2-normalise; null: from sentence-transformers metadata, else false")


@dataclass(frozen=True)
class SeqSpec:
    """Sequence-length buckets, context length and batch size."""

    lengths: list[int] = _f(factory=lambda: [32], min=1, help="buckets: one compiled specialisation each; "
                                                              "the smallest that fits an input is used")
    ctx_len: int = _f(128, min=1)
    batch_size: int = _f(1, min=1, max=MAX_BATCH, why="a sanity bound: inputs and KV caches scale with it")
    overflow: str = _f("error", choices=["error", "truncate"], help="input longer than the largest bucket")


@dataclass(frozen=True)
class ExportSpec:
    """How the PyTorch module becomes ONNX."""

    exporter: str = _f("legacy", choices=["legacy", "dynamo"])
    opset: int = _f(17, min=14, max=23)


@dataclass(frozen=True)
class QaicSpec:
    """Cloud AI 100 compiler settings (used only by the qaic backend)."""

    compiler: str | None = _f(None, content=True, help="path to qaic-compile / qaic-exec; default: the SDK's")
    sdk_dir: str | None = _f(None, content=True, help="SDK root; default $QAIC_SDK_DIR or /opt/qti-aic")
    aic_hw_version: str | None = _f(None, choices=[None, "ai100", "ai200"], help="default: detected")
    specializations_format: str = _f("auto", choices=["auto", "named", "flat"],
                                     help="auto: named from Apps SDK 1.21 on, flat for older or unknown SDKs")
    convert_to_fp16: bool = _f(True)
    mos: int | None = _f(None, min=1, help="max output splits (-mos)")
    aic_enable_depth_first: bool = _f(False)
    ols: int | None = _f(None, min=1, help="overlap split factor (-ols)")
    node_precision_info: str | None = _f(None, content=True, help="YAML of nodes kept in fp32 (-node-precision-info)")
    extra_flags: dict[str, Any] = _f(factory=dict, help="extra compiler flags by name: true -> -flag, a value -> "
                                                        "-flag=value, false -> omitted; e.g. {aic-perf-metrics: true}")
    timeout_s: int = _f(7200, min=1, key=False)  # a limit on the compiler's run, not an input to it
    num_cores: int = _f(16, min=1, max=64, help="-aic-num-cores: NSP cores per device")
    mxfp6_matmul: bool = _f(False)
    mxint8_kv_cache: bool = _f(False)
    num_devices: int = _f(1, min=1)
    use_onnx_subfunctions: bool = _f(False, help="export decoder layers as ONNX functions and pass -sub-functions "
                                                 "(QEfficient's use_onnx_subfunctions)")
    # content=True: it locates cards; their detected hardware version, not the ids, is keyed
    device_group: list[int] = _f(factory=list, min=0, content=True,
                                 help="the card ids (QIDs) the build targets: their hardware version is detected; "
                                      "default: the first card qaic-util -q lists")


@dataclass(frozen=True)
class QnnSpec:
    """QNN tool chain settings (used only by the qnn backend): QEfficient's ``enable_qnn`` compile path."""

    sdk_dir: str | None = _f(None, content=True, help="QNN SDK root; default $QNN_SDK_ROOT")
    config: str | None = _f(None, content=True, help="a QEfficient qnn_config JSON file (converter_args_extension, "
                                                     "context_binary_generator_args_extension, "
                                                     "qnn_compilation_backend); its content is keyed")
    num_cores: int = _f(16, min=1, max=64, help="compiler_num_of_cores: NSP cores per device")
    mxfp6_matmul: bool = _f(False, help="compiler_mxfp6_matmul_weights")
    mxint8_kv_cache: bool = _f(False, help="MXINT8 retained-state KV: uint8 in the custom IO config and "
                                           "qnn_data_format_config.json")
    num_devices: int = _f(1, min=1, help="devices 0..N-1; more than one writes tensor_slicing.json")
    aic_enable_depth_first: bool = _f(False, help="compiler_enable_depth_first")
    mos: int | None = _f(None, min=1, help="compiler_max_out_channel_split")
    allow_mxint8_mdp_io: bool = _f(False, help="compiler_mxint8_mdp_io")
    converter_args_extension: str = _f("", help="arguments appended to the qairt-converter command")
    context_binary_generator_args_extension: str = _f("", help="arguments appended to the "
                                                               "qnn-context-binary-generator command")
    compilation_backend: dict[str, Any] = _f(factory=dict, help="entries merged over qnn_compile_backend.json "
                                                                "(QEfficient's qnn_compilation_backend)")
    timeout_s: int = _f(7200, min=1, key=False)  # a limit on each tool's run, not an input to it


@dataclass(frozen=True)
class OnnxRuntimeSpec:
    """ONNX Runtime settings (used only by the onnxruntime backend)."""

    threads: int = _f(2, min=1, max=64, help="intra-op threads of the ONNX Runtime CPU session")
    graph_optimization: str = _f("extended", choices=["basic", "extended", "all"])
    quantize: str = _f("none", choices=["none", "int8", "int8_block", "int4"],
                       help="ONNX Runtime weight quantisation: int8 dynamic (per-tensor activations), int8_block "
                            "or int4 (MatMulNBits, blocks of 32)")
    quantize_min_cosine: float | None = _f(None, min=0.0, max=1.0,
                                           help="int8 / int8_block / int4: keep the most sensitive MatMuls in fp32 "
                                                "(measured one by one) until the outputs' minimum cosine to "
                                                "fp32 reaches this")
    session: str = _f("auto", choices=["auto", "fixed", "dynamic"],
                      help="ONNX Runtime: fixed-shape sessions per specialisation, one dynamic, or measure")
    attention: str = _f("auto", choices=["auto", "plain"],
                        help="KV causal LMs: auto exports each layer's cache write and attention as one ONNX Runtime "
                             "GroupQueryAttention where the family allows (Llama, Mistral, Qwen2, Qwen3, Gemma 3, "
                             "Grok-1, GPT-2; legacy exporter); plain keeps the standard ops")


@dataclass(frozen=True)
class CompileSpec:
    """The backend, and one settings group per backend (no key means two things)."""

    backend: str = _f("onnxruntime", choices=["onnxruntime", "qaic", "auto", "qnn"])
    onnxruntime: OnnxRuntimeSpec = _f(factory=OnnxRuntimeSpec)
    qaic: QaicSpec = _f(factory=QaicSpec)
    qnn: QnnSpec = _f(factory=QnnSpec)


@dataclass(frozen=True)
class VerifySpec:
    """Compiled artifact vs PyTorch on fixed inputs."""

    enabled: bool = _f(True)
    atol: float | None = _f(None, min=0.0, help="default: 1e-4 on logits, 1e-5 on embeddings")
    batch_size: int = _f(2, min=1, max=MAX_BATCH, why="a sanity bound: verify inputs scale with it")
    seq_len: int = _f(16, min=1)
    seed: int = _f(0, min=0, max=2**32 - 1, why="numpy's RandomState takes at most 2**32 - 1")
    prompts: list[str] = _f(factory=lambda: ["My name is", "The quick brown fox jumps over the lazy dog and"],
                            help="causal LMs with kv_cache: greedy tokens must equal HF generate")
    max_new_tokens: int = _f(32, min=1)
    texts: list[str] = _f(factory=list, help="embeddings: extra texts to compare (default: built-in set)")


@dataclass(frozen=True)
class VlmSpec:
    """Vision-language models (``model.task: image-text-to-text``): read by no other task."""

    mode: str = _f("dual", choices=["dual", "single"], help="dual: a vision program and a language program "
                                                            "(QEfficient's kv_offload=True); single: one graph")
    vision_batch_size: int = _f(1, min=1, max=64, help="images per run of the vision program (its "
                                                       "specialisation's batch_size)")
    max_num_tiles: int = _f(17, min=1, max=64, help="Llama 4: image tiles per image the vision program takes "
                                                   "(QEfficient's default 17: 16 tiles + the global one)")


@dataclass(frozen=True)
class CacheSpec:
    """Where built entries are shared; never part of a key (it moves outputs, it does not shape them)."""

    remote: str | None = _f(None, key=False, help="remote cache shared by several local caches: a directory, "
                                                  "file:// or fsspec URL (s3://bucket/prefix); --remote wins "
                                                  "over it, $QBUILD_REMOTE is used when neither is set")


@dataclass(frozen=True)
class LoraSpec:
    """The LoRA adapter (peft ``LoraConfig``): rank, scale, dropout and the modules it wraps."""

    r: int = _f(8, min=1, max=4096, help="LoRA rank")
    alpha: float = _f(32.0, min=0.0, help="LoRA alpha: the update is scaled by alpha / r")
    dropout: float = _f(0.05, min=0.0, max=0.99, help="dropout on the LoRA input (training only)")
    target_modules: list[str] = _f(factory=lambda: ["q_proj", "v_proj"],
                                   help="names (suffixes) of the Linear modules that get an adapter")


@dataclass(frozen=True)
class FinetuneSpec:
    """Finetuning between load and export (``none``: no stage, every key as without this group)."""

    method: str = _f("none", choices=["none", "lora"], help="lora: train a peft LoRA adapter; export and verify "
                                                            "use the merged weights")
    dataset: str | None = _f(None, content=True, help="JSONL with a text field, alpaca JSON/JSONL (instruction, "
                                                      "input, output) or a datasets.save_to_disk directory; its "
                                                      "content is keyed, not its path (relative: to the cwd)")
    format: str = _f("auto", choices=["auto", "text", "alpaca"], help="auto: alpaca where a record has "
                                                                      "instruction and output, else text")
    text_field: str = _f("text", help="the field holding the text of a text dataset's records")
    steps: int | None = _f(30, min=1, max=10**7, help="optimizer steps (the data cycles, reshuffled each "
                                                      "epoch); null: `epochs` passes over the data")
    epochs: int = _f(1, min=1, max=10**5, help="passes over the data when steps is null")
    batch_size: int = _f(4, min=1, max=MAX_BATCH, why="a sanity bound: activations scale with it")
    gradient_accumulation_steps: int = _f(1, min=1, max=10**5, help="micro-batches per optimizer step")
    learning_rate: float = _f(3e-4, min=1e-12, max=10.0)
    weight_decay: float = _f(0.0, min=0.0, max=10.0)
    max_seq_len: int = _f(128, min=2, max=2**20, help="records are truncated to this many tokens")
    gradient_checkpointing: bool = _f(False, help="recompute activations in backward: less memory, more time")
    seed: int = _f(42, min=0, max=2**32 - 1, why="seeds torch, the data order and LoRA's init")
    lora: LoraSpec = _f(factory=LoraSpec)


@dataclass(frozen=True)
class Manifest:
    """A fully composed, validated build description."""

    model: ModelSpec = _f(factory=ModelSpec)
    transforms: TransformsSpec = _f(factory=TransformsSpec)
    finetune: FinetuneSpec = _f(factory=FinetuneSpec)
    pooling: PoolingSpec = _f(factory=PoolingSpec)
    seq: SeqSpec = _f(factory=SeqSpec)
    export: ExportSpec = _f(factory=ExportSpec)
    compile: CompileSpec = _f(factory=CompileSpec)
    verify: VerifySpec = _f(factory=VerifySpec)
    vlm: VlmSpec = _f(factory=VlmSpec)
    cache: CacheSpec = _f(factory=CacheSpec)
    name: str = _f("", help="artifact name; defaults to the manifest file's stem")
