"""Reading a dataset's files (plain or gzipped CSV, JSON, JSONL): any malformed input becomes a DatasetError
that names the file, and the row where it can."""

from __future__ import annotations

import csv
import gzip
import json
from contextlib import contextmanager
from pathlib import Path

from training.datasets.table import DatasetError


def open_text(path: Path):
    if not path.is_file():
        raise DatasetError(f"{path}: no such file (set FINEROUTER_DATA_DIR to the routing datasets' folder)")
    return gzip.open(path, "rt", newline="", encoding="utf-8") if path.suffix == ".gz" else open(path, newline="", encoding="utf-8")


@contextmanager
def parsing(path: Path):
    """Turn a malformed file's KeyError/ValueError into a DatasetError that names the file."""
    try:
        yield
    except DatasetError:
        raise
    except KeyError as error:
        raise DatasetError(f"{path}: missing field {error}") from None
    except (ValueError, TypeError, IndexError, SyntaxError, OSError, csv.Error) as error:
        raise DatasetError(f"{path}: malformed value ({error})") from None


def read_csv(path: Path) -> list[dict[str, str]]:
    csv.field_size_limit(1 << 30)
    with open_text(path) as handle, parsing(path):
        return list(csv.DictReader(handle))


def read_json(path: Path):
    with open_text(path) as handle, parsing(path):
        return json.load(handle)


def read_jsonl(path: Path) -> list[dict]:
    rows = []
    with open_text(path) as handle:
        for number, line in enumerate(handle, start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise DatasetError(f"{path}: row {number}: not valid JSON ({error.msg})") from None
    return rows
