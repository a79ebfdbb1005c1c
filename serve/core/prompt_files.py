"""The job's input: which files, checked before any Ray work, and cut into fixed row ranges (chunks) to read.

Rows are numbered across the files in name order, each file in row order, so that a row's number is the same in
every run of the job over the same input: that number is what the output's part files, and `--resume`, go by.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.json as pajson
import pyarrow.parquet as pq

FORMATS = {".parquet": "parquet", ".jsonl": "jsonl"}
ROW_COLUMN = "_row"  # the row's number in the input, carried through the job to name the output files


class BatchInputError(ValueError):
    """Input or options the job cannot use; the message names the file, column or flag to fix."""


def filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    """pyarrow's filesystem for a URI (s3://bucket/key) or a local path, and the path within it."""
    if "://" in path:
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), os.path.abspath(path)


def _is_data_file(info: pafs.FileInfo) -> bool:
    """Skip hidden and marker files (.crc, _SUCCESS) that writers leave beside the data."""
    return info.type == pafs.FileType.File and not info.base_name.startswith((".", "_"))


def _input_files(path: str) -> tuple[pafs.FileSystem, list[str], str]:
    """(filesystem, the input's data files, their format): a single file, or every file under a folder."""
    fs, root = filesystem(path)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        raise BatchInputError(f"{path}: no such file or folder")
    if info.type == pafs.FileType.File:
        files = [info]
    else:
        files = sorted((i for i in fs.get_file_info(pafs.FileSelector(root, recursive=True)) if _is_data_file(i)), key=lambda i: i.path)
    formats = {FORMATS.get(Path(i.base_name).suffix.lower()) for i in files}
    if not files or None in formats:
        unknown = next((i.path for i in files if Path(i.base_name).suffix.lower() not in FORMATS), path)
        raise BatchInputError(f"{unknown}: unknown input format; give .parquet or .jsonl files (one format per folder)")
    if len(formats) > 1:
        raise BatchInputError(f"{path}: mixes .parquet and .jsonl files; give one format per folder")
    return fs, [i.path for i in files], formats.pop()


@dataclass(frozen=True)
class InputFile:
    path: str
    rows: int
    line_offsets: tuple[int, ...] = ()  # JSON Lines: the byte offset of each record's line


def _parquet_file(fs: pafs.FileSystem, file: str) -> tuple[InputFile, dict[str, str]]:
    """The file with its row count, and each column's type."""
    try:
        with fs.open_input_file(file) as handle:
            metadata = pq.ParquetFile(handle).metadata
            return InputFile(file, metadata.num_rows), {field.name: str(field.type) for field in metadata.schema.to_arrow_schema()}
    except pa.ArrowInvalid as error:
        raise BatchInputError(f"{file}: not a readable Parquet file ({error})") from None


def _lines(stream, block_bytes: int = 1 << 20):
    """The lines of a binary stream, each with its newline, read a block at a time."""
    rest = b""
    while block := stream.read(block_bytes):
        lines = (rest + block).split(b"\n")
        rest = lines.pop()
        yield from (line + b"\n" for line in lines)
    if rest:
        yield rest


def _jsonl_file(fs: pafs.FileSystem, file: str) -> tuple[InputFile, dict[str, str]]:
    """The file with the offsets of its records (its non-blank lines), and the first record's keys with the type
    of each value; the whole file is read once, to find where each record starts."""
    offsets, first, position = [], None, 0
    with fs.open_input_stream(file) as stream:
        for number, line in enumerate(_lines(stream), start=1):
            if line.strip():
                offsets.append(position)
                if first is None:
                    first = (number, line)
            position += len(line)
    if first is None:
        return InputFile(file, 0), {}
    number, line = first
    try:
        record = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError:
        raise BatchInputError(f"{file}: not UTF-8 text; expected one JSON object per line") from None
    except json.JSONDecodeError as error:
        raise BatchInputError(f"{file}: line {number} is not JSON ({error.msg}); expected one JSON object per line") from None
    if not isinstance(record, dict):
        raise BatchInputError(f"{file}: line {number} is not a JSON object; expected one object per line")
    columns = {key: "string" if isinstance(value, str) else "null" if value is None else type(value).__name__ for key, value in record.items()}
    return InputFile(file, len(offsets), tuple(offsets)), columns


@dataclass(frozen=True)
class JobInput:
    fs: pafs.FileSystem
    files: list[InputFile]
    file_format: str

    @property
    def rows(self) -> int:
        return sum(file.rows for file in self.files)


def check_input(path: str, prompt_column: str, output_columns: tuple[str, ...]) -> JobInput:
    """The non-empty data files to read, after checking each has a text `prompt_column` and none already has a
    column the job writes; raises BatchInputError naming the file and column."""
    fs, paths, file_format = _input_files(path)
    describe = _parquet_file if file_format == "parquet" else _jsonl_file
    readable = []
    for file in paths:
        info, columns = describe(fs, file)
        if info.rows == 0:
            continue
        if prompt_column not in columns:
            raise BatchInputError(f"{file}: no column {prompt_column!r} (it has {sorted(columns)}); name the prompt column with --prompt-column")
        if columns[prompt_column] not in ("string", "large_string", "null"):  # null: a JSON record without a prompt
            raise BatchInputError(f"{file}: column {prompt_column!r} holds {columns[prompt_column]}, not text")
        clashes = sorted(set(columns) & {*output_columns, ROW_COLUMN})
        if clashes:
            raise BatchInputError(f"{file}: already has column(s) {clashes} that the job writes; rename them")
        readable.append(info)
    if not readable:
        raise BatchInputError(f"{path}: empty (no rows to route)")
    return JobInput(fs, readable, file_format)


@dataclass(frozen=True)
class Chunk:
    """Rows [start, stop) of the job's numbering, all in one file, whose first row is `file_start`."""

    file: InputFile
    file_start: int
    start: int
    stop: int


def chunks(job_input: JobInput, todo: list[tuple[int, int]], rows_per_chunk: int) -> list[Chunk]:
    """The row ranges `todo` (sorted, disjoint) cut at file boundaries and every `rows_per_chunk` rows."""
    pieces, file_start = [], 0
    for file in job_input.files:
        file_stop = file_start + file.rows
        for start, stop in todo:
            start, stop = max(start, file_start), min(stop, file_stop)
            for piece in range(start, stop, rows_per_chunk):
                pieces.append(Chunk(file, file_start, piece, min(piece + rows_per_chunk, stop)))
        file_start = file_stop
    return pieces


def read_chunk(fs: pafs.FileSystem, file_format: str, chunk: Chunk) -> pa.Table:
    """The chunk's rows, with their numbers in ROW_COLUMN."""
    first, last = chunk.start - chunk.file_start, chunk.stop - chunk.file_start
    if file_format == "parquet":
        with fs.open_input_file(chunk.file.path) as handle:
            parquet = pq.ParquetFile(handle)
            groups, offset, skip = [], 0, 0
            for group in range(parquet.num_row_groups):
                rows = parquet.metadata.row_group(group).num_rows
                if offset + rows > first and offset < last:
                    if not groups:
                        skip = first - offset
                    groups.append(group)
                offset += rows
            table = parquet.read_row_groups(groups).slice(skip, last - first)
    else:
        offsets = chunk.file.line_offsets
        with fs.open_input_file(chunk.file.path) as handle:
            handle.seek(offsets[first])
            end = offsets[last] if last < len(offsets) else handle.size()
            data = handle.read(end - offsets[first])
        table = pajson.read_json(io.BytesIO(data))
    return table.append_column(ROW_COLUMN, pa.array(range(chunk.start, chunk.stop), pa.int64()))
