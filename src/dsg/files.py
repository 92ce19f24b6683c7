"""Small file helpers shared by every artifact writer and reader: atomic output, checked JSON and safetensors."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from safetensors.torch import load_file

from .errors import DSGError


def read_json(path: str | os.PathLike) -> dict:
    """A JSON object from `path`, or a DSGError naming the file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DSGError(f"Cannot read {str(path)!r} as JSON: {e}.") from None
    if not isinstance(data, dict):
        raise DSGError(f"{str(path)!r} must hold a JSON object.")
    return data


def read_safetensors(path: str | os.PathLike, required: tuple[str, ...] = ()) -> dict:
    """The tensors of a safetensors file, or a DSGError naming the file (and any `required` tensor it lacks)."""
    path = Path(path)
    try:
        tensors = load_file(str(path))
    except Exception as e:  # safetensors raises several exception types for missing or corrupt files
        raise DSGError(f"Cannot read {str(path)!r} as safetensors: {e}.") from None
    missing = [n for n in required if n not in tensors]
    if missing:
        raise DSGError(f"{str(path)!r} lacks tensor(s) {missing}; it holds {sorted(tensors)}.")
    return tensors


def read_artifact_json(folder: str | os.PathLike, name: str, fmt: str, version: int, what: str) -> dict:
    """The JSON header of a dsg artifact folder, checked for its format tag and a version this dsg can read."""
    folder = Path(folder)
    if not (folder / name).is_file():
        raise DSGError(f"{str(folder)!r} is not a {what} directory: it has no {name}.")
    meta = read_json(folder / name)
    if meta.get("format") != fmt:
        raise DSGError(f"{str(folder / name)!r} is not a dsg {what} file (format={meta.get('format')!r}).")
    if int(meta.get("format_version", 0)) > version:
        raise DSGError(f"{str(folder / name)!r} has format_version {meta['format_version']}; this dsg reads up to {version}.")
    return meta


def write_json(path: str | os.PathLike, data) -> None:
    """Deterministic JSON: sorted keys, fixed indentation, trailing newline (so equal inputs give equal bytes)."""
    Path(path).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


class atomic_directory:
    """Build a directory in a temporary sibling and move it into place only if the block succeeds.

    An existing directory at `path` is replaced; an existing file is an error. Nothing half-written is ever
    left at `path`.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def __enter__(self) -> Path:
        if self.path.exists() and not self.path.is_dir():
            raise DSGError(f"Output path {str(self.path)!r} exists and is not a directory.")
        parent = self.path.parent
        parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.", dir=parent))
        return self.tmp

    def _publishable(self) -> None:
        """mkdtemp makes a private (0700) folder; give the result the permissions of an ordinary new folder."""
        umask = os.umask(0)
        os.umask(umask)
        for root, dirs, files in os.walk(self.tmp):
            os.chmod(root, 0o777 & ~umask)
            for f in files:
                os.chmod(os.path.join(root, f), 0o666 & ~umask)

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        self._publishable()
        if self.path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.old.", dir=self.path.parent))
            os.replace(self.path, old / "x")
            os.replace(self.tmp, self.path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self.tmp, self.path)
