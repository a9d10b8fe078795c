"""
The input files `python data.py prepare` tokenizes, read as documents: .jsonl (one JSON object per line, the
document in a field), .txt (the whole file is one document), .parquet (a column; needs pyarrow). Bytes that are
not UTF-8 are replaced by U+FFFD and counted; a file with NUL bytes is refused as binary.
"""

import codecs
import importlib.util
import json
import os


class DataError(Exception):
    """A problem the user caused with data (bad path, bad file, bad mixture); the scripts print it as one line."""


INPUT_SUFFIXES = (".jsonl", ".txt", ".parquet")


def check_input(path):
    """Refuse what prepare cannot read: a missing, empty, unknown-format or binary file."""
    if not os.path.isfile(path):
        raise DataError(f"input {path} does not exist")
    if os.path.getsize(path) == 0:
        raise DataError(f"input {path} is empty")
    if not path.endswith(INPUT_SUFFIXES):
        raise DataError(f"input {path}: unsupported format; use .jsonl, .txt or .parquet")
    with open(path, "rb") as f:  # no text holds NUL bytes (JSON escapes them)
        if not path.endswith(".parquet") and b"\0" in f.read(1 << 16):
            raise DataError(f"input {path} is a binary file (it holds NUL bytes), not text: leave it out of --input")


REPLACED = [0]  # bytes of the current input that were not UTF-8: replaced by U+FFFD, counted in prepare's summary


def _count_replaced(err):
    REPLACED[0] += err.end - err.start
    return "\ufffd", err.end


codecs.register_error("count-replace", _count_replaced)


def read_jsonl(path):
    if not os.path.isfile(path):
        raise DataError(f"{path} does not exist")
    with open(path, encoding="utf-8", errors="count-replace") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield lineno, json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg}); fix or remove the line")


def read_records(path, field):
    """Yield (location, value) for every document of an input file."""
    if path.endswith(".txt"):
        with open(path, encoding="utf-8", errors="count-replace") as f:
            yield path, f.read()
    elif path.endswith(".parquet"):
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise DataError(f"reading {path} needs pyarrow: pip install pyarrow (or convert it to .jsonl)")
        table = pq.read_table(path)
        if field not in table.column_names:
            raise DataError(f"{path} has no column '{field}' (columns: {table.column_names}); pick one with --field")
        for row, value in enumerate(table.column(field).to_pylist()):
            yield f"{path} row {row}", value
    else:
        for lineno, rec in read_jsonl(path):
            if not isinstance(rec, dict) or field not in rec:
                raise DataError(f"{path}:{lineno}: no field '{field}'; pick the document field with --field")
            yield f"{path}:{lineno}", rec[field]


def detect_field_and_kind(path, field):
    """Default field: the first of `text`, `content`, `raw_content` (the official loader's order, RECIPE section 4.4;
    StarCoder has `content`) and `messages` that the first jsonl record, or the parquet schema, has; else `text`.
    The kind follows the first value: a string is a text document, a list is a chat conversation."""
    if field is None:
        names = next(read_jsonl(path), (0, {}))[1] if path.endswith(".jsonl") else []
        if path.endswith(".parquet") and importlib.util.find_spec("pyarrow"):  # else _read_records asks for it
            import pyarrow.parquet as pq
            names = pq.read_schema(path).names
        field = next((f for f in ("text", "content", "raw_content", "messages") if f in names), "text")
    value = next(read_records(path, field), (None, None))[1]
    return field, "chat" if isinstance(value, list) else "text"
