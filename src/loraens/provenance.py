"""What produced a run: library versions and hashes of the model weights and the data."""

from __future__ import annotations

import hashlib
import json
import platform
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from loraens.data.records import Question

_PACKAGES = ("loraens", "torch", "transformers", "peft", "safetensors", "numpy")


def _version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def library_versions(packages: tuple[str, ...] = _PACKAGES) -> dict[str, str | None]:
    """Installed versions of ``packages`` (None where one is missing)."""
    return {name: _version(name) for name in packages}


def model_hash(model_dir: Path) -> str:
    """SHA-256 over the folder's weight and config files, in name order."""
    digest = hashlib.sha256()
    files = sorted(p for p in model_dir.iterdir() if p.suffix in {".safetensors", ".bin", ".json"})
    for path in files:
        digest.update(path.name.encode())
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 22), b""):
                digest.update(chunk)
    return digest.hexdigest()


def data_hash(questions: list[Question]) -> str:
    payload = [[q.id, q.question, list(q.choices), q.answer] for q in questions]
    return hashlib.sha256(json.dumps(payload).encode()).hexdigest()


def provenance(model_dir: Path, train: list[Question], evaluation: list[Question]) -> dict:
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": library_versions(),
        "model_dir": str(model_dir),
        "model_sha256": model_hash(model_dir),
        "train_data_sha256": data_hash(train),
        "eval_data_sha256": data_hash(evaluation),
    }
