"""The unlearning-method interface and its registry.

An `UnlearningMethod` has a name, a config dataclass, a grid of configurations per compute budget, and `fit`,
which turns one configuration into an Intervention (runtime/intervention.py: a guardrail or a weight edit) on the
bench's model. `dsg compare` sweeps every registered method the same way. A new method is one file with a
subclass registered under its name (`@METHODS.register("name")`), plus its import in `dsg/methods/__init__.py`.

Grid entries are plain dicts of the config's fields (plus a method's `extra_fields`); the `fixed` fields are part
of every entry (they name the variant) and cannot be set by a grid file.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

from ..errors import DSGError
from ..registry import Registry
from ..runtime.intervention import Intervention

if TYPE_CHECKING:
    from ..bench.setting import Bench

METHODS: Registry[type[UnlearningMethod]] = Registry("unlearning method")
BUDGET_LEVELS = ("smoke", "default", "wide")


class Fitted(NamedTuple):
    """One fitted configuration: the intervention to apply, its cost and a JSON record that rebuilds or
    describes it."""

    intervention: Intervention
    cost: dict  # {"seconds", "flops", ...}
    record: dict


def budget_level(budget: float) -> str:
    """< 0.5 one configuration per method ("smoke"), >= 2 the wide grids, else the default ones."""
    return "smoke" if budget < 0.5 else ("default" if budget < 2 else "wide")


def scaled_steps(base: int, budget: float) -> int:
    """Training steps scale linearly with the budget (at least 2)."""
    return max(2, round(base * budget))


class UnlearningMethod:
    name: ClassVar[str]
    label: ClassVar[str]
    kind: ClassVar[str]  # "guardrail" or "edit"
    config_class: ClassVar[type]
    seeded: ClassVar[bool] = False  # the run's --seed is part of every configuration (training methods)
    fixed: ClassVar[dict[str, Any]] = {}
    extra_fields: ClassVar[frozenset[str]] = frozenset()

    def grid(self, bench: Bench, budget: float) -> list[dict]:
        """The configurations `dsg compare` sweeps at this budget (see budget_level)."""
        raise NotImplementedError

    def fit(self, bench: Bench, cfg: dict, run_dir: Path, progress: bool) -> Fitted:
        """Fit one configuration; a weight edit is saved into `run_dir`."""
        raise NotImplementedError

    def restore(self, bench: Bench, run: dict, run_dir: Path) -> Fitted | None:
        """The fitted configuration of a stored run, or None when it must be fitted again."""
        raise NotImplementedError

    def settings(self, bench: Bench, cfg: dict) -> dict:
        """Everything one grid entry's results depend on beyond the bench (the run's store key): the entry, with
        every setting the method fills in for it, so that a changed default is a new run, not a stored one."""
        return dict(cfg)

    @classmethod
    def grid_fields(cls) -> set[str]:
        """The keys a grid entry may set (a grid file is checked against them)."""
        return ({f.name for f in dataclasses.fields(cls.config_class)} | set(cls.extra_fields)) - set(cls.fixed)

    def entries(self, configs: list[dict]) -> list[dict]:
        """Grid entries from user configs: the fixed fields first, as in the built-in grids."""
        return [self.fixed | dict(c) for c in configs]

    def config(self, cfg: dict):
        """The config dataclass for one grid entry. Fixed and extra keys that are not config fields (a method
        name, a setting the method reads itself) are left out; any other unknown key is an error."""
        names = {f.name for f in dataclasses.fields(self.config_class)}
        skip = (set(self.fixed) | set(self.extra_fields)) - names
        unknown = sorted(set(cfg) - names - skip)
        if unknown:
            raise DSGError(f"{self.name} has no setting {unknown[0]!r}; its settings: {', '.join(sorted(names))}.")
        return self.config_class(**{k: v for k, v in cfg.items() if k in names})
