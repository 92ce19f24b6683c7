"""`dsg compare`: DSG against the unlearning baselines on the same model, corpora and question splits.

    dsg compare                       # the embedded default: SmolLM2-135M, shipped SAE, forget cyber
    dsg compare --budget 0.05 --validation-questions 16 --test-questions 16      # a smoke run
    dsg compare --grid my_grids.json      # {"rmu": [{"steering_coeff": 6.5, "alpha": 1200}, ...], ...}

Every registered method (dsg.methods) is swept over its grid of key hyperparameters (`--budget` scales training
steps linearly and widens the grids: < 0.5 one configuration per method, >= 2 the wide grids), and every
configuration is scored on the VALIDATION questions. Each method's configuration is then picked by the paper's
rule (bench/selection.py):

    lowest forget accuracy subject to pooled retain accuracy >= 99% of the base model's
    (pooled = all retain tasks' questions together); if no configuration qualifies, the best retain accuracy

and only the chosen configuration is run through every suite (dsg.eval.suites) on the TEST split: questions,
held-out retain perplexity and greedy generations for a fixed set of open-ended prompts. The forget accuracy is
measured on the base model's correctly answered questions by default (`--forget-metric base_correct`, the
paper's subset; `all` for every question).

Resumable: every finished configuration is written atomically to the run store (bench/store.py) and is never
recomputed. Weight edits are kept until selection, then pruned to the chosen ones (`--keep-edits` keeps all); a
pruned edit that is chosen later is retrained from its seed.

Cost per configuration: wall time and a FLOPs estimate of the fit (dsg.methods.cost). DSG and the clamps need
forward passes only: the latent statistics (shared by all their configurations, and counted in full for each)
plus gate calibration; the training baselines count their reference passes and training steps.

Outputs in `--out`: compare.json, report.html (bench/report.py) and the printed table.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .. import __version__
from ..errors import DSGError
from ..eval.dilution import summarize_dilution
from ..eval.suites import missing_suites, run_suites
from ..files import check_output_dir, exclusive, read_json, write_json_atomic, write_text_atomic
from ..guard.fit import FitConfig
from ..methods import METHODS, UnlearningMethod
from .report import report_html, short_config
from .selection import dominates, forget_value, pareto_front, select_config, summarize, versus
from .setting import Bench, BenchSetting, embedded_bench, files_bench
from .store import RunStore, config_key

FORGET_METRICS = ("base_correct", "all")


@dataclass
class CompareConfig(BenchSetting):
    """What `dsg compare` runs on, how much it sweeps, and where it writes."""

    forget_corpus: str | None = None
    """Your own data instead of the embedded domains: forget corpus (.txt/.jsonl)."""
    retain_corpus: str | None = None
    """Your own data: retain corpus (.txt/.jsonl)."""
    calibration_corpus: str | None = None
    """Your own data: gate calibration texts (default: the retain corpus)."""
    forget_questions: str | None = None
    """Your own data: forget-domain questions (JSONL); split 40/60 into validation/test by a hash of each question."""
    retain_questions: str | None = None
    """Your own data: comma-separated retain question files (JSONL; task = file stem), split like the forget ones."""
    heldout: str | None = None
    """Your own data: held-out retain text for perplexity (.txt/.jsonl; none: perplexity is skipped)."""
    methods: str = "all"
    """Comma-separated methods to run (dsg, dsg_paper, static_clamp, conditional_clamp, rmu, ga, graddiff, npo, or
    any other registered in dsg.methods), or all."""
    budget: float = 1.0
    """Scales training steps linearly; < 0.5 runs one configuration per method, >= 2 the wide grids."""
    grid: str | None = None
    """JSON file {method: [config, ...]} replacing those methods' built-in grids (keys: the method's config fields)."""
    validation_questions: int = 120
    """Validation questions per task (used to pick each method's configuration). With 2 retain tasks the 99 % rule
    then tolerates 2 lost retain questions; fewer questions make the rule mostly noise."""
    test_questions: int = 150
    """Test questions per task (reported for the chosen configurations)."""
    perplexity_texts: int = 32
    """Held-out retain documents for perplexity (test phase only)."""
    generation_tokens: int = 40
    """Greedy tokens generated per open-ended prompt."""
    fit_sequences: int = 512
    """Sequences per corpus for DSG/clamp latent statistics."""
    retain_threshold: float = 0.99
    """Selection rule: pooled retain accuracy must be at least this fraction of the base model's."""
    forget_metric: str = "base_correct"
    """Forget accuracy on the base model's correctly answered questions (base_correct, the paper's) or on all."""
    keep_edits: bool = False
    """Keep every configuration's weight edit (default: only the chosen ones)."""
    seed: int = 0
    """Seed for every training baseline."""
    out: str = "dsg-compare"
    """Output folder (compare.json, report.html, runs/)."""

    def __post_init__(self):
        if self.forget_metric not in FORGET_METRICS:
            raise DSGError(f"forget_metric must be one of {FORGET_METRICS}, got {self.forget_metric!r}.")
        if self.budget <= 0:
            raise DSGError(f"budget must be positive, got {self.budget}.")
        if not 0 < self.retain_threshold <= 1:
            raise DSGError(f"retain_threshold must lie in (0, 1], got {self.retain_threshold}.")
        if self.validation_questions < 1 or self.test_questions < 1:
            raise DSGError("validation_questions and test_questions must be at least 1.")

    def method_names(self) -> list[str]:
        if self.methods.strip() == "all":
            return list(METHODS.names())
        names = [m.strip() for m in self.methods.split(",") if m.strip()]
        bad = [m for m in names if m not in METHODS]
        if bad or not names:
            raise DSGError(f"Unknown method(s) {bad} in --methods; choose from {', '.join(METHODS.names())}.")
        return names

    def bench(self, model=None, tokenizer=None) -> Bench:
        """The embedded domains, or the user's files when --forget-corpus is given."""
        sizes = dict(
            n_validation=self.validation_questions,
            n_test=self.test_questions,
            n_perplexity=self.perplexity_texts,
            fit_sequences=self.fit_sequences,
            generation_tokens=self.generation_tokens,
            model=model,
            tokenizer=tokenizer,
        )
        if not self.forget_corpus:
            return embedded_bench(self, **sizes)
        missing = [f for f in ("retain_corpus", "forget_questions", "retain_questions") if not getattr(self, f)]
        if missing:
            raise DSGError(f"With --forget-corpus, also pass {', '.join('--' + m.replace('_', '-') for m in missing)}.")
        return files_bench(
            self,
            self.forget_corpus,
            self.retain_corpus,
            self.calibration_corpus,
            self.forget_questions,
            self.retain_questions,
            self.heldout,
            **sizes,
        )


BENCH_FIT_SETTINGS = {"hook", "max_length", "max_sequences", "seed"}  # the statistics pass's: guard.fit._measured


def read_grid(path: str, names: Sequence[str]) -> dict[str, list[dict]]:
    """{method: grid entries} from the JSON file `path`, each entry checked against the method's settings."""
    data = read_json(path)
    grids = {}
    for name, configs in data.items():
        if name not in METHODS:
            raise DSGError(f"{path!r} names method {name!r}; expected one of {', '.join(METHODS.names())}.")
        if not isinstance(configs, list) or not configs or not all(isinstance(c, dict) for c in configs):
            raise DSGError(f"{path!r}: the grid of {name!r} must be a non-empty list of objects.")
        method = METHODS[name]
        allowed = method.grid_fields()
        for c in configs:
            shared = sorted(set(c) & BENCH_FIT_SETTINGS) if method.config_class is FitConfig else []
            if shared:  # every configuration's statistics are measured once, with the bench's settings
                raise DSGError(f"{path!r}: {name} sets {shared[0]!r}, which is the comparison's own (every "
                               "configuration reads the latent statistics measured once with it); leave it out of "
                               "the grid.")  # fmt: skip
            bad = sorted(set(c) - allowed)
            if bad:
                raise DSGError(f"{path!r}: {name} has no setting {bad[0]!r}; allowed: {', '.join(sorted(allowed))}.")
            if method.seeded and "seed" in c:  # the run's --seed is every trained configuration's
                raise DSGError(f"{path!r}: {name}'s seed is the run's (--seed), so a grid entry cannot set it.")
        seen = [json.dumps(c, sort_keys=True) for c in configs]
        twice = next((i for i, c in enumerate(seen) if c in seen[:i]), None)
        if twice is not None:  # it would run once and be listed twice
            raise DSGError(f"{path!r}: the grid of {name!r} repeats its entry {twice} ({seen[twice]}).")
        if name in names:
            grids[name] = method().entries(configs)
            if method.config_class is not FitConfig:  # built without a bench: check its values before any work
                for entry in grids[name]:
                    try:
                        method().config(entry)
                    except DSGError as exc:
                        raise DSGError(f"{path!r}: {name} {json.dumps(entry)}: {exc}") from None
    return grids


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _usable_run(run: dict, key: str) -> bool:
    """Whether a stored run holds what a finished one does: its own key and configuration, and an error message or
    validation scores."""
    if run.get("key") != key or not isinstance(run.get("config"), dict):
        return False
    if "error" in run:
        return isinstance(run["error"], str)
    validation = run.get("validation")
    return isinstance(validation, dict) and isinstance(validation.get("scores"), dict)


class Sweep:
    """One comparison: the bench, the store, the base model's results and each method's swept runs."""

    def __init__(self, config: CompareConfig, bench: Bench, progress: bool):
        # how the suites batch and how long generations run are options of this run, not of the bench
        bench = dataclasses.replace(
            bench, batch_size=config.eval_batch_size, generation_tokens=config.generation_tokens
        )
        self.config, self.bench, self.progress = config, bench, progress
        self.store = RunStore(config.out, lambda path, why: _log(f"{path} {why}; computing it again"))
        self.context = bench.context()
        self.base_key = config_key("base", {}, self.context)

    def summary(self, scores: dict, base: dict) -> dict:
        return summarize(scores, base, self.bench.forget_task, self.config.normalized)

    def point(self, run: dict) -> dict:
        s = run["validation"]["summary"]
        return {"forget": forget_value(s, self.config.forget_metric), "retain": s["retain_pooled"]}

    def base(self, split: str) -> dict:
        """The base model's results on `split` (stored once; a suite registered since is run and added)."""
        found = self.store.get("base", self.base_key, f".{split}") or {}
        missing = missing_suites(found, split)
        if missing:
            _log(f"scoring the base model on the {split} split: {', '.join(missing)}")
            found |= run_suites(self.bench, split, None, self.progress, only=missing)
            self.store.put("base", self.base_key, found, f".{split}")
        return found

    def run_config(self, method: UnlearningMethod, cfg: dict) -> dict:
        """A configuration's stored run, fitting and scoring it on validation first if needed (a DSGError during
        the fit is recorded as the run's error and never retried)."""
        key = config_key(method.name, method.settings(self.bench, cfg), self.context)
        run = self.store.get(method.name, key)
        if run is not None and not _usable_run(run, key):
            _log(f"[{method.name}] {self.store.path(method.name, key)} is not a run this dsg wrote (edited or cut "
                 "short); computing it again")  # fmt: skip
            run = None
        if run is not None:
            made_by = run.get("dsg_version")
            note = f"; made by dsg {made_by}" if made_by != __version__ else ""
            _log(f"[{method.name}] done before: {short_config(cfg)}  ({key}{note})")
            missing = [] if "error" in run else missing_suites(run["validation"], "validation")
            if missing:
                fitted = self.refit(method, run, self.store.edit_dir(method.name, key))
                run["validation"] |= run_suites(self.bench, "validation", fitted.intervention, self.progress, missing)
                self.store.put(method.name, key, run)
            return run
        _log(f"[{method.name}] fitting {short_config(cfg)}  ({key})")
        record = {"method": method.name, "key": key, "config": cfg, "dsg_version": __version__}
        try:
            fitted = method.fit(self.bench, cfg, self.store.edit_dir(method.name, key), self.progress)
        except DSGError as e:  # e.g. no latent passes a filter, or training diverged
            _log(f"[{method.name}] failed: {e}")
            run = record | {"error": str(e)}
        else:
            fitted.intervention.check_model(self.bench.model)
            t = time.perf_counter()
            scores = run_suites(self.bench, "validation", fitted.intervention, self.progress)
            run = record | {
                "cost": fitted.cost,
                "record": fitted.record,
                "validation": scores,
                "eval_seconds": round(time.perf_counter() - t, 3),
            }
        self.store.put(method.name, key, run)
        return run

    def sweep(self, method: UnlearningMethod, grid: list[dict], base_val: dict) -> tuple[list[dict], list[dict]]:
        """(successful runs with their validation summaries, failed runs) over the method's grid."""
        runs, failed = [], []
        for cfg in grid:
            cfg = {**cfg, "seed": self.config.seed} if method.seeded else dict(cfg)
            run = self.run_config(method, cfg)
            if "error" in run:
                failed.append(run)
                continue
            run["validation"]["summary"] = self.summary(run["validation"]["scores"], base_val["scores"])
            runs.append(run)
        if not runs:
            _log(f"[{method.name}] every configuration failed; the method is left out of the comparison")
        return runs, failed

    def refit(self, method: UnlearningMethod, run: dict, edit_dir: Path):
        """A stored configuration's intervention again: restored, or (a pruned edit) retrained from its seed; its
        recorded cost stays the first run's."""
        fitted = method.restore(self.bench, run, edit_dir)
        if fitted is None:
            fitted = method.fit(self.bench, run["config"], edit_dir, self.progress)
        fitted.intervention.check_model(self.bench.model)
        stored, now = run.get("record", {}).get("prompt_level"), fitted.record.get("prompt_level")
        if stored != now:  # a guardrail is fitted again for test: its rule must be the one scored on validation
            raise DSGError(f"[{method.name}] fitted again, configuration {short_config(run['config'])} has prompt "
                           f"level {now!r}, not the {stored!r} its validation scores were measured with; rerun it "
                           "in a fresh --out folder.")  # fmt: skip
        return fitted

    def test(self, method: UnlearningMethod, run: dict) -> dict:
        """The chosen configuration's results on the test split (stored once; a suite registered since is run and
        added)."""
        key = run["key"]
        found = self.store.get(method.name, key, ".test") or {}
        missing = missing_suites(found, "test")
        if missing:
            _log(f"[{method.name}] test split for the chosen configuration {short_config(run['config'])}")
            fitted = self.refit(method, run, self.store.edit_dir(method.name, key))
            found |= run_suites(self.bench, "test", fitted.intervention, self.progress, only=missing)
            self.store.put(method.name, key, found, ".test")
        return found

    def result(self, method, runs, idx, qualified, test, base_test, on_front) -> dict:
        run = runs[idx]
        summary = self.summary(test["scores"], base_test["scores"])
        base_summary = self.summary(base_test["scores"], base_test["scores"])
        ppl, base_ppl = test.get("perplexity"), base_test.get("perplexity")
        base_retain = base_summary["retain_pooled"]
        return {
            "label": method.label,
            "kind": method.kind,
            "chosen": {"config": run["config"], "key": run["key"], "qualified": qualified, "record": run["record"]},
            "test": {
                "forget": forget_value(summary, self.config.forget_metric),
                "forget_accuracy": summary["forget_accuracy"],
                "forget_accuracy_base_correct": summary["forget_accuracy_base_correct"],
                "retain": {
                    t: summary["tasks"][t]["accuracy"] for t in sorted(summary["tasks"]) if t != self.bench.forget_task
                },
                "retain_pooled": summary["retain_pooled"],
                "retain_relative": summary["retain_pooled"] / base_retain if base_retain else None,
                "tasks": summary["tasks"],
                "perplexity": ppl,
                "perplexity_change": ppl["perplexity"] / base_ppl["perplexity"] - 1 if ppl and base_ppl else None,
                "dilution": summarize_dilution(test["dilution"], base_test["dilution"], self.config.normalized)
                if test.get("dilution") and base_test.get("dilution")
                else None,
            },
            "generations": test.get("generations", []),
            "suites": {k: v for k, v in test.items() if k not in ("scores", "perplexity", "generations", "dilution")},
            "fit_seconds": run["cost"]["seconds"],
            "flops": run["cost"]["flops"],
            "cost": run["cost"],
            "sweep": [
                {
                    "key": r["key"],
                    "config": r["config"],
                    "fit_seconds": r["cost"]["seconds"],
                    "flops": r["cost"]["flops"],
                    "eval_seconds": r.get("eval_seconds"),
                    "on_pareto_front": (method.name, i) in on_front,
                    "validation": r["validation"]["summary"],
                }
                for i, r in enumerate(runs)
            ],
        }


def _positions_against_dsg(sweep: Sweep, results: dict, sweeps: dict, chosen: dict) -> None:
    """Whether a swept DSG configuration dominates each method's chosen one on validation, and where each method
    stands against DSG's chosen configuration on test."""
    if "dsg" not in sweeps:
        for res in results.values():
            res["dominated_by_dsg_validation"] = None
        return
    dsg_points = [sweep.point(r) for r in sweeps["dsg"]]
    dsg_test = results["dsg"]["test"]
    for name, res in results.items():
        if name == "dsg":
            res["dominated_by_dsg_validation"], res["dominating_dsg_configs"] = None, []
            continue
        p = sweep.point(sweeps[name][chosen[name][0]])
        doms = [sweeps["dsg"][i]["key"] for i, q in enumerate(dsg_points) if dominates(q, p)]
        res["dominated_by_dsg_validation"], res["dominating_dsg_configs"] = bool(doms), doms
        res["test_vs_dsg"] = versus(
            {"forget": dsg_test["forget"], "retain": dsg_test["retain_pooled"]},
            {"forget": res["test"]["forget"], "retain": res["test"]["retain_pooled"]},
        )


def run_compare(
    config: CompareConfig,
    *,
    bench: Bench | None = None,
    methods: Sequence[UnlearningMethod] | None = None,
    progress: bool = True,
) -> dict:
    """Run (or resume) the comparison and write compare.json and report.html into config.out; returns the results.
    One process at a time: a second compare on the same folder is refused while the first runs."""
    inputs = [config.sae, config.forget_corpus, config.retain_corpus, config.calibration_corpus,
              config.forget_questions, config.heldout, *(config.retain_questions or "").split(",")]  # fmt: skip
    out = check_output_dir(config.out, "comparison", resume=True, inputs=[i.strip() for i in inputs if i and i.strip()])
    with exclusive(out, "dsg compare"):
        return _run_compare(config, out, bench, methods, progress)


def _run_compare(config: CompareConfig, out, bench, methods, progress: bool) -> dict:
    t0 = time.perf_counter()
    methods = list(methods) if methods is not None else [METHODS[n]() for n in config.method_names()]
    grids = read_grid(config.grid, [m.name for m in methods]) if config.grid else {}
    sweep = Sweep(config, bench if bench is not None else config.bench(), progress)

    base_val = sweep.base("validation")
    base_val_summary = sweep.summary(base_val["scores"], base_val["scores"])
    sweeps, failures = {}, {}
    for method in methods:
        runs, failed = sweep.sweep(method, grids.get(method.name) or method.grid(sweep.bench, config.budget), base_val)
        failures[method.name] = [{"key": r["key"], "config": r["config"], "error": r["error"]} for r in failed]
        if runs:
            sweeps[method.name] = runs
    methods = [m for m in methods if m.name in sweeps]
    if not methods:
        raise DSGError("Every configuration of every method failed; see the messages above.")

    # selection on validation, Pareto front over every swept configuration
    all_points = [(m, i, sweep.point(r)) for m, runs in sweeps.items() for i, r in enumerate(runs)]
    front = [all_points[i][:2] for i in pareto_front([p for _, _, p in all_points])]
    chosen = {
        m: select_config([sweep.point(r) for r in runs], base_val_summary["retain_pooled"], config.retain_threshold)
        for m, runs in sweeps.items()
    }

    # test split: the base model, then each method's chosen configuration
    base_test = sweep.base("test")
    results = {}
    for method in methods:
        runs, (idx, qualified) = sweeps[method.name], chosen[method.name]
        test = sweep.test(method, runs[idx])
        results[method.name] = sweep.result(method, runs, idx, qualified, test, base_test, set(front))
        results[method.name]["failed_configs"] = failures[method.name]
        if not config.keep_edits:
            sweep.store.prune_edits(method.name, [r["key"] for r in runs], runs[idx]["key"])
    _positions_against_dsg(sweep, results, sweeps, chosen)

    compare = _record(sweep, base_val_summary, base_test, results)
    compare["failed_methods"] = sorted(set(failures) - set(results))
    compare["pareto_front_validation"] = [{"method": m, "key": sweeps[m][i]["key"]} for m, i in front]
    compare["seconds"] = round(time.perf_counter() - t0, 1)
    write_json_atomic(out / "compare.json", compare)
    write_text_atomic(out / "report.html", report_html(compare, config))
    return compare


def _record(sweep: Sweep, base_val_summary: dict, base_test: dict, results: dict) -> dict:
    """compare.json's description of the run: what it ran on, how it chose, the base model and each method."""
    config, bench = sweep.config, sweep.bench
    ratio = None
    if "rmu" in results and "dsg" in results and results["dsg"]["fit_seconds"]:
        ratio = results["rmu"]["fit_seconds"] / results["dsg"]["fit_seconds"]
    scoring = "length-normalised log-likelihood (acc_norm)" if config.normalized else "summed log-likelihood (acc)"
    return {
        "format": "dsg-compare",
        "dsg_version": __version__,
        "bench": bench.name,
        "forget_task": bench.forget_task,
        "retain_tasks": sorted(bench.retain_tasks("test")),
        "config": dataclasses.asdict(config),
        "context": sweep.context,
        "scoring": scoring,
        "selection_rule": (
            f"lowest forget accuracy ({config.forget_metric}"
            + (
                ", or on every forget question where the base model answers none"
                if config.forget_metric == "base_correct"
                else ""
            )  # fmt: skip
            + ") with pooled retain accuracy >= "
            f"{config.retain_threshold:g} x base, on the validation questions; if none qualifies, "
            "the highest pooled retain accuracy"
        ),
        "base": {
            "validation": base_val_summary,
            "test": sweep.summary(base_test["scores"], base_test["scores"]),
            "perplexity": base_test["perplexity"],
            "generations": base_test["generations"],
        },
        "methods": results,
        "fit_time_ratio_rmu_over_dsg": ratio,
    }
