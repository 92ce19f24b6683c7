"""Small file helpers shared by every artifact writer and reader: atomic output, checked JSON and safetensors.

Atomic output: a file or directory is built under a temporary sibling name and renamed into place only when
complete, so a reader (or a resumed run) never sees half of it.
"""

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
        raise DSGError(
            f"{str(folder / name)!r} has format_version {meta['format_version']}; this dsg reads up to {version}."
        )
    return meta


def json_text(data) -> str:
    """Deterministic JSON: sorted keys, fixed indentation, trailing newline (so equal inputs give equal bytes)."""
    return json.dumps(data, indent=2, sort_keys=True) + "\n"


def write_json(path: str | os.PathLike, data) -> None:
    """`json_text(data)` into `path` (inside a directory that is itself written atomically)."""
    Path(path).write_text(json_text(data))


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write `text` to a temporary sibling and rename it into place, with an ordinary new file's mode."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp files are 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | os.PathLike, data) -> None:
    """`json_text(data)` written atomically: a reader never sees half a file."""
    write_text_atomic(path, json_text(data))


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
        umask = _umask()
        for root, _, files in os.walk(self.tmp):
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
