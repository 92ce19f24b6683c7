"""The comparison's run store: every finished configuration as one JSON file, written atomically, so an
interrupted `dsg compare` resumes where it stopped and never recomputes a finished configuration.

    <out>/runs/<method>/<key>.json         a configuration's fit record and validation scores (or its error)
    <out>/runs/<method>/<key>.test.json    the chosen configuration's test-split results
    <out>/runs/<method>/<key>.edit/        a weight edit (kept for chosen configurations unless --keep-edits)
    <out>/runs/base/<key>.validation.json  the base model's results

key = a hash of the method, its configuration and the bench context (model weights, SAE, corpora, questions).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from ..files import read_json, write_json_atomic

COMPARE_VERSION = 2


def config_key(method: str, config: dict, context: dict) -> str:
    blob = json.dumps({"v": COMPARE_VERSION, "method": method, "config": config, "context": context}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class RunStore:
    def __init__(self, out: str | Path):
        self.root = Path(out) / "runs"

    def path(self, method: str, key: str, suffix: str = "") -> Path:
        return self.root / method / f"{key}{suffix}.json"

    def edit_dir(self, method: str, key: str) -> Path:
        return self.root / method / f"{key}.edit"

    def get(self, method: str, key: str, suffix: str = "") -> dict | None:
        p = self.path(method, key, suffix)
        return read_json(p) if p.is_file() else None

    def put(self, method: str, key: str, data: dict, suffix: str = "") -> None:
        write_json_atomic(self.path(method, key, suffix), data)

    def prune_edits(self, method: str, keys: list[str], keep: str) -> None:
        """Delete the weight edits of `keys` except `keep`'s."""
        for key in keys:
            d = self.edit_dir(method, key)
            if key != keep and d.is_dir():
                shutil.rmtree(d, ignore_errors=True)
