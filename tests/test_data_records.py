"""The reference data format: loading, saving, and errors that name the record and field."""

from __future__ import annotations

import json

import pytest

from engine.data.records import Record, RecordError, load_records, save_records

GOOD = [
    {"question": "Is Tom a wumpus?", "steps": ["Tom is a yumpus.", "Every yumpus is a wumpus."],
     "answer": "Tom is a wumpus.", "edges": [[0, 1]], "note": "kept"},
    {"question": "Q2", "steps": [], "answer": "A2"},
]


def write(tmp_path, name: str, text: str):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_load_json_list_keeps_extra_keys(tmp_path):
    records = load_records(write(tmp_path, "d.json", json.dumps(GOOD)))
    assert records[0] == Record(question="Is Tom a wumpus?", steps=GOOD[0]["steps"], answer="Tom is a wumpus.",
                                extra={"edges": [[0, 1]], "note": "kept"})
    assert records[1].steps == [] and records[1].extra == {}
    assert records[0].to_dict() == GOOD[0]


def test_load_jsonl_skips_blank_lines(tmp_path):
    text = json.dumps(GOOD[0]) + "\n\n" + json.dumps(GOOD[1]) + "\n"
    assert [r.to_dict() for r in load_records(write(tmp_path, "d.jsonl", text))] == GOOD


def test_jsonl_content_under_json_name(tmp_path):
    text = "\n".join(json.dumps(r) for r in GOOD)
    assert [r.answer for r in load_records(write(tmp_path, "d.json", text))] == ["Tom is a wumpus.", "A2"]


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_save_then_load_round_trip(tmp_path, suffix):
    path = save_records([Record("q", ["s"], "a", {"root": 1}), GOOD[0]], tmp_path / "sub" / f"out{suffix}")
    text = path.read_text()
    assert text.startswith("[") == (suffix == ".json")
    assert [r.to_dict() for r in load_records(path)] == [
        {"question": "q", "answer": "a", "steps": ["s"], "root": 1}, GOOD[0]]


def test_save_validates_dicts(tmp_path):
    with pytest.raises(RecordError, match=r"record 1: missing field 'answer'"):
        save_records([GOOD[0], {"question": "q", "steps": []}], tmp_path / "x.json")


def _bad(record: dict, **changes) -> list:
    r = dict(record, **changes)
    return [GOOD[0], GOOD[1], {k: v for k, v in r.items() if v is not ...}]


@pytest.mark.parametrize("records, message", [
    (_bad(GOOD[1], steps=3), "d.json: record 2: field 'steps' must be a list of strings, got int"),
    (_bad(GOOD[1], steps="one step"), "record 2: field 'steps' must be a list of strings, got str"),
    (_bad(GOOD[1], steps=["ok", 7]), "record 2: field 'steps' must be a list of strings, but item 1 is int"),
    (_bad(GOOD[1], answer=...), "record 2: missing field 'answer' (a string)"),
    (_bad(GOOD[1], steps=...), "record 2: missing field 'steps' (a list of strings)"),
    (_bad(GOOD[1], question=None), "record 2: field 'question' must be a string, got null"),
    (_bad(GOOD[1], answer=["a"]), "record 2: field 'answer' must be a string, got list"),
    (_bad(GOOD[1], answer="  "), "record 2: field 'answer' must be a non-empty string"),
    ([GOOD[0], "just text"], "record 1: expected an object with fields 'question', 'steps', 'answer', got str"),
])
def test_bad_record_names_index_and_field(tmp_path, records, message):
    path = write(tmp_path, "d.json", json.dumps(records))
    with pytest.raises(RecordError) as err:
        load_records(path)
    assert message in str(err.value)


@pytest.mark.parametrize("name, text, message", [
    ("d.json", "", "d.json: empty file"),
    ("d.json", "  \n\t", "d.json: empty file"),
    ("d.jsonl", "\n", "d.jsonl: empty file"),
    ("d.json", "[{\"question\": ", "d.json: not valid JSON"),
    ("d.json", "question,steps,answer\n", "d.json: not valid JSON"),
    ("d.json", json.dumps({"data": GOOD}), "d.json: expected a JSON list of records at the top level"
                                           " (or JSONL, one record per line), got dict"),
    ("d.json", "42", "got int"),
    ("d.json", "[]", "d.json: contains no records"),
    ("d.jsonl", json.dumps(GOOD[0]) + "\n{oops\n", "d.jsonl: line 2: not valid JSON"),
    ("d.jsonl", "\n" + json.dumps(GOOD[0]) + "\n\n" + json.dumps({"question": "q", "steps": [1], "answer": "a"}),
     "d.jsonl: record 1 (line 4): field 'steps' must be a list of strings, but item 0 is int"),
])
def test_bad_file_gives_clear_error(tmp_path, name, text, message):
    with pytest.raises(RecordError) as err:
        load_records(write(tmp_path, name, text))
    assert message in str(err.value)


def test_not_utf8(tmp_path):
    path = tmp_path / "d.json"
    path.write_bytes(b"[\xff\xfe]")
    with pytest.raises(RecordError, match="not a UTF-8 text file"):
        load_records(path)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="data file not found"):
        load_records(tmp_path / "nope.json")


def test_real_split_loads_with_graph_fields(prosqa_valid_path):
    records = load_records(prosqa_valid_path)
    assert len(records) == 300
    for r in records:
        assert set(r.extra) == {"idx_to_symbol", "edges", "root", "target", "neg_target"}
        assert r.steps and r.answer.endswith(".") and r.question.endswith("?")
