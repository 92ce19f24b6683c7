"""The benchmark: the shared setting (`setting`), the comparison's run store (`store`), selection and the Pareto
front (`selection`), the sweep of every method (`sweep`, `dsg compare`), reports (`report`) and the demo
(`demo`, `dsg demo`)."""

from .demo import DemoConfig, run_demo
from .selection import dominates, pareto_front, select_config
from .setting import DEMO_FIT, Bench, BenchSetting
from .store import RunStore, config_key
from .sweep import CompareConfig, run_compare

__all__ = [
    "DEMO_FIT",
    "Bench",
    "BenchSetting",
    "CompareConfig",
    "DemoConfig",
    "RunStore",
    "config_key",
    "dominates",
    "pareto_front",
    "run_compare",
    "run_demo",
    "select_config",
]
