"""Finetuning data: records from a JSONL / JSON file (text or alpaca) or a ``datasets.save_to_disk``
directory, as (prompt, completion) examples, then token ids with the prompt masked from the loss.

Every problem with the data is a :class:`DatasetError` naming ``finetune.dataset``, the file and the line
(or record), and what to do about it. Reading is plain Python; only ``tokenize`` touches a tokenizer.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qbuild.errors import StageError

KEY = "finetune.dataset"

#: Stanford Alpaca's prompt templates (QEfficient's alpaca_dataset uses the same two)
ALPACA_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further context. "
                "Write a response that appropriately completes the request.\n\n"
                "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
ALPACA_NO_INPUT = ("Below is an instruction that describes a task. "
                   "Write a response that appropriately completes the request.\n\n"
                   "### Instruction:\n{instruction}\n\n### Response:\n")
ALPACA_FIELDS = ("instruction", "output")


class DatasetError(StageError):
    """Bad finetuning data; ``key`` is the manifest key that points at it."""

    key = KEY


@dataclass(frozen=True)
class Example:
    """One training example: the loss covers ``completion`` (and EOS), never ``prompt``."""

    prompt: str
    completion: str
    where: str  # "line 3", "record 2", "row 7": for messages


def dataset_files(path: Path) -> list[Path]:
    """The files whose content is the dataset: the file itself, or every file of a save_to_disk directory."""
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))


def read_examples(path: Path, fmt: str = "auto", text_field: str = "text") -> list[Example]:
    """The dataset at ``path`` as examples (``fmt``: auto | text | alpaca)."""
    if path.is_dir():
        rows = _disk_rows(path)
    elif not path.is_file():
        raise DatasetError(f"{KEY}: {path} does not exist", hint="point finetune.dataset at a JSONL or JSON file")
    else:
        rows = _file_rows(path)
    examples = [_example(record, where, path, fmt, text_field) for record, where in rows]
    if not examples:
        raise DatasetError(f"{KEY}: {path} holds no records",
                           hint="one JSON object per line: {\"text\": ...} or {\"instruction\", \"input\", \"output\"}")
    return examples


def _file_rows(path: Path) -> Iterator[tuple[Any, str]]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{KEY}: {path} is not UTF-8 text ({exc.reason} at byte {exc.start})",
                           hint="save the dataset as UTF-8 JSONL") from None
    if text.lstrip().startswith("["):  # one JSON array (alpaca_data.json)
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{KEY}: {path} line {exc.lineno}: not valid JSON ({exc.msg}, column {exc.colno})",
                               hint="fix the JSON at that line") from None
        for i, record in enumerate(data):
            yield record, f"record {i + 1}"
        return
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{KEY}: {path} line {n}: not valid JSON ({exc.msg}, column {exc.colno})",
                               hint="each line of a JSONL file is one JSON object; fix or remove that line") from None
        yield record, f"line {n}"


def _disk_rows(path: Path) -> Iterator[tuple[Any, str]]:
    """Rows of a ``datasets`` dataset saved with ``save_to_disk`` (a DatasetDict: its train split)."""
    try:
        import datasets
    except ImportError:
        raise DatasetError(f"{KEY}: {path} is a directory (a datasets.save_to_disk dataset), and the datasets "
                           "package is not installed",
                           hint="pip install datasets, or export the data as JSONL") from None
    datasets.disable_progress_bars()  # the build reports its own progress
    try:
        ds: Any = datasets.load_from_disk(str(path))
    except Exception as exc:  # any failure to read it is the same message
        raise DatasetError(f"{KEY}: {path}: not a dataset saved with save_to_disk ({exc})",
                           hint="point finetune.dataset at a JSONL file or a save_to_disk directory") from None
    if isinstance(ds, datasets.DatasetDict):
        split = "train" if "train" in ds else next(iter(ds))
        ds = ds[split]
    for i, row in enumerate(ds):
        yield row, f"row {i + 1}"


def _example(record: Any, where: str, path: Path, fmt: str, text_field: str) -> Example:
    if not isinstance(record, dict):
        raise DatasetError(f"{KEY}: {path} {where}: expected a JSON object, got {type(record).__name__}",
                           hint="each record is an object such as {\"text\": \"...\"}")
    record = {k: v for k, v in record.items() if v is not None}  # a saved dataset's absent values are None
    is_alpaca = fmt == "alpaca" or (fmt == "auto" and all(f in record for f in ALPACA_FIELDS))
    if is_alpaca:
        missing = [f for f in ALPACA_FIELDS if f not in record]
        if missing:
            raise DatasetError(f"{KEY}: {path} {where}: an alpaca record without {', '.join(map(repr, missing))} "
                               f"(fields: {', '.join(sorted(record)) or 'none'})",
                               hint="alpaca records have instruction, output and optionally input")
        instruction, output = _str(record, "instruction", where, path), _str(record, "output", where, path)
        given = _str(record, "input", where, path) if "input" in record else ""
        template = ALPACA_INPUT if given else ALPACA_NO_INPUT
        return Example(template.format(instruction=instruction, input=given), output, where)
    if text_field not in record:
        raise DatasetError(f"{KEY}: {path} {where}: no {text_field!r} field (fields: "
                           f"{', '.join(sorted(record)) or 'none'})",
                           hint="set finetune.text_field to the field holding the text, or give alpaca records "
                                "(instruction, input, output)")
    return Example("", _str(record, text_field, where, path), where)


def _str(record: dict[str, Any], field: str, where: str, path: Path) -> str:
    value = record[field]
    if not isinstance(value, str):
        raise DatasetError(f"{KEY}: {path} {where}: field {field!r} is {type(value).__name__}, expected a string",
                           hint="give the text as a JSON string")
    return value


def tokenize(examples: list[Example], tokenizer: Any, max_seq_len: int) -> list[tuple[list[int], list[int]]]:
    """(input ids, labels) per example: prompt + completion + EOS, truncated to ``max_seq_len``; the
    prompt's labels are -100. Examples with nothing left to learn after truncation are dropped."""
    eos = tokenizer.eos_token_id
    out = []
    for ex in examples:
        n_prompt = len(tokenizer(ex.prompt)["input_ids"]) if ex.prompt else 0
        ids = list(tokenizer(ex.prompt + ex.completion)["input_ids"]) + ([eos] if eos is not None else [])
        ids = ids[:max_seq_len]
        labels = [-100] * min(n_prompt, len(ids)) + ids[n_prompt:]
        if any(x != -100 for x in labels) and len(ids) >= 2:
            out.append((ids, labels))
    if not out:
        raise DatasetError(f"{KEY}: no example has a token to learn within finetune.max_seq_len={max_seq_len}",
                           hint="raise finetune.max_seq_len or shorten the prompts")
    return out
