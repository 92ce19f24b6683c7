"""Small file helpers shared by every artifact writer and reader: atomic output, checked JSON and safetensors.

Atomic output: a file or directory is built under a temporary sibling name and renamed into place only when
complete, so a reader (or a resumed run) never sees half of it.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import stat
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file

from .errors import DSGError


def missing(path: str | os.PathLike) -> str:
    """How a path that is not there is not there: a symbolic link that leads nowhere (broken, or a loop of links)
    reads as one, not as nothing."""
    return "is a symbolic link that leads nowhere (broken, or a loop)" if Path(path).is_symlink() else "does not exist"


def read_user_text(path: str | os.PathLike, what: str) -> str:
    """A user's text file (a corpus, questions) as one string: UTF-8, a leading byte-order mark dropped (as Windows
    editors write one), Windows line endings read as "\n" (text mode); a DSGError naming the file when it is not
    UTF-8 text."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise DSGError(f"Cannot read {what} {str(path)!r} as UTF-8 text: {e}.") from None


class DuplicateKey(ValueError):
    """A JSON object names one key twice: json keeps the last value silently, so the file means two things."""


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    out = {}
    for key, value in pairs:
        if key in out:
            raise DuplicateKey(key)
        out[key] = value
    return out


def loads_strict(text: str) -> Any:
    """json.loads, refusing an object that names a key twice (DuplicateKey)."""
    return json.loads(text, object_pairs_hook=_unique_keys)


def jsonl_records(text: str, path: str | os.PathLike) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) for each non-blank line of a JSONL text read from `path`, or a DSGError naming
    the line and column. Only "\n" ends a line: JSON strings may hold U+2028, U+2029 or U+0085 unescaped (as
    `json.dumps(..., ensure_ascii=False)` writes them), which `str.splitlines` would split on."""
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            value = loads_strict(line)
        except json.JSONDecodeError as e:
            raise DSGError(f"{str(path)!r} line {lineno} is not valid JSON: {e.msg} at column {e.colno}.") from None
        except DuplicateKey as e:
            raise DSGError(f"{str(path)!r} line {lineno} names the key {str(e)!r} twice; JSON keeps only the last "
                           "value, so the line is ambiguous.") from None  # fmt: skip
        except (ValueError, RecursionError) as e:  # a number past Python's digit limit, nesting past the stack's
            raise DSGError(f"{str(path)!r} line {lineno} is not valid JSON: {type(e).__name__}: "
                           f"{str(e)[:120]}.") from None  # fmt: skip
        if "\\u" in line and not is_text(value):  # only a \u escape can name half a surrogate pair
            raise DSGError(f"{str(path)!r} line {lineno} escapes half of a UTF-16 surrogate pair (such as \\udc80) "
                           "with no other half: that is not text.")  # fmt: skip
        yield lineno, value


@contextlib.contextmanager
def disk_errors(path: str | os.PathLike) -> Iterator[None]:
    """safetensors reports a write the machine failed (a full disk, a file-size limit) as its own error type, in
    which the OS error is only text: raised again as the OSError it is, naming `path`, so that a command says it
    in one line as it does any other."""
    try:
        yield
    except Exception as e:
        found = re.search(r"I/O error: (.*?) \(os error (\d+)\)", str(e))
        if type(e).__name__ != "SafetensorError" or found is None:
            raise
        raise OSError(int(found.group(2)), found.group(1), str(path)) from None


def save_tensors(tensors: dict, path: str | os.PathLike) -> None:
    """safetensors' save_file, its failed writes raised as OSError (disk_errors)."""
    with disk_errors(path):
        save_file(tensors, str(path))


def is_text(value: Any) -> bool:
    """Whether every string in `value` (a string, or JSON lists and objects of them) is text that can be encoded:
    no unpaired surrogates, which a JSON escape or bytes that are not UTF-8 can put in a Python string."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return False
        return True
    if isinstance(value, dict):
        return all(is_text(k) and is_text(v) for k, v in value.items())
    if isinstance(value, list):
        return all(is_text(v) for v in value)
    return True


def read_json(path: str | os.PathLike) -> dict:
    """A JSON object from `path`, or a DSGError naming the file."""
    path = Path(path)
    try:
        data = loads_strict(path.read_text(encoding="utf-8"))
    except DuplicateKey as e:
        raise DSGError(f"{str(path)!r} names the key {str(e)!r} twice in one object; JSON keeps only the last value, "
                       "so the file is ambiguous.") from None  # fmt: skip
    except FileNotFoundError:
        raise DSGError(f"{str(path)!r} {missing(path)}.") from None
    except IsADirectoryError:
        raise DSGError(f"{str(path)!r} is a folder; give a JSON file.") from None
    except (OSError, ValueError, RecursionError) as e:  # ValueError: bad JSON, bad UTF-8, a number past int limits
        raise DSGError(f"Cannot read {str(path)!r} as JSON: {type(e).__name__}: {str(e)[:200]}.") from None
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
        if folder.name == name and folder.is_file():
            raise DSGError(
                f"{str(folder)!r} is a {what}'s {name}; give the folder that holds it, {str(folder.parent)!r}."
            )
        raise DSGError(f"{str(folder)!r} is not a {what} directory: it has no {name}.")
    meta = read_json(folder / name)
    if meta.get("format") != fmt:
        raise DSGError(f"{str(folder / name)!r} is not a dsg {what} file (format={meta.get('format')!r}).")
    found = meta.get("format_version", 0)
    if isinstance(found, bool) or not isinstance(found, int):
        raise DSGError(f"{str(folder / name)!r}: format_version must be an integer, got {found!r}.")
    if found > version:
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


# ---- claims: what a command saw at its output path when it started -------------------------------------------
#
# check_output_dir / check_output_file record what is at the output path (nothing, or which file or folder) before
# the work starts; the final move into place checks it is still that. Another process that wrote the same output
# meanwhile (two `dsg fit --out g` at once) then makes the later one fail, naming the path, instead of silently
# replacing a result that process reported as written.

_CLAIMS: dict[str, tuple | None] = {}


def path_identity(path: str | os.PathLike) -> tuple | None:
    """Which file or folder is at `path` now (None: nothing): a new one put there, or one written to, differs. The
    change time is in it because an inode number may be reused by the next file made."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_ctime_ns)


def _claim(path: Path) -> None:
    _CLAIMS[os.path.abspath(path)] = path_identity(path)


def _written_meanwhile(path: Path) -> DSGError:
    return DSGError(f"{str(path)!r} was written by another process while this one ran; nothing was replaced "
                    "(run again, with --overwrite to replace what is there now).")  # fmt: skip


def _check_claim(path: Path) -> None:
    key = os.path.abspath(path)
    if key in _CLAIMS and path_identity(path) != _CLAIMS[key]:
        raise _written_meanwhile(path)


def _settle_claim(path: Path) -> None:
    """After this process wrote `path`: what is there now is its own."""
    key = os.path.abspath(path)
    if key in _CLAIMS:
        _CLAIMS[key] = path_identity(path)


@contextlib.contextmanager
def exclusive(folder: str | os.PathLike, what: str):
    """Hold an exclusive lock on `folder` (created if missing, and removed again if it is still empty at the end)
    for the block: a second process asking for it gets a DSGError instead of writing the same files at once."""
    folder = output_path(folder)
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DSGError(f"Another {what} is writing {str(folder)!r}; wait for it to finish or choose another "
                           "output folder.") from None  # fmt: skip
        yield folder
    finally:
        os.close(fd)
        if created and _is_empty_dir(folder):
            with contextlib.suppress(OSError):
                folder.rmdir()


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write `text` to a temporary sibling and rename it into place, with an ordinary new file's mode."""
    path = output_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        try:
            with os.fdopen(fd, "w") as f:
                f.write(text)
        except OSError as e:  # a write the machine failed (a full disk) names no file: name the output
            if e.filename is not None or e.errno is None:
                raise
            raise OSError(e.errno, e.strerror or str(e), str(path)) from None
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp files are 0600
        _publish(Path(tmp), path, os.unlink, os.replace)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | os.PathLike, data) -> None:
    """`json_text(data)` written atomically: a reader never sees half a file."""
    write_text_atomic(path, json_text(data))


# ---- output directories ---------------------------------------------------------------------------------------


def _json_object(path: Path) -> dict | None:
    """The JSON object in `path`, or None where it is missing, unreadable or not an object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


def _format_tag(path: Path) -> str | None:
    data = _json_object(path)
    return data.get("format") if data is not None else None


def _holds(*names: str):
    """A folder that holds only files dsg writes, `names[0]` among them (a folder the user added to is not ours)."""

    def test(p: Path) -> bool:
        entries = {e.name for e in p.iterdir()}
        return names[0] in entries and entries <= set(names)

    return test


def _is_run_store(runs: Path) -> bool:
    """A comparison's run store: one folder per method holding run records (*.json) and weight edits (*.edit, each
    holding only what a weight edit holds)."""
    methods = list(runs.iterdir())
    return all(
        m.is_dir() and all(e.suffix == ".json" or (e.suffix == ".edit" and _is_edit_or_empty(e)) for e in m.iterdir())
        for m in methods
    ) and any(e.suffix == ".json" for m in methods for e in m.iterdir())


def _is_edit(p: Path) -> bool:
    return p.is_dir() and _holds("edit.json", "edit.safetensors")(p) and _format_tag(p / "edit.json") == "dsg-edit"


def _is_edit_or_empty(p: Path) -> bool:
    return p.is_dir() and (not any(p.iterdir()) or _is_edit(p))


def _json_object_with(path: Path, *keys: str) -> bool:
    """`path` is a JSON object holding `keys` (a file named like ours but written by something else is not)."""
    data = _json_object(path)
    return data is not None and all(k in data for k in keys)


def _has_guardrail_header(p: Path) -> bool:
    return _format_tag(p / "guardrail.json") == "dsg-guardrail"


def _has_demo_header(p: Path) -> bool:
    return _json_object_with(p / "results.json", "dsg_version", "fit_config")


def _is_guardrail(p: Path) -> bool:
    return (
        _holds("guardrail.json", "guardrail.safetensors", "sae")(p)
        and _has_guardrail_header(p)
        and (p / "guardrail.safetensors").is_file()
        and (not (p / "sae").exists() or ((p / "sae").is_dir() and _is_sae(p / "sae")))
    )


def _is_sae(p: Path) -> bool:
    return (
        _holds("cfg.json", "sae_weights.safetensors", "training.json")(p)
        and _json_object_with(p / "cfg.json", "d_in", "d_sae")
        and (p / "sae_weights.safetensors").is_file()
    )


def _is_demo(p: Path) -> bool:
    return (
        _holds("results.json", "report.md", "report.png", "guardrail")(p)
        and _has_demo_header(p)
        and (not (p / "guardrail").exists() or _is_guardrail(p / "guardrail"))
    )


ARTIFACTS = {
    "guardrail": _is_guardrail,
    "weight edit": _is_edit,
    "SAE": _is_sae,
    "demo": _is_demo,
    "comparison": lambda p: _holds("runs", "compare.json", "report.html")(p) and _is_run_store(p / "runs"),
    "converted model": lambda p: (p / "dsg_conversion.json").is_file(),
}
"""What dsg writes, and how to recognise a folder that holds it (and nothing else)."""


def _is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())


def output_path(path: str | os.PathLike) -> Path:
    """An output path as every writer here reads it: `~` expanded (a shell leaves `--out=~/g` as written), so the
    checks and the write name one place; an empty one refused (it would name the working folder)."""
    if not str(path).strip():
        raise DSGError("The output path is empty; give a file or folder to write.")
    return Path(path).expanduser()


def refuse_working_folder(path: Path) -> None:
    """A DSGError where `path` is the working folder or one above it: an output published whole (a rename onto
    it) cannot take its place. Writers that add to a folder (data export, a resumed compare) may write there."""
    with contextlib.suppress(OSError, RuntimeError):  # a path that cannot be resolved is refused where it is read
        here, resolved = Path.cwd().resolve(), path.resolve()
        if resolved == here or resolved in here.parents:
            raise DSGError(f"Output path {str(path)!r} is the working folder or one above it; name a new folder "
                           "inside it, e.g. --out results.")  # fmt: skip


def _holds_a_result(p: Path) -> bool:
    """A folder dsg wrote as one result (a guardrail, a demo), even one a user has since added files to: its SAE
    copy, its guardrail and the rest must stay whole."""
    return _has_guardrail_header(p) or _has_demo_header(p)


def refuse_inside_result(path: str | os.PathLike, itself: bool = False) -> None:
    """A DSGError where `path` lies inside a folder dsg wrote as one result (`_holds_a_result`), or with `itself`
    is one (for a writer that adds to a folder rather than replacing it, such as `dsg data export`)."""
    path = Path(path)
    resolved = path.resolve()
    folders = ([resolved] if itself else []) + list(resolved.parents)
    inside = next((p for p in folders if p.is_dir() and _holds_a_result(p)), None)
    if inside is not None and inside == resolved:
        raise DSGError(f"Output path {str(path)!r} holds a result dsg wrote (a guardrail or a demo); writing into it "
                       "would change it. Choose a path outside it.")  # fmt: skip
    if inside is not None:  # a guardrail's SAE copy, a demo's guardrail: part of a result that must stay whole
        raise DSGError(f"Output path {str(path)!r} lies inside {str(inside)!r}, which dsg wrote as one result; "
                       "writing there would change it. Choose a path outside it.")  # fmt: skip


def _probe_writable(path: Path) -> None:
    """Create and remove a folder where `path` will be written, or a DSGError naming the path."""
    anchor = path.parent
    while not anchor.exists() and anchor != anchor.parent:
        anchor = anchor.parent
    if not anchor.is_dir():
        raise DSGError(f"Cannot write {str(path)!r}: {str(anchor)!r} is not a directory.")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".dsg-probe.", dir=anchor))
    except OSError as e:
        raise DSGError(f"Cannot write {str(path)!r}: {e.strerror or e} in {str(anchor)!r}.") from None


def _resolved(path: Path) -> Path:
    try:
        return path.expanduser().resolve()
    except (OSError, RuntimeError):  # RuntimeError: a loop of symbolic links (Python 3.11)
        raise DSGError(f"{str(path)!r} {missing(path)}.") from None


def given_twice(paths: Sequence[str | os.PathLike]) -> str | os.PathLike | None:
    """The first of `paths` that names, as written or through links, a file or folder named before it; None."""
    resolved = [Path(p).resolve() for p in paths]
    return next((p for i, p in enumerate(paths) if resolved[i] in resolved[:i]), None)


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them is not there
        return False


def _refuse_inputs(path: Path, inputs) -> None:
    target = _resolved(path)
    for i in inputs:
        if i is None:
            continue
        source = _resolved(Path(i))
        if source == target or target in source.parents or _same_file(source, target):  # a hard link too
            raise DSGError(f"Output {str(path)!r} would replace the input {str(i)!r}; choose another output path.")
        if source.is_dir() and source in target.parents:
            raise DSGError(f"Output {str(path)!r} lies inside the input folder {str(i)!r}; choose another output path.")


def check_output_dir(
    path: str | os.PathLike, kind: str, *, overwrite: bool = False, resume: bool = False, inputs=()
) -> Path:
    """Before any work: `path` may be written as a dsg `kind` folder (one of ARTIFACTS), or a DSGError says why.

    A missing or empty folder is fine. An existing `kind` folder is replaced only with `overwrite` (or, with
    `resume`, added to: a resumable run's own folder). Anything else (a file, a folder holding other things, an
    input of the command, a place that cannot be written) is refused.
    """
    path = output_path(path)
    if not resume:
        refuse_working_folder(path)
    if path.is_symlink():
        raise DSGError(f"Output path {str(path)!r} is a symbolic link; give the folder it should be written to.")
    if path.exists() and not path.is_dir():
        raise DSGError(f"Output path {str(path)!r} exists and is not a directory.")
    _refuse_inputs(path, inputs)
    refuse_inside_result(path)
    if path.is_dir() and not _is_empty_dir(path):
        if not ARTIFACTS[kind](path):
            raise DSGError(
                f"Output folder {str(path)!r} is not empty and does not hold a dsg {kind}; refusing to "
                "replace it (choose another output path)."
            )
        if not (overwrite or resume):
            article = "an" if kind == "SAE" or kind[0] in "aeiou" else "a"
            raise DSGError(
                f"Output folder {str(path)!r} already holds {article} {kind}; pass --overwrite to replace it."
            )
    _probe_writable(path)
    if not resume:  # a resumable run adds to its folder as it goes; it is guarded by its own lock instead
        _claim(path)
    return path


def check_output_file(path: str | os.PathLike, inputs=(), overwrite: bool = False, keys: Sequence[str] = ()) -> Path:
    """Before any work: `path` can be written as a file and is none of `inputs`, or a DSGError says why. An existing
    file is replaced only with `overwrite`, and only if it holds a JSON object with `keys` (what the command that
    writes it writes): a user's notes, question file, or another tool's JSON (a model's config.json) never is."""
    path = output_path(path)
    if path.is_dir():
        raise DSGError(f"Output file {str(path)!r} is a directory.")
    if path.is_symlink():
        raise DSGError(f"Output file {str(path)!r} is a symbolic link; give the file it should be written to.")
    _refuse_inputs(path, inputs)
    refuse_inside_result(path)  # a summary inside a guardrail (or its SAE copy) would change that result
    if path.exists():
        found = _json_object(path)
        if found is None or not set(keys) <= set(found):
            raise DSGError(f"Output file {str(path)!r} exists and does not hold a summary this command wrote; "
                           "refusing to replace it (choose another output path).")  # fmt: skip
        if not overwrite:
            raise DSGError(f"Output file {str(path)!r} already exists; pass --overwrite to replace it.")
    if not path.parent.is_dir():
        raise DSGError(f"Cannot write {str(path)!r}: its folder {str(path.parent)!r} does not exist.")
    _probe_writable(path)
    _claim(path)
    return path


_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2  # renameat2's flags (linux/fs.h)


def _renameat2(a: Path, b: Path, flag: int) -> bool:
    """Linux renameat2(a, b, flag): True when done; False where the system lacks the call or the file system the
    flag; an OSError for any other failure (EEXIST: RENAME_NOREPLACE found something at `b`)."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), flag) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), os.fsdecode(b))


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (RENAME_EXCHANGE); False where that is not available."""
    try:
        return _renameat2(a, b, _RENAME_EXCHANGE)
    except OSError:
        return False


LOCK_WAIT_SECONDS = 60  # the longest a publish waits for another's lock on the same output path


def _lock_file(path: Path) -> int | None:
    """An open descriptor of the lock file for publishing `path` (one per output path, in a private folder of the
    temporary directory, never removed), or None where none can be had safely: a folder that is not this user's
    own and private (another user may have made it first), a lock that is a symbolic link, or no writable place."""
    where = os.path.join(os.path.realpath(path.parent), path.name)
    key = hashlib.sha256(os.fsencode(where)).hexdigest()[:32]
    folder = Path(tempfile.gettempdir()) / f"dsg-publish-{os.getuid()}"
    try:
        folder.mkdir(mode=0o700, exist_ok=True)
        st = os.lstat(folder)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
            return None
        return os.open(folder / f"{key}.lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    except OSError:
        return None


@contextlib.contextmanager
def _publishing(path: Path):
    """Hold the lock that dsg processes on this machine take to publish `path`: the claim check and the move into
    place then run as one step, so of several commands given one output at once exactly one wins. Where no lock
    file can be had (`_lock_file`), the claim holds to the check just before the move (and, for an empty path, to
    the move itself: _publish)."""
    fd = _lock_file(path)
    if fd is None:
        yield
        return
    try:
        deadline = time.monotonic() + LOCK_WAIT_SECONDS
        while True:  # held by another for a check and a rename or two: a wait of milliseconds
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise DSGError(f"Another process has held the lock for writing {str(path)!r} for "
                                   f"{LOCK_WAIT_SECONDS} s; nothing was written (run again).") from None  # fmt: skip
                time.sleep(0.01)
        yield
    finally:
        os.close(fd)


def _publish(tmp: Path, path: Path, remove, fallback) -> None:
    """Move the finished `tmp` (a file or a folder) to `path`, unless another process wrote `path` after this one
    claimed it (check_output_dir / check_output_file): then a DSGError, and what that process wrote stays.

    Under the publishing lock (`_publishing`) the claim check and the move are one step for dsg processes. Where
    the system allows, a path that was empty is taken with RENAME_NOREPLACE, which fails if anything (another
    program's file) got there first, and a path that held an earlier result is swapped with RENAME_EXCHANGE, so it
    is never missing. `remove` deletes what was taken out, after the lock is let go; `fallback(tmp, path)` moves
    without renameat2."""
    with _publishing(path):
        empty = not os.path.lexists(path)  # before the check: what lands after it is not replaced either
        _check_claim(path)
        if not empty and os.path.isdir(path) != os.path.isdir(tmp):
            kind = "folder" if os.path.isdir(path) else "file"
            raise DSGError(f"{str(path)!r} is a {kind}; refusing to replace it with a "
                           f"{'file' if kind == 'folder' else 'folder'}.")  # fmt: skip
        swapped = not empty and _exchange(tmp, path)
        try:
            moved = swapped or (empty and _renameat2(tmp, path, _RENAME_NOREPLACE))
            if not moved:  # no renameat2 here
                fallback(tmp, path)
        except OSError as e:  # something got to the empty path first (a folder, with the fallback)
            if e.errno in (errno.EEXIST, errno.ENOTEMPTY):
                raise _written_meanwhile(path) from None
            raise
        _settle_claim(path)
    if swapped:
        remove(tmp)  # it now holds the old result


def remove_tree(path: Path, what: str = "the replaced output") -> None:
    """Delete the folder `path` (what a publish took out of place, or a staging folder). A folder the user made
    read-only (chmod 555) keeps its entries: its folders are then made writable and it goes on a second try, and
    if that fails too, one line on stderr names what is left, instead of a hidden folder left without a word."""
    if os.path.islink(path):  # a link put there meanwhile: the link goes, never what it leads to
        with contextlib.suppress(OSError):
            os.unlink(path)
        return
    try:
        shutil.rmtree(path)
        return
    except FileNotFoundError:
        return
    except OSError:
        pass
    with contextlib.suppress(OSError):
        _make_writable(path)
    try:
        shutil.rmtree(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        with contextlib.suppress(OSError):  # the terminal may be gone
            print(f"dsg: warning: could not delete {what} at {str(path)!r} ({e.strerror or e}); delete it yourself.",
                  file=sys.stderr)  # fmt: skip


def _make_writable(root: Path) -> None:
    mode = os.lstat(root).st_mode
    if not stat.S_ISDIR(mode):  # a link or a file: nothing to open up, and never what a link leads to
        return
    os.chmod(root, stat.S_IMODE(mode) | stat.S_IRWXU)
    for entry in os.scandir(root):
        if entry.is_dir(follow_symlinks=False):
            _make_writable(Path(entry.path))


class atomic_directory:
    """Build a directory in a temporary sibling and move it into place only if the block succeeds.

    An existing `kind` folder (or an empty one) at `path` is replaced; anything else there is refused before the
    block runs. The old folder stays whole until the new one is complete, and the two are swapped in one atomic
    step where the system allows (renameat2), so `path` is never missing or half-written.
    """

    def __init__(self, path: str | os.PathLike, kind: str):
        self.path, self.kind = output_path(path), kind

    def __enter__(self) -> Path:
        refuse_working_folder(self.path)
        if self.path.is_symlink():
            raise DSGError(f"Output path {str(self.path)!r} is a symbolic link; give the folder to write to.")
        if self.path.exists() and not self.path.is_dir():
            raise DSGError(f"Output path {str(self.path)!r} exists and is not a directory.")
        if self.path.is_dir() and not _is_empty_dir(self.path) and not ARTIFACTS[self.kind](self.path):
            raise DSGError(
                f"Output folder {str(self.path)!r} is not empty and does not hold a dsg {self.kind}; "
                "refusing to replace it."
            )
        parent = self.path.parent
        anchor = parent
        while not os.path.lexists(anchor) and anchor != anchor.parent:
            anchor = anchor.parent
        if not anchor.is_dir():  # mkdir would say only "File exists"
            raise DSGError(f"Cannot write {str(self.path)!r}: {str(anchor)!r} is a file, not a folder.")
        try:
            parent.mkdir(parents=True, exist_ok=True)
            self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.", dir=parent))
        except OSError as e:
            raise DSGError(f"Cannot write {str(self.path)!r}: {e.strerror or e}.") from None
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
        try:  # Ctrl-C, SIGTERM or SIGHUP (cli.Terminated) may land here too: the staging folder goes either way
            self._publishable()
            self._move_into_place()
        except BaseException:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise

    def _move_into_place(self) -> None:
        _publish(self.tmp, self.path, remove_tree, self._renames)

    @staticmethod
    def _renames(tmp: Path, path: Path) -> None:
        """Without renameat2: a rename into an empty place, or two renames; if the second fails, the old folder
        goes back."""
        if not path.exists():
            os.rename(tmp, path)  # fails on a folder that is there and not empty
            return
        old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old.", dir=path.parent)) / "x"
        try:
            os.replace(path, old)
            try:
                os.replace(tmp, path)
            except BaseException:
                os.replace(old, path)
                raise
        finally:
            remove_tree(old.parent)
