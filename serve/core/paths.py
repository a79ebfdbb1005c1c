"""Where the project reads data and keeps its caches: one place, overridable by environment variables."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def data_dir() -> Path:
    """The routing datasets' folder: $FINEROUTER_DATA_DIR, else `../shared/data` beside the repository."""
    return Path(os.environ.get("FINEROUTER_DATA_DIR", REPO_ROOT.parent / "shared" / "data"))


def cache_dir() -> Path:
    """Embeddings, converted models and engine caches: $FINEROUTER_CACHE, else `.cache` in the repository."""
    return Path(os.environ.get("FINEROUTER_CACHE", REPO_ROOT / ".cache"))


def build_folder_once(target: Path, build: Callable[[Path], None], is_complete: Callable[[Path], bool]) -> Path:
    """Return `target`, first building it if it is not complete: `build` writes into a temporary sibling folder
    that is renamed into place, so a crash or a concurrent builder never leaves a half-written folder behind."""
    if is_complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        build(tmp)
        for path in (tmp, *tmp.rglob("*")):  # mkdtemp and the writers leave owner-only modes
            path.chmod(0o755 if path.is_dir() else 0o644)
        if not is_complete(tmp):
            raise RuntimeError(f"building {target} wrote an incomplete folder {tmp}")
        try:
            tmp.rename(target)
        except OSError:
            if not is_complete(target):  # lost a race to another builder: theirs is as good
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
