"""Writes that readers see whole or not at all: each goes to a hidden temporary name beside its target and moves
into place in one step, so a crash or a concurrent reader never meets half a file or folder. One helper for
every such write: the embedding cache, router artifacts, the batch job's part files, the streamed fit's shards."""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from serve.core.prompt_files import filesystem

_TEMPORARY_SUFFIX = ".tmp"


def is_temporary(name: str) -> bool:
    """Whether a file name is one of these writes' temporary names (what a crash leaves behind)."""
    return name.startswith(".") and name.endswith(_TEMPORARY_SUFFIX)


@contextmanager
def atomic_file(path: str | Path) -> Iterator:
    """A binary output stream for the file at `path` (a local path or a URI such as s3://bucket/key, on pyarrow's
    file systems); the file appears at `path` when the block ends, replacing any there, and not at all if it
    raises. The folder must exist."""
    fs, target = filesystem(str(path))
    folder, name = target.rsplit("/", 1)
    temporary = f"{folder}/.{name}.{uuid.uuid4().hex}{_TEMPORARY_SUFFIX}"
    try:
        with fs.open_output_stream(temporary) as stream:
            yield stream
        fs.move(temporary, target)
    except BaseException:
        if fs.get_file_info(temporary).is_file:
            fs.delete_file(temporary)
        raise


@contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """An empty local staging folder to fill; when the block ends it takes the place of `path` (a folder already
    there is replaced), and if the block raises it is removed and `path` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=_TEMPORARY_SUFFIX, dir=path.parent))
    try:
        yield staging
        if path.exists():
            retired = path.with_name(f".{path.name}.old{_TEMPORARY_SUFFIX}")
            shutil.rmtree(retired, ignore_errors=True)
            os.replace(path, retired)
            os.replace(staging, path)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
