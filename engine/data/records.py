"""The reference data format: question, reasoning steps, answer.

A data file is either a JSON list of records or JSONL (one record per line; chosen by the
``.jsonl`` suffix, or detected when a ``.json`` file holds several objects one per line).
Each record is an object::

    {"question": str, "steps": [str, ...], "answer": str, ...}

Any other keys (ProsQA's ``idx_to_symbol``, ``edges``, ``root``, ``target``,
``neg_target``, or anything a user adds) are kept, untouched, in ``Record.extra``.

``load_records`` validates everything before returning and fails with a ``RecordError``
(a ``ValueError``) that names the file, the record index (0-based, as in the JSON list;
JSONL errors also give the line) and the field at fault, with what was expected.
``question`` and ``answer`` must be non-empty strings; ``steps`` may be empty (no-CoT data).

This module knows the file format only: nothing of tokens, prompt layout or curricula.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

REQUIRED_FIELDS = ("question", "steps", "answer")


class RecordError(ValueError):
    """A data file or one of its records is not in the reference format."""


@dataclass(slots=True)
class Record:
    """One training or evaluation sample."""

    question: str
    steps: list[str]
    answer: str
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The JSON object for this record (key order as in the reference files)."""
        return {"question": self.question, "answer": self.answer, "steps": list(self.steps), **self.extra}


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def parse_record(obj: Any, where: str) -> Record:
    """Validate one decoded JSON value; ``where`` prefixes every error (file and index)."""
    if not isinstance(obj, Mapping):
        raise RecordError(f"{where}: expected an object with fields 'question', 'steps', 'answer', "
                          f"got {_type_name(obj)}")
    for name in REQUIRED_FIELDS:
        if name not in obj:
            expected = "a list of strings" if name == "steps" else "a string"
            raise RecordError(f"{where}: missing field '{name}' ({expected})")
    for name in ("question", "answer"):
        value = obj[name]
        if not isinstance(value, str):
            raise RecordError(f"{where}: field '{name}' must be a string, got {_type_name(value)}")
        if not value.strip():
            raise RecordError(f"{where}: field '{name}' must be a non-empty string, got an empty string")
    steps = obj["steps"]
    if not isinstance(steps, list):
        raise RecordError(f"{where}: field 'steps' must be a list of strings, got {_type_name(steps)}")
    for i, step in enumerate(steps):
        if not isinstance(step, str):
            raise RecordError(f"{where}: field 'steps' must be a list of strings, "
                              f"but item {i} is {_type_name(step)}")
    extra = {k: v for k, v in obj.items() if k not in REQUIRED_FIELDS}
    return Record(question=obj["question"], steps=list(steps), answer=obj["answer"], extra=extra)


def parse_records(objs: Iterable[Any], source: str) -> list[Record]:
    """Validate decoded records (e.g. a generator's dicts); errors name ``source`` and the index."""
    return [parse_record(obj, f"{source}: record {i}") for i, obj in enumerate(objs)]


def _decode_jsonl(text: str, name: str) -> list[tuple[Any, str]]:
    """(value, error prefix) per non-blank line."""
    out = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{name}: record {len(out)} (line {lineno})"
        try:
            out.append((json.loads(line), where))
        except json.JSONDecodeError as e:
            raise RecordError(f"{name}: line {lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
    return out


def load_records(path: str | os.PathLike) -> list[Record]:
    """Read and validate a JSON list or JSONL file of records."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    name = path.name
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise RecordError(f"{name}: not a UTF-8 text file ({e.reason} at byte {e.start})") from None
    if not text.strip():
        raise RecordError(f"{name}: empty file (expected a JSON list of records, or JSONL with one "
                          "record per line)")
    if path.suffix.lower() == ".jsonl":
        items = _decode_jsonl(text, name)
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            if e.msg == "Extra data" and text.lstrip().startswith("{"):
                items = _decode_jsonl(text, name)  # JSONL content under a .json name
            else:
                raise RecordError(f"{name}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
        else:
            if not isinstance(data, list):
                raise RecordError(f"{name}: expected a JSON list of records at the top level "
                                  f"(or JSONL, one record per line), got {_type_name(data)}")
            items = [(obj, f"{name}: record {i}") for i, obj in enumerate(data)]
    if not items:
        raise RecordError(f"{name}: contains no records")
    return [parse_record(obj, where) for obj, where in items]


def save_records(records: Iterable[Record | Mapping[str, Any]], path: str | os.PathLike) -> Path:
    """Write records as a JSON list (one record per line inside the list), or JSONL for a
    ``.jsonl`` suffix. Accepts ``Record`` objects or plain dicts (validated first)."""
    path = Path(path)
    dicts = []
    for i, r in enumerate(records):
        if not isinstance(r, Record):
            r = parse_record(r, f"record {i}")
        dicts.append(r.to_dict())
    lines = [json.dumps(d, ensure_ascii=False) for d in dicts]
    if path.suffix.lower() == ".jsonl":
        text = "".join(line + "\n" for line in lines)
    else:
        text = "[\n" + ",\n".join(lines) + "\n]\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path
