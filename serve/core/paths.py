"""Where the project reads data and keeps its caches: one place, overridable by environment variables."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def data_dir() -> Path:
    """The routing datasets' folder: $FINEROUTER_DATA_DIR, else `../shared/data` beside the repository."""
    return Path(os.environ.get("FINEROUTER_DATA_DIR", REPO_ROOT.parent / "shared" / "data"))


def cache_dir() -> Path:
    """Embeddings, converted models and engine caches: $FINEROUTER_CACHE, else `.cache` in the repository."""
    return Path(os.environ.get("FINEROUTER_CACHE", REPO_ROOT / ".cache"))
