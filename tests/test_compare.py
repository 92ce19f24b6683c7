"""`dsg compare`: the run store, resuming, failed configurations, selection, the Pareto front and the report,
with fake methods on a tiny model (seconds); the real methods' fits are tested in test_methods.py."""

import dataclasses
import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dsg import cli
from dsg.bench import sweep as sweep_module
from dsg.bench.report import print_table, table_rows
from dsg.bench.selection import dominates, pareto_front, select_config, summarize
from dsg.bench.setting import Bench
from dsg.bench.store import config_key
from dsg.bench.sweep import CompareConfig, read_grid, run_compare
from dsg.errors import DSGError
from dsg.guard.fit import FitConfig
from dsg.guard.guardrail import Guardrail
from dsg.methods import METHODS
from dsg.methods.base import Fitted, UnlearningMethod
from dsg.runtime.edit import Edit

from tiny import FORGET_TEXTS, RETAIN_TEXTS, tiny_sae

FORGET = FORGET_TEXTS * 3
RETAIN = RETAIN_TEXTS * 3


def questions(stem, answers, n, offset=0):
    return [
        {
            "id": f"{stem}{i}",
            "question": f"{stem} number {i + offset} is",
            "choices": [answers[(i + k) % len(answers)] for k in range(4)],
            "answer": i % 4,
        }
        for i in range(n)
    ]


def tiny_bench(model, tok):
    sae = tiny_sae(d_in=model.config.hidden_size)
    qs = {
        split: {
            "cyber": questions("The exploit", ["payload", "buffer", "shellcode", "packet", "hash"], 6, off),
            "geo": questions("The capital", ["Paris", "Tokyo", "Lima", "Rome", "Oslo"], 6, off),
            "chem": questions("The element", ["sodium", "gold", "iron", "neon", "zinc"], 6, off),
        }
        for split, off in (("validation", 0), ("test", 100))
    }
    prompts = [
        {"domain": "cyber", "role": "forget", "prompt": "How does the exploit work?"},
        {"domain": "geo", "role": "retain", "prompt": "What is the capital of France?"},
    ]
    return Bench(
        model,
        tok,
        sae,
        FORGET,
        RETAIN,
        None,
        "cyber",
        qs,
        RETAIN[:3],
        prompts,
        FitConfig(max_length=32, max_sequences=16, batch_size=8),
        name="tiny",
        batch_size=8,
        generation_tokens=6,
    )


# ---- fake methods: cheap, deterministic interventions with the real method interface ---------------------------


@dataclasses.dataclass
class FakeConfig:
    strength: float = 1.0
    fail: bool = False


class FakeGuard(UnlearningMethod):
    """A "dsg" whose configurations are static clamps of a few latents of the bench's SAE."""

    name, label, kind, config_class = "dsg", "fake DSG", "guardrail", FakeConfig

    def __init__(self):
        self.fits = []

    def grid(self, bench, budget):
        return [{"strength": 50.0}, {"strength": 5.0}]

    def fit(self, bench, cfg, run_dir, progress):
        self.fits.append(cfg)
        c = self.config(cfg)
        guard = Guardrail(bench.sae, features=[0, 1, 2, 3], clamp=c.strength, gated=False)
        return Fitted(guard, {"seconds": 0.5, "flops": 1e6}, {"features": guard.features, "clamp": guard.clamp})

    def restore(self, bench, run, run_dir):
        return Fitted(
            Guardrail(bench.sae, features=run["record"]["features"], clamp=run["record"]["clamp"], gated=False),
            run["cost"],
            run["record"],
        )


class FakeEdit(UnlearningMethod):
    """A weight edit that scales the output embedding; `fail` raises as a diverging fit would."""

    name, label, kind, config_class = "shift", "fake edit", "edit", FakeConfig

    def __init__(self):
        self.fits = []

    def grid(self, bench, budget):
        return [{"strength": 0.5}, {"strength": 1.0}, {"strength": 2.0, "fail": True}]

    def fit(self, bench, cfg, run_dir, progress):
        self.fits.append(cfg)
        c = self.config(cfg)
        if c.fail:
            raise DSGError("the fake fit diverged")
        head = bench.model.get_output_embeddings().weight
        name = next(n for n, p in bench.model.named_parameters() if p is head)
        edit = Edit({name: head.detach() * c.strength}, {"method": self.name})
        edit.save(run_dir)
        return Fitted(edit, {"seconds": 1.0, "flops": 2e6}, {"edit": run_dir.name})

    def restore(self, bench, run, run_dir):
        return Fitted(Edit.load(run_dir), run["cost"], run["record"]) if (run_dir / "edit.json").is_file() else None


@pytest.fixture(scope="module")
def compared(tiny_llama, tmp_path_factory):
    model, tok = tiny_llama
    bench = tiny_bench(model, tok)
    out = tmp_path_factory.mktemp("compare") / "out"
    config = CompareConfig(out=str(out), budget=0.1, generation_tokens=6, eval_batch_size=8)
    methods = [FakeGuard(), FakeEdit()]
    result = run_compare(config, bench=bench, methods=methods, progress=False)
    return config, bench, methods, result, out


# ---- selection and Pareto front on synthetic numbers ----------------------------------------------------------


def test_selection_picks_lowest_forget_among_configs_keeping_99_percent_of_retain():
    pts = [
        {"forget": 0.20, "retain": 0.50},  # forgets most, but retain 0.50 < 0.99 * 0.80
        {"forget": 0.40, "retain": 0.795},  # qualifies (0.795 >= 0.792)
        {"forget": 0.35, "retain": 0.792},  # qualifies exactly at the threshold, lower forget: chosen
        {"forget": 0.35, "retain": 0.70},
    ]
    assert select_config(pts, base_retain=0.80) == (2, True)
    # ties on forget: the higher retain wins
    assert select_config([{"forget": 0.3, "retain": 0.80}, {"forget": 0.3, "retain": 0.81}], 0.80) == (1, True)


def test_selection_without_a_qualifying_config_takes_the_best_retain_and_says_so():
    pts = [{"forget": 0.1, "retain": 0.5}, {"forget": 0.3, "retain": 0.7}, {"forget": 0.2, "retain": 0.7}]
    assert select_config(pts, base_retain=0.9) == (2, False)
    with pytest.raises(DSGError):
        select_config([], 0.5)


def test_pareto_front_on_synthetic_points():
    pts = [
        {"forget": 0.2, "retain": 0.9},  # front
        {"forget": 0.3, "retain": 0.9},  # dominated by 0
        {"forget": 0.1, "retain": 0.5},  # front (lowest forget)
        {"forget": 0.5, "retain": 0.95},  # front (highest retain)
        {"forget": 0.2, "retain": 0.9},  # equal to 0: neither dominates, both on the front
        {"forget": 0.4, "retain": 0.6},
    ]  # dominated
    assert pareto_front(pts) == [0, 2, 3, 4]
    assert dominates(pts[0], pts[1]) and not dominates(pts[0], pts[4]) and not dominates(pts[2], pts[3])


def test_config_key_depends_on_config_and_context_only():
    a = config_key("rmu", {"lr": 1e-4, "alpha": 10}, {"model": "x"})
    assert a == config_key("rmu", {"alpha": 10, "lr": 1e-4}, {"model": "x"})
    assert a != config_key("rmu", {"lr": 1e-4, "alpha": 10}, {"model": "y"})
    assert a != config_key("npo", {"lr": 1e-4, "alpha": 10}, {"model": "x"})


def test_config_refuses_unknown_methods_and_metrics():
    with pytest.raises(DSGError, match="Unknown method"):
        CompareConfig(methods="dsg,sgd").method_names()
    with pytest.raises(DSGError, match="forget_metric"):
        CompareConfig(forget_metric="mean")


def test_summaries_follow_the_chosen_scoring():
    base = {
        "cyber": {"correct": [True, True, False], "correct_norm": [False, True, True], "gated": [None] * 3},
        "geo": {"correct": [True, False], "correct_norm": [True, True], "gated": [None] * 2},
    }
    run = {
        "cyber": {"correct": [False, True, False], "correct_norm": [False, False, True], "gated": [True, True, False]},
        "geo": {"correct": [True, True], "correct_norm": [False, True], "gated": [False, False]},
    }
    summed = summarize(run, base, "cyber", norm=False)
    normed = summarize(run, base, "cyber", norm=True)
    assert summed["forget_accuracy_base_correct"] == 0.5 and summed["retain_pooled"] == 1.0  # subset {0, 1}
    assert normed["forget_accuracy_base_correct"] == 0.5 and normed["retain_pooled"] == 0.5  # subset {1, 2}
    assert summed["tasks"]["cyber"]["n_base_correct"] == normed["tasks"]["cyber"]["n_base_correct"] == 2
    assert normed["tasks"]["cyber"]["accuracy"] == pytest.approx(1 / 3) and normed["tasks"]["cyber"][
        "gate_rate"
    ] == pytest.approx(2 / 3)


# ---- a whole run with fake methods ----------------------------------------------------------------------------


def test_compare_writes_json_and_a_self_contained_html_report(compared):
    config, bench, methods, result, out = compared
    assert [len(m.fits) for m in methods] == [2, 3]  # every configuration fitted once
    data = json.loads((out / "compare.json").read_text())
    assert set(data["methods"]) == {"dsg", "shift"}
    for name, r in data["methods"].items():
        assert set(r["test"]["retain"]) == {"geo", "chem"}
        assert r["fit_seconds"] > 0 and r["flops"] > 0
        assert r["test"]["perplexity_change"] is not None
        assert len(r["generations"]) == 2
        assert (r["dominated_by_dsg_validation"] is None) == (name == "dsg")
    a = {"forget": data["methods"]["dsg"]["test"]["forget"], "retain": data["methods"]["dsg"]["test"]["retain_pooled"]}
    b = {
        "forget": data["methods"]["shift"]["test"]["forget"],
        "retain": data["methods"]["shift"]["test"]["retain_pooled"],
    }
    expected = (
        "dsg dominates"
        if dominates(a, b)
        else "dominates dsg"
        if dominates(b, a)
        else "equal"
        if a == b
        else "trade-off"
    )
    assert data["methods"]["shift"]["test_vs_dsg"] == expected
    assert data["pareto_front_validation"]
    assert data["methods"]["dsg"]["generations"][0]["gated"] is True  # a static guardrail acts on every prompt
    assert data["methods"]["shift"]["generations"][0]["gated"] is None  # an edit has no gate
    runs = out / "runs" / "shift"
    assert len(list(runs.glob("*.test.json"))) == 1 and len(list(runs.glob("*.edit"))) == 1  # only the chosen edit kept
    page = (out / "report.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and "data:image/png;base64," in page
    assert "How does the exploit work?" in page and "<h3>geo</h3>" in page
    assert "fit FLOPs" in print_table(result) and "against DSG (test)" in print_table(result)
    assert data["scoring"].startswith("length-normalised") and "acc_norm" in page


def test_each_method_gets_the_configuration_the_rule_picks_on_validation(compared):
    config, bench, methods, result, out = compared
    base = result["base"]["validation"]["retain_pooled"]
    for r in result["methods"].values():
        points = [
            {"forget": s["validation"]["forget_accuracy_base_correct"], "retain": s["validation"]["retain_pooled"]}
            for s in r["sweep"]
        ]
        idx, qualified = select_config(points, base, config.retain_threshold)
        assert r["chosen"]["key"] == r["sweep"][idx]["key"] and r["chosen"]["qualified"] == qualified
    front = {(p["method"], p["key"]) for p in result["pareto_front_validation"]}
    for name, r in result["methods"].items():
        for s in r["sweep"]:
            assert s["on_pareto_front"] == ((name, s["key"]) in front)


def test_a_failing_configuration_is_recorded_and_not_retried(compared):
    config, bench, methods, result, out = compared
    failed = result["methods"]["shift"]["failed_configs"]
    assert [f["config"]["fail"] for f in failed] == [True] and "diverged" in failed[0]["error"]
    stored = json.loads(Path(out / "runs" / "shift" / f"{failed[0]['key']}.json").read_text())
    assert stored["error"] == failed[0]["error"]


def test_a_second_run_in_the_same_folder_computes_nothing(compared, monkeypatch):
    config, bench, methods, result, out = compared
    before = [len(m.fits) for m in methods]
    monkeypatch.setattr(sweep_module, "run_suites", lambda *a, **k: pytest.fail("scored again"))
    again = run_compare(config, bench=bench, methods=methods, progress=False)
    assert [len(m.fits) for m in methods] == before  # nor is the failed configuration retried
    assert {m: r["test"] for m, r in again["methods"].items()} == {m: r["test"] for m, r in result["methods"].items()}
    assert print_table(again) == print_table(result)  # results read back from disk report the same
    assert table_rows(again)[0][3] == "cyber acc %"


def test_a_pruned_edit_is_retrained_when_needed(compared):
    config, bench, methods, result, out = compared
    import shutil

    runs = out / "runs" / "shift"
    next(runs.glob("*.test.json")).unlink()
    shutil.rmtree(next(runs.glob("*.edit")))
    before = len(methods[1].fits)
    again = run_compare(config, bench=bench, methods=methods, progress=False)
    assert len(methods[1].fits) == before + 1
    assert again["methods"]["shift"]["test"]["tasks"] == result["methods"]["shift"]["test"]["tasks"]


def test_a_suite_registered_later_runs_on_the_finished_configurations(compared):
    from dsg.eval.suites import SUITES, Suite

    config, bench, methods, result, out = compared

    class Length(Suite):
        name, splits = "prompt_length", ("validation", "test")

        @staticmethod
        def run(bench, split, intervention, progress):
            return sum(len(q["question"]) for qs in bench.questions[split].values() for q in qs)

    before = [len(m.fits) for m in methods]
    SUITES.register("prompt_length")(Length)
    try:
        again = run_compare(config, bench=bench, methods=methods, progress=False)
    finally:
        SUITES._items.pop("prompt_length")
    expected = sum(len(q["question"]) for qs in bench.questions["test"].values() for q in qs)
    assert all(r["suites"] == {} for r in result["methods"].values())
    assert all(r["suites"] == {"prompt_length": expected} for r in again["methods"].values())
    # guardrails are restored from their records, the chosen edit from disk; the pruned one is retrained once
    assert [len(m.fits) - b for m, b in zip(methods, before)] == [0, 1]
    stored = json.loads(next((out / "runs" / "dsg").glob("*[0-9a-f].json")).read_text())
    assert "prompt_length" in stored["validation"]


def test_a_changed_bench_is_a_new_run(compared, tmp_path):
    config, bench, methods, result, out = compared
    other = dataclasses.replace(bench, forget_texts=FORGET[:-1], _context=None, _stats=None)
    before = [len(m.fits) for m in methods]
    run_compare(dataclasses.replace(config, out=str(tmp_path / "o")), bench=other, methods=methods, progress=False)
    assert [len(m.fits) - b for m, b in zip(methods, before)] == [2, 3]
    assert config_key("dsg", {}, other.context()) != config_key("dsg", {}, bench.context())


def test_a_bench_with_another_tokenizer_is_a_new_run(compared):
    """Every score depends on the tokenizer as on the weights: the same weights with a tokenizer that adds no BOS
    (or another chat template) must not read back the runs stored under the first."""
    import copy

    from tiny import bpe_tokenizer

    config, bench, methods, result, out = compared
    nobos = dataclasses.replace(bench, tokenizer=bpe_tokenizer(add_bos=False), _context=None, _stats=None)
    assert config_key("dsg", {}, nobos.context()) != config_key("dsg", {}, bench.context())
    templated = copy.deepcopy(bench.tokenizer)
    templated.chat_template = "{{ messages[0]['content'] }}"
    other = dataclasses.replace(bench, tokenizer=templated, _context=None, _stats=None)
    assert config_key("dsg", {}, other.context()) != config_key("dsg", {}, bench.context())
    same = dataclasses.replace(bench, tokenizer=copy.deepcopy(bench.tokenizer), _context=None, _stats=None)
    assert config_key("dsg", {}, same.context()) == config_key("dsg", {}, bench.context())


def test_stored_generations_are_not_reused_at_another_length(compared):
    config, bench, methods, result, out = compared
    longer = dataclasses.replace(bench, generation_tokens=bench.generation_tokens + 1, _context=None, _stats=None)
    assert config_key("dsg", {}, longer.context()) != config_key("dsg", {}, bench.context())


def test_an_edited_or_cut_run_file_is_computed_again(compared, tmp_path):
    """A run file that does not hold what a finished run does ({} or a stray error value) is fitted and scored
    again, not read into a KeyError."""
    import shutil

    config, bench, methods, result, out = compared
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    runs = sorted(p for p in (copy / "runs" / "dsg").glob("*.json") if p.name.count(".") == 1)
    runs[0].write_text("{}")
    runs[1].write_text('{"error": 5}')
    before = len(methods[0].fits)
    again = run_compare(dataclasses.replace(config, out=str(copy)), bench=bench, methods=methods, progress=False)
    assert len(methods[0].fits) == before + 2
    assert again["methods"]["dsg"]["test"]["tasks"] == result["methods"]["dsg"]["test"]["tasks"]
    assert json.loads(runs[0].read_text())["key"] == runs[0].stem  # written whole again


def test_a_stored_file_edited_cut_short_or_copied_over_another_is_computed_again(compared, tmp_path, capsys):
    """Stored results carry a hash of their content and of their place: a number edited in a test result, a cut
    short base result, or one configuration's run copied over another's used to be read back silently (or stop
    the run); each is computed again, and the comparison comes out as it did."""
    import shutil

    config, bench, methods, result, out = compared
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    runs = sorted(p for p in (copy / "runs" / "dsg").glob("*.json") if p.name.count(".") == 1)
    shutil.copyfile(runs[0], runs[1])  # a run under another configuration's name
    test = next((copy / "runs" / "dsg").glob("*.test.json"))
    edited = json.loads(test.read_text())
    edited["perplexity"] = 1.0
    test.write_text(json.dumps(edited))
    base = next((copy / "runs" / "base").glob("*.validation.json"))
    base.write_text(base.read_text()[: len(base.read_text()) // 2])
    before = len(methods[0].fits)
    again = run_compare(dataclasses.replace(config, out=str(copy)), bench=bench, methods=methods, progress=False)
    assert len(methods[0].fits) > before  # the misplaced run (at least) was fitted again
    assert again["methods"]["dsg"]["test"] == result["methods"]["dsg"]["test"]
    untimed = [[{k: v for k, v in r.items() if "seconds" not in k} for r in x["methods"]["dsg"]["sweep"]]
               for x in (again, result)]  # fmt: skip
    assert untimed[0] == untimed[1]
    err = capsys.readouterr().err
    assert "does not match its content hash" in err and "cannot be read as a JSON object" in err
    assert json.loads(runs[1].read_text())["key"] == runs[1].stem


def test_a_grid_file_replaces_built_in_grids_and_refuses_unknown_settings(tmp_path):
    path = tmp_path / "grid.json"
    path.write_text(
        json.dumps(
            {
                "conditional_clamp": [{"n_features": 5, "clamp": 25.0}],
                "rmu": [{"steering_coeff": 6.5, "alpha": 1200.0, "steps": 3}],
                "npo": [{"beta": 1.0, "retain_loss": "kl"}],
            }
        )
    )
    grids = read_grid(str(path), ["dsg", "conditional_clamp", "rmu", "npo"])
    assert grids["conditional_clamp"] == [{"variant": "conditional", "n_features": 5, "clamp": 25.0}]
    assert grids["npo"] == [{"method": "npo", "beta": 1.0, "retain_loss": "kl"}]
    assert grids["rmu"] == [{"steering_coeff": 6.5, "alpha": 1200.0, "steps": 3}]
    assert "dsg" not in grids  # untouched: the built-in grid
    assert "steering_norm_multiple" in METHODS["rmu"].grid_fields() and "method" not in METHODS["npo"].grid_fields()
    with pytest.raises(DSGError, match="no setting 'alpha'"):
        METHODS["ga"]().config({"method": "ga", "lr": 1e-4, "alpha": 1.0})
    assert METHODS["static_clamp"]().config({"variant": "static", "clamp": 5.0}).variant == "static"
    for bad, word in (
        ({"rmu": [{"learning_rate": 1e-4}]}, "learning_rate"),
        ({"npo": [{"method": "ga"}]}, "method"),
        ({"sgd": [{}]}, "sgd"),
        ({"rmu": []}, "non-empty"),
        # values of the wrong type, refused when the grid is read rather than after the base model is scored
        ({"npo": [{"lr": "fast"}]}, "lr must be a finite number, got 'fast'"),
        ({"npo": [{"lr": True}]}, "lr must be a finite number, got True"),
        ({"rmu": [{"steps": 2.5}]}, "steps must be an integer, got 2.5"),
        # a trained method's seed is the run's --seed: an entry that set one would be run and reported under another
        ({"npo": [{"lr": 1e-4, "seed": 5}]}, "seed is the run's"),
        # the statistics every DSG-style configuration reads are measured once, with the comparison's settings
        ({"dsg_paper": [{"n_features": 4, "max_length": 16}]}, "sets 'max_length', which is the comparison's own"),
        ({"dsg": [{"seed": 3}]}, "sets 'seed', which is the comparison's own"),
        ({"npo": [{"lr": 1e-4}, {"beta": 1.0}, {"lr": 1e-4}]}, "repeats its entry 2"),
    ):
        path.write_text(json.dumps(bad))
        with pytest.raises(DSGError, match=word):
            read_grid(str(path), ["rmu", "npo"])
    with pytest.raises(DSGError, match="clamp must be a finite number"):
        METHODS["static_clamp"]().config({"variant": "static", "clamp": "strong"})


def test_a_grid_entry_reaches_the_real_method(tiny_llama, tmp_path):
    """A grid file's RMU entry becomes the trained config (and the bench's layer fills the default)."""
    model, tok = tiny_llama
    bench = tiny_bench(model, tok)
    rmu = METHODS["rmu"]()
    fitted = rmu.fit(bench, {"steering_coeff": 6.5, "alpha": 1200.0, "steps": 3}, tmp_path / "e", False)
    assert fitted.intervention.info["config"]["steering_coeff"] == 6.5
    assert fitted.intervention.info["config"]["layer"] == bench.layer
    assert (tmp_path / "e" / "edit.json").is_file()
    assert isinstance(fitted.intervention, Edit) and fitted.cost["seconds"] > 0
    assert torch.is_tensor(next(iter(fitted.intervention.tensors.values())))


def test_a_stored_edit_that_is_not_the_runs_own_is_trained_again(tiny_llama, tmp_path):
    """Resuming a comparison restores a configuration's edit from its folder: one that another configuration or
    seed trained (a folder copied over another) or that cannot be read is trained again, not scored as this run's."""
    import shutil

    model, tok = tiny_llama
    bench = tiny_bench(model, tok)
    ga = METHODS["ga"]()
    runs = {}
    for steps in (1, 2):
        cfg = {"method": "ga", "steps": steps, "batch_size": 2, "max_length": 16, "seed": 0}
        fitted = ga.fit(bench, cfg, tmp_path / f"e{steps}", False)
        runs[steps] = json.loads(json.dumps({"config": cfg, "record": fitted.record, "cost": fitted.cost}))
    assert ga.restore(bench, runs[1], tmp_path / "e1") is not None  # its own edit
    assert ga.restore(bench, runs[1], tmp_path / "e2") is None  # another configuration's
    assert ga.restore(bench, {**runs[1], "config": {**runs[1]["config"], "seed": 1}}, tmp_path / "e1") is None
    shutil.copytree(tmp_path / "e1", tmp_path / "cut")
    with open(tmp_path / "cut" / "edit.safetensors", "r+b") as f:
        f.truncate(40)
    assert ga.restore(bench, runs[1], tmp_path / "cut") is None  # cut short: trained again, not a stopped run
    shutil.copytree(tmp_path / "e1", tmp_path / "swapped")
    shutil.copy(tmp_path / "e2" / "edit.safetensors", tmp_path / "swapped" / "edit.safetensors")
    assert ga.restore(bench, runs[1], tmp_path / "swapped") is None  # another run's tensors under its record
    shutil.copytree(tmp_path / "e1", tmp_path / "half")
    tensors = load_file(tmp_path / "half" / "edit.safetensors")
    save_file({n: t.half() for n, t in tensors.items()}, str(tmp_path / "half" / "edit.safetensors"))
    assert ga.restore(bench, runs[1], tmp_path / "half") is None  # re-saved in another dtype
    with pytest.raises(DSGError, match="does not hash"):
        Edit.load(tmp_path / "half")


LM_EVAL_TASK = """task: dsg_local_mcq
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question.strip()}}}}\\nA. {{{{choices[0]}}}}\\nB. {{{{choices[1]}}}}\\nC. {{{{choices[2]}}}}\\nD. \
{{{{choices[3]}}}}\\nAnswer:"
doc_to_choice: ["A", "B", "C", "D"]
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def test_letter_scoring_matches_lm_eval_on_a_local_task(tiny_llama, tmp_path):
    """Runs only where lm-eval is installed: our letter mode equals lm-eval's log-likelihoods and accuracy."""
    pytest.importorskip("lm_eval")
    import lm_eval
    from lm_eval.tasks import TaskManager

    from dsg.eval import accuracy, score_mcq
    from dsg.runtime.lm_eval import lm_eval_model

    model, tok = tiny_llama
    qs = questions("The capital", ["Paris", "Tokyo", "Lima", "Rome", "Oslo"], 8)
    data = tmp_path / "q.jsonl"
    data.write_text("".join(json.dumps(q) + "\n" for q in qs))
    (tmp_path / "task.yaml").write_text(LM_EVAL_TASK.format(path=data))
    ours = score_mcq(model, tok, qs, mode="letter", progress=False)
    with lm_eval_model(model, tok, batch_size=4) as lm:
        out = lm_eval.simple_evaluate(
            model=lm, tasks=["dsg_local_mcq"], log_samples=True, task_manager=TaskManager(include_path=str(tmp_path))
        )
    samples = sorted(out["samples"]["dsg_local_mcq"], key=lambda s: s["doc_id"])
    for r, s in zip(ours, samples):
        theirs = [float(x[0][0]) if isinstance(x[0], (list, tuple)) else float(x[0]) for x in s["resps"]]
        assert list(r.scores) == pytest.approx(theirs, abs=1e-4)
    assert out["results"]["dsg_local_mcq"]["acc,none"] == pytest.approx(accuracy(ours))


def test_cli_options_come_from_the_config_dataclass():
    import argparse

    parser = argparse.ArgumentParser(prog="dsg")
    sub = parser.add_subparsers(dest="command", required=True)
    cli.add_compare(sub)
    args = parser.parse_args(["compare", "--budget", "0.1", "--methods", "dsg,rmu", "--keep-edits", "--out", "x"])
    from dsg.config import from_args

    config = from_args(CompareConfig, args)
    assert (config.budget, config.method_names(), config.keep_edits, config.out) == (0.1, ["dsg", "rmu"], True, "x")
    assert args.func is cli.cmd_compare
    assert "paper's rule" in sub.choices["compare"].format_help()
    # options shared with `dsg demo` come from the common base, with their help text
    from dsg.bench.demo import DemoConfig
    from dsg.config import field_docs

    docs = field_docs(CompareConfig)
    assert set(docs) == {f.name for f in dataclasses.fields(CompareConfig)}
    assert docs["normalized"] == field_docs(DemoConfig)["normalized"] and "acc_norm" in docs["normalized"]
    assert "acc_norm" in " ".join(sub.choices["compare"].format_help().split())


def test_compare_on_your_own_model_and_files_through_the_command(tiny_llama, tmp_path, capsys):
    import argparse

    model, tok = tiny_llama
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    tiny_sae(d_in=model.config.hidden_size).save(tmp_path / "sae")
    (tmp_path / "forget.txt").write_text("\n\n".join(FORGET))
    # distinct documents (the detector holds a quarter of them out for its threshold, and copies count once):
    # the retain words, shuffled with a seed
    words, rng = " ".join(RETAIN_TEXTS).split(), random.Random(0)
    retain_docs = [" ".join(rng.sample(words, 20)) for _ in range(16)]
    (tmp_path / "retain.txt").write_text("\n\n".join(retain_docs))
    files = {
        "cyber": ("The exploit", ["payload", "buffer", "shellcode", "packet"]),
        "geo": ("The capital", ["Paris", "Tokyo", "Lima", "Rome"]),
    }
    for name, (stem, answers) in files.items():
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions(stem, answers, 12)))
    parser = argparse.ArgumentParser(prog="dsg")
    cli.add_compare(parser.add_subparsers(dest="command"))
    out = tmp_path / "out"
    args = parser.parse_args(
        [
            "compare",
            "--model",
            str(tmp_path / "model"),
            "--sae",
            str(tmp_path / "sae"),
            "--forget-corpus",
            str(tmp_path / "forget.txt"),
            "--retain-corpus",
            str(tmp_path / "retain.txt"),
            "--forget-questions",
            str(tmp_path / "cyber.jsonl"),
            "--retain-questions",
            str(tmp_path / "geo.jsonl"),
            "--heldout",
            str(tmp_path / "retain.txt"),
            "--methods",
            "dsg,ga",
            "--budget",
            "0.1",
            "--generation-tokens",
            "4",
            "--fit-sequences",
            "16",
            "--out",
            str(out),
        ]
    )
    assert args.func(args) == 0
    data = json.loads((out / "compare.json").read_text())
    assert set(data["methods"]) == {"dsg", "ga"}
    val, test = data["base"]["validation"]["tasks"], data["base"]["test"]["tasks"]
    assert val["cyber"]["n"] + test["cyber"]["n"] == 12 and val["cyber"]["n"] > 0 and test["cyber"]["n"] > 0
    assert "ga" in capsys.readouterr().out


def _lm_eval_folders(tmp_path):
    """(model, guardrail): a tiny model saved as tmp_path/model and a guardrail fitted on it as tmp_path/guard, for
    the registered lm-eval model, which loads both from folders."""
    import dsg

    from tiny import bpe_tokenizer, sparse_sae, tiny_model

    tok = bpe_tokenizer(add_bos=True)
    model = tiny_model("llama", seed=0, vocab=len(tok))
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    forget, retain = FORGET_TEXTS * 3, RETAIN_TEXTS * 3
    sae = sparse_sae(model, tok, forget + retain, rate=0.1)
    config = dsg.FitConfig(n_features=4, ratio_percentile=80, max_length=64, batch_size=3)
    guard = dsg.fit(model, tok, sae, forget, retain, config=config, progress=False)
    guard.save(tmp_path / "guard")
    return model, guard


@pytest.mark.parametrize("cut", [False, True])
def test_the_registered_lm_eval_model_scores_each_request_under_its_own_contexts_decision(tmp_path, cut):
    """A batch row is a context and its continuation run together, so another request's context can prefix it
    (("The capital", " of France is") and ("The capital of France", " is Paris")): each request's guarded score must
    be the one it gets alone, whatever else is in the run, a request whose context is cut to fit included (`cut`:
    it is judged whole, and must not make the rows batched with it judged whole too)."""
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance

    from dsg.runtime.lm_eval import DSGLM

    _lm_eval_folders(tmp_path)
    requests = []
    for text in FORGET_TEXTS + RETAIN_TEXTS:
        words = text.split(" ")
        for k in (2, 4, 6):  # nested contexts: each longer one is a prefix of the shorter ones' rows
            requests.append((" ".join(words[:k]), " " + " ".join(words[k : k + 3])))

    length = {"max_length": 40} if cut else {}

    def score(reqs):
        lm = DSGLM(pretrained=str(tmp_path / "model"), guardrail=str(tmp_path / "guard"), batch_size=8, device="cpu",
                   **length)  # fmt: skip
        instances = [Instance("loglikelihood", {}, arguments=r, idx=i) for i, r in enumerate(reqs)]
        return [x[0] for x in lm.loglikelihood(instances, disable_tqdm=True)], lm

    long = (" ".join(FORGET_TEXTS[:3] + RETAIN_TEXTS[:3]), " and then")
    together, lm = score(requests + ([long] if cut else []))
    if cut:
        assert len(lm.tok_encode(long[0])) > 40  # the long request's row is cut from the left
        assert all(len(c) <= 40 for c in lm._decisions)  # and its context, past the window, is never read whole
    alone = [score([r])[0][0] for r in requests]
    assert together[: len(requests)] == pytest.approx(alone, abs=1e-5)
    gated = [bool(d.any()) for d in lm._decisions.values()]
    assert any(gated) and not all(gated), "the test needs contexts on both sides of the gate"


def test_a_request_whose_row_reads_like_another_rows_padding_keeps_its_own_contexts_decision(tmp_path):
    """HFLM pads rows on the right with zeros, and 0 is a text token in many vocabularies ('!'): the row of
    B = (C, "!") padded reads like the row of A = (C + "!", ...). B must be scored under C's decision in a run with
    A as alone, though C + "!" opens the gate and C does not."""
    pytest.importorskip("lm_eval")
    import dsg
    from dsg.lm.hooks import hooked
    from dsg.runtime.lm_eval import DSGLM

    from tiny import bpe_tokenizer, sparse_sae, tiny_model

    tok = bpe_tokenizer(add_bos=True, specials_last=True)
    assert tok.convert_ids_to_tokens(0) == "!"
    model = tiny_model("llama", seed=0, vocab=len(tok))
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):  # the special ids are the tokenizer's, not 0/1/2
        setattr(model.config, name, getattr(tok, name))
        setattr(model.generation_config, name, getattr(tok, name))
    with torch.no_grad():  # id 0 was the padding row (zeros): a text token's row now, as in a real vocabulary
        model.model.embed_tokens.weight[0] = model.model.embed_tokens.weight[3]
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    sae = sparse_sae(model, tok, FORGET + RETAIN + [t + "!" for t in FORGET_TEXTS], rate=0.1)
    for text in FORGET_TEXTS + RETAIN_TEXTS:  # a context in which "!" raises the share of flagged tokens
        context = tok(text)["input_ids"][:6]  # <s> and five text tokens: five real ones to the gate
        seen: list = []
        with torch.no_grad(), hooked(model, sae.hook_name, seen.append):
            model(input_ids=torch.tensor([context + [0]]))
        fires = sae.encode(seen[0][0]) > 0
        features = fires[-1].nonzero().flatten().tolist()[:2]
        flagged = int(fires[1:-1][:, features].any(1).sum()) if features else 5
        if flagged < 5:
            break
    assert features and flagged < 5, "the test needs a latent that fires on '!'"
    threshold = (flagged / 5 + (flagged + 1) / 6) / 2  # between C's share of flagged tokens and C + "!"'s
    guard = dsg.Guardrail(sae, features=features, threshold=threshold)
    decisions = []
    for ids in (context, context + [0]):
        with torch.no_grad(), dsg.attach(model, guard) as session:
            model(input_ids=torch.tensor([ids]))
        decisions.append(bool(session.gated[0]))
    assert decisions == [False, True]
    guard.save(tmp_path / "guard")

    def lm():
        return DSGLM(pretrained=str(tmp_path / "model"), guardrail=str(tmp_path / "guard"), batch_size=8,
                     device="cpu", allow_model_mismatch=True)  # fmt: skip

    a, b = (("a", "b"), context + [0], [5]), (("c", "!"), context, [0])
    alone = lm()._loglikelihood_tokens([b], disable_tqdm=True)[0][0]
    together = lm()._loglikelihood_tokens([a, b], disable_tqdm=True)[1][0]
    assert together == pytest.approx(alone, abs=1e-6)


def lm_plain(tmp_path):
    from dsg.runtime.lm_eval import DSGLM

    return DSGLM(pretrained=str(tmp_path / "model"), batch_size=4, device="cpu")


def test_the_registered_lm_eval_model_judges_a_request_with_an_empty_context_whole(tmp_path):
    """A request with an empty context (its context only the prefix token) held that token's decision, so a
    forget text scored as its continuation was never guarded; it is judged whole, as a perplexity text is."""
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance

    import dsg
    from dsg.runtime.lm_eval import DSGLM

    model, guard = _lm_eval_folders(tmp_path)
    texts = FORGET_TEXTS + RETAIN_TEXTS
    lm = DSGLM(pretrained=str(tmp_path / "model"), guardrail=str(tmp_path / "guard"), batch_size=4, device="cpu")
    empty = [Instance("loglikelihood", {}, arguments=("", t), idx=i) for i, t in enumerate(texts)]
    scores = [x[0] for x in lm.loglikelihood(empty, disable_tqdm=True)]
    spaces = [Instance("loglikelihood", {}, arguments=(" ", t), idx=i) for i, t in enumerate(texts)]
    spaced = [x[0] for x in lm.loglikelihood(spaces, disable_tqdm=True)]  # lm-eval moves the space to the text
    assert spaced != pytest.approx([x[0] for x in lm_plain(tmp_path).loglikelihood(spaces, disable_tqdm=True)])
    direct, gated = [], []
    for t in texts:
        ids = torch.tensor([[lm.prefix_token_id] + lm.tok_encode(t, add_special_tokens=False)])  # what lm-eval scores
        with torch.no_grad(), dsg.attach(model, guard) as session:  # fed as lm-eval feeds it: the last token dropped
            lp = model(input_ids=ids[:, :-1]).logits[0].float().log_softmax(-1)
            gated.append(bool(session.clamped[0]))
        direct.append(float(lp.gather(-1, ids[0, 1:, None]).sum()))
    assert any(gated), "the test needs texts the guardrail clamps"
    assert scores == pytest.approx(direct, abs=1e-4)


def test_the_registered_lm_eval_model_reads_a_perplexity_text_whole_under_its_guardrails(tmp_path):
    """loglikelihood_rolling (lm-eval's perplexity tasks): a rolling request's context is only the token before the
    text, so holding the context's decision, as for questions, left every text unclamped; each text is read
    whole, every token judged as prompt, and scores what a guarded forward over the same tokens gives."""
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance

    import dsg
    from dsg.runtime.lm_eval import DSGLM

    model, guard = _lm_eval_folders(tmp_path)
    texts = FORGET_TEXTS + RETAIN_TEXTS
    instances = [Instance("loglikelihood_rolling", {}, arguments=(t,), idx=i) for i, t in enumerate(texts)]
    scores = {}
    for name, extra in (("guarded", {"guardrail": str(tmp_path / "guard")}), ("plain", {})):
        lm = DSGLM(pretrained=str(tmp_path / "model"), batch_size=4, device="cpu", **extra)
        scores[name] = lm.loglikelihood_rolling(instances, disable_tqdm=True)
    direct, gated = [], []
    for t in texts:
        ids = torch.tensor([[lm.prefix_token_id] + lm.tok_encode(t)])  # the tokens lm-eval scores
        with torch.no_grad(), dsg.attach(model, guard) as session:
            lp = model(input_ids=ids).logits[0, :-1].float().log_softmax(-1)
            gated.append(bool(session.clamped[0]))
        direct.append(float(lp.gather(-1, ids[0, 1:, None]).sum()))
    assert any(gated) and not all(gated), "the test needs texts on both sides of the gate"
    assert scores["guarded"] == pytest.approx(direct, abs=1e-4)
    changed = [abs(g - p) > 1e-4 for g, p in zip(scores["guarded"], scores["plain"])]
    assert changed == gated


def test_the_shipped_dsg_settles_its_prompt_level_on_the_forget_validation_questions(tiny_llama, tmp_path):
    """The comparison's DSG (the shipped gate, with its prompt level) judges the level on the bench's forget
    validation questions, scored as the bench scores them, and records the check and the rule it then applies."""
    from tiny import sparse_sae

    model, tok = tiny_llama
    bench = tiny_bench(model, tok)
    bench.sae = sparse_sae(model, tok, FORGET + RETAIN, rate=0.1)
    bench.calibration = [f"{r} {f}" for f in FORGET_TEXTS for r in RETAIN_TEXTS] + RETAIN_TEXTS  # enough to tell apart
    method = METHODS["dsg"]()
    cfg = {
        "n_features": 4,
        "clamp": 100.0,
        "clamp_mode": "all",
        "gate_percentile": 50.0,
        "gate_hold": 3,
        "detector_c": 1.0,
    }  # the hold-out draws each retain text with the calibration texts holding it
    assert method.fit_config(bench, cfg).gate_prompt_percentile is not None  # the shipped gate, with its level
    fitted = method.fit(bench, cfg, tmp_path, progress=False)
    check = fitted.record["prompt_level_check"]
    assert check["questions"] == len(bench.questions["validation"]["cyber"]) and check["normalized"] is True
    assert check["max_loss"] == 0.03 and check["kept"] == (check["loss"] <= 0.03)
    assert (fitted.record["prompt_level"] is not None) == check["kept"]
    assert fitted.intervention.info["prompt_level_check"] == check
    # with the base model's validation results already in this process (the comparison scores them first), the
    # check takes them instead of scoring them again, and judges alike
    from dsg.eval.mcq import score_mcq

    qs = bench.questions["validation"]["cyber"]
    bench.unguarded[bench.scores_key("validation", "cyber")] = score_mcq(model, tok, qs, batch_size=8, progress=False)
    again = method.fit(bench, cfg, tmp_path, progress=False)
    assert again.record["prompt_level_check"] == check
    bench.unguarded[bench.scores_key("validation", "cyber")] = score_mcq(
        model, tok, qs[1:], batch_size=8, progress=False
    )
    with pytest.raises(DSGError, match="base is not the base model's results"):  # they are read, and checked
        method.fit(bench, cfg, tmp_path, progress=False)


def test_domains_named_on_both_sides_are_refused_before_anything_loads(monkeypatch, tmp_path):
    """A forget domain also kept, or no retain domain at all, is a typo to report at once, not after a model (which
    may be large) has loaded."""
    import dsg.bench.demo as demo
    import dsg.bench.setting as setting

    def loaded(*args, **kwargs):
        raise AssertionError("something was loaded before the domains were checked")

    monkeypatch.setattr(setting, "load_model", loaded)
    monkeypatch.setattr(demo, "load_model", loaded)
    monkeypatch.setattr(setting.BenchSetting, "load_sae", loaded)
    with pytest.raises(DSGError, match="is also --retain"):
        setting.embedded_bench(setting.BenchSetting(forget="geography", retain="geography,chemistry"), 1, 1, 1, 1, 1)
    with pytest.raises(DSGError, match="At least one retain domain"):
        setting.embedded_bench(setting.BenchSetting(retain=" , "), 1, 1, 1, 1, 1)
    with pytest.raises(DSGError, match="is also --general"):
        demo.run_demo(demo.DemoConfig(forget="cyber", general="cyber", out=str(tmp_path / "d")))
    assert setting.BenchSetting().domain_names() == ("cyber", ["geography", "chemistry", "computing"], "general")
