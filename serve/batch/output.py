"""The job's output folder: part files named by the input rows they hold, written atomically, and `--resume`.

A part file `part-<first row>-<row after the last>.<format>` holds those input rows, in order, so the folder
read in name order is the input in order. Each is written under a hidden temporary name and renamed into place,
so a part that exists is complete: after a crash, the rows the part files cover are done, and a rerun with
`--resume` routes only the others. `_job.json` records what the output was made from, so that a resume with
other arguments or another input is refused instead of mixing two jobs' rows.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from ray.data import Datasink
from ray.data.block import BlockAccessor

from serve.core.atomic import atomic_file, is_temporary
from serve.core.prompt_files import ROW_COLUMN, BatchInputError, filesystem

MANIFEST = "_job.json"
_PART = re.compile(r"part-(\d{12})-(\d{12})\.(parquet|jsonl)")


def part_name(start: int, stop: int, file_format: str) -> str:
    return f"part-{start:012}-{stop:012}.{file_format}"


def _listing(path: str) -> tuple[pafs.FileSystem, str, list[pafs.FileInfo]]:
    fs, root = filesystem(path)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.File:
        raise BatchInputError(f"--output {path}: is a file; give a folder")
    if info.type == pafs.FileType.NotFound:
        return fs, root, []
    return fs, root, fs.get_file_info(pafs.FileSelector(root))


def done_ranges(path: str) -> list[tuple[int, int]]:
    """The row ranges the folder's part files hold, sorted; raises if two overlap."""
    _, _, files = _listing(path)
    ranges = sorted((int(match[1]), int(match[2])) for info in files if (match := _PART.fullmatch(info.base_name)))
    for (_, stop), (start, _) in zip(ranges, ranges[1:]):
        if start < stop:
            raise BatchInputError(f"--output {path}: part files overlap at row {start}; the folder holds rows of more than one job")
    return ranges


def missing_ranges(done: list[tuple[int, int]], rows: int) -> list[tuple[int, int]]:
    """The ranges of [0, rows) that `done` (sorted, disjoint) does not cover."""
    missing, position = [], 0
    for start, stop in done:
        if start > position:
            missing.append((position, start))
        position = max(position, stop)
    if position < rows:
        missing.append((position, rows))
    return missing


def prepare_output(path: str, job: dict, resume: bool, rows: int) -> list[tuple[int, int]]:
    """The input row ranges still to write. A new job needs an empty (or missing) folder; `resume` continues the
    job that `_job.json` describes, which must be this one, after removing what a crash left half-written."""
    fs, root, files = _listing(path)
    if files and not resume:
        raise BatchInputError(f"--output {path}: not empty; add --resume to finish the job that wrote it, or remove it "
                              "or choose another folder")
    if not files:
        fs.create_dir(root, recursive=True)
        with fs.open_output_stream(f"{root}/{MANIFEST}") as stream:
            stream.write(json.dumps(job, indent=1).encode())
        return [(0, rows)]
    names = {info.base_name for info in files}
    if MANIFEST not in names:
        raise BatchInputError(f"--output {path}: has no {MANIFEST}, so it was not written by this job; choose another folder")
    with fs.open_input_stream(f"{root}/{MANIFEST}") as stream:
        recorded = json.loads(stream.read())
    differing = sorted(key for key in job.keys() | recorded.keys() if job.get(key) != recorded.get(key))
    if differing:
        raise BatchInputError(f"--output {path}: was written with other {', '.join(differing)}; resume with the same "
                              "arguments and input, or choose another folder")
    for info in files:
        if is_temporary(info.base_name):  # a part a crash left half-written
            fs.delete_file(info.path)
    return missing_ranges(done_ranges(path), rows)


class RowRangeSink(Datasink[None]):
    """Writes each write task's rows as part files, one per run of consecutive input rows, each atomically."""

    def __init__(self, path: str, file_format: str):
        self.path, self.file_format = path, file_format

    def write(self, blocks, ctx) -> None:
        tables = [table for table in (BlockAccessor.for_block(block).to_arrow() for block in blocks) if table.num_rows]
        if not tables:
            return
        table = pa.concat_tables(tables, promote_options="permissive")
        rows = table[ROW_COLUMN].to_numpy()
        breaks = np.flatnonzero(np.diff(rows) != 1) + 1
        for start, stop in zip([0, *breaks], [*breaks, len(rows)]):
            self._write_part(table.slice(start, stop - start).drop_columns([ROW_COLUMN]), int(rows[start]), int(rows[stop - 1]) + 1)

    def _write_part(self, table: pa.Table, start: int, stop: int) -> None:
        with atomic_file(f"{self.path.rstrip('/')}/{part_name(start, stop, self.file_format)}") as stream:
            if self.file_format == "parquet":
                pq.write_table(table, stream)
            else:
                stream.write(table.to_pandas().to_json(orient="records", lines=True, force_ascii=False).encode())
