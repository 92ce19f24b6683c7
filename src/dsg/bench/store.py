"""The comparison's run store: every finished configuration as one JSON file, written atomically, so an
interrupted `dsg compare` resumes where it stopped and never recomputes a finished configuration.

    <out>/runs/<method>/<key>.json         a configuration's fit record and validation scores (or its error)
    <out>/runs/<method>/<key>.test.json    the chosen configuration's test-split results
    <out>/runs/<method>/<key>.edit/        a weight edit (kept for chosen configurations unless --keep-edits)
    <out>/runs/base/<key>.validation.json  the base model's results

key = a hash of the method, its configuration and the bench context (model weights, SAE, corpora, questions).

Each file carries `content_sha256`: a hash of its content and of its own place in the store (method, key, kind), so
a file that was edited, cut short, or copied over another configuration's is not read back: it is computed again.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from ..errors import DSGError
from ..files import json_text, read_json, write_json_atomic

COMPARE_VERSION = 3  # 3: a held gate judged at words only, so runs stored under 2 are not reused
HASH_FIELD = "content_sha256"


def config_key(method: str, config: dict, context: dict) -> str:
    blob = json.dumps({"v": COMPARE_VERSION, "method": method, "config": config, "context": context}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _content_sha256(place: str, data: dict) -> str:
    body = {k: v for k, v in data.items() if k != HASH_FIELD}
    return hashlib.sha256(json_text({"place": place, "content": body}).encode()).hexdigest()


class RunStore:
    """`discarded(path, why)` is told of each stored file that is not read back (edited, cut short, misplaced)."""

    def __init__(self, out: str | Path, discarded=None):
        self.root = Path(out) / "runs"
        self.discarded = discarded or (lambda path, why: None)

    def path(self, method: str, key: str, suffix: str = "") -> Path:
        return self.root / method / f"{key}{suffix}.json"

    def edit_dir(self, method: str, key: str) -> Path:
        return self.root / method / f"{key}.edit"

    def get(self, method: str, key: str, suffix: str = "") -> dict | None:
        """The stored content, or None: nothing there, or a file that is not what `put` wrote at this place."""
        p = self.path(method, key, suffix)
        if not p.is_file():
            return None
        try:
            data = read_json(p)
        except DSGError:
            self.discarded(p, "cannot be read as a JSON object (cut short?)")
            return None
        if data.get(HASH_FIELD) != _content_sha256(f"{method}/{key}{suffix}", data):
            why = "has no content hash" if HASH_FIELD not in data else "does not match its content hash"
            self.discarded(p, f"{why} (edited, or another configuration's)")
            return None
        return {k: v for k, v in data.items() if k != HASH_FIELD}

    def put(self, method: str, key: str, data: dict, suffix: str = "") -> None:
        place = f"{method}/{key}{suffix}"  # the hash leaves out any stale hash field, which this one replaces
        write_json_atomic(self.path(method, key, suffix), data | {HASH_FIELD: _content_sha256(place, data)})

    def prune_edits(self, method: str, keys: list[str], keep: str) -> None:
        """Delete the weight edits of `keys` except `keep`'s."""
        for key in keys:
            d = self.edit_dir(method, key)
            if key != keep and d.is_dir():
                shutil.rmtree(d, ignore_errors=True)
