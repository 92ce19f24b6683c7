"""The guardrail: its rule as pure tensor functions (`rule`), the Guardrail value object and its files
(`guardrail`), latent statistics (`stats`), selection scorers (`scorers`), fitting (`fit`) and the audit view
(`inspect`)."""

from .fit import CorpusStats, FitConfig, fit, measure
from .guardrail import Guardrail, SelectedLatents
from .rule import CLAMP_MODES, GateState
from .scorers import SCORERS, select_by_frequency, select_features
from .stats import LatentSums, collect_stats, gate_rates

__all__ = [
    "CLAMP_MODES",
    "SCORERS",
    "CorpusStats",
    "FitConfig",
    "GateState",
    "Guardrail",
    "LatentSums",
    "SelectedLatents",
    "collect_stats",
    "fit",
    "gate_rates",
    "measure",
    "select_by_frequency",
    "select_features",
]
