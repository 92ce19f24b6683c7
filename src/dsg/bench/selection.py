"""How the comparison reads a configuration's scores: the summary per task, the forget and retain numbers, the
paper's selection rule and the Pareto front."""

from __future__ import annotations

from collections.abc import Sequence

from ..errors import DSGError
from ..eval.metrics import summarize_task


def summarize(scores: dict, base: dict, forget_task: str, norm: bool = False) -> dict:
    """Per task (forget task first, then the retain tasks by name): accuracy, accuracy on the base-correct subset,
    gate rate; forget metrics; pooled retain accuracy. norm: by the length-normalised answers (acc_norm)."""
    key = "correct_norm" if norm else "correct"
    tasks = {}
    for task in [forget_task] + sorted(t for t in scores if t != forget_task):
        s = summarize_task(scores[task][key], scores[task]["gated"], base[task][key])
        tasks[task] = {
            "n": s.n,
            "accuracy": s.accuracy,
            "n_base_correct": s.n_base_correct,
            "accuracy_base_correct": s.accuracy_base_correct,
            "gate_rate": s.gate_rate,
        }
    retain = [t for t in scores if t != forget_task]
    n = sum(len(scores[t][key]) for t in retain)
    pooled = sum(sum(scores[t][key]) for t in retain) / n if n else None
    return {
        "tasks": tasks,
        "forget_accuracy": tasks[forget_task]["accuracy"],
        "forget_accuracy_base_correct": tasks[forget_task]["accuracy_base_correct"],
        "retain_pooled": pooled,
    }


def forget_value(summary: dict, metric: str) -> float:
    v = summary["forget_accuracy_base_correct"] if metric == "base_correct" else summary["forget_accuracy"]
    return summary["forget_accuracy"] if v is None else v


def select_config(points: Sequence[dict], base_retain: float, threshold: float = 0.99) -> tuple[int, bool]:
    """The paper's rule over points {"forget", "retain"} (accuracies): (index, whether it qualified).

    Qualified: retain >= threshold · base_retain. Among those the lowest forget (ties: higher retain, then the
    earlier point); with none qualified, the highest retain (ties: lower forget, then earlier).
    """
    if not points:
        raise DSGError("No configuration to select from.")
    qualified = [i for i, p in enumerate(points) if p["retain"] >= threshold * base_retain - 1e-12]
    if qualified:
        return min(qualified, key=lambda i: (points[i]["forget"], -points[i]["retain"], i)), True
    return min(range(len(points)), key=lambda i: (-points[i]["retain"], points[i]["forget"], i)), False


def dominates(a: dict, b: dict) -> bool:
    """a Pareto-dominates b: forget no higher, retain no lower, and strictly better in one."""
    return (
        a["forget"] <= b["forget"]
        and a["retain"] >= b["retain"]
        and (a["forget"] < b["forget"] or a["retain"] > b["retain"])
    )


def pareto_front(points: Sequence[dict]) -> list[int]:
    """Indices of the points no other point dominates (lower forget and higher retain are better)."""
    return [i for i, p in enumerate(points) if not any(dominates(q, p) for j, q in enumerate(points) if j != i)]


def versus(a: dict, b: dict) -> str:
    """How point a stands against point b."""
    if dominates(a, b):
        return "dsg dominates"
    if dominates(b, a):
        return "dominates dsg"
    return "equal" if a == b else "trade-off"
