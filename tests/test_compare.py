"""`dsg compare`: selection rule, Pareto front, resumability and the report, on a tiny model and synthetic data."""

import dataclasses
import json

import pytest
from tiny import FORGET_TEXTS, RETAIN_TEXTS, tiny_sae

from dsg import compare as cmp
from dsg.compare import (
    Bench,
    CompareConfig,
    dominates,
    pareto_front,
    run_compare,
    select_config,
)
from dsg.errors import DSGError
from dsg.fit import FitConfig


FORGET = FORGET_TEXTS * 3
RETAIN = RETAIN_TEXTS * 3


def questions(stem, answers, n, offset=0):
    return [{"id": f"{stem}{i}", "question": f"{stem} number {i + offset} is",
             "choices": [answers[(i + k) % len(answers)] for k in range(4)], "answer": i % 4} for i in range(n)]


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
    prompts = [{"domain": "cyber", "role": "forget", "prompt": "How does the exploit work?"},
               {"domain": "geo", "role": "retain", "prompt": "What is the capital of France?"}]
    return Bench(model, tok, sae, FORGET, RETAIN, None, "cyber", qs, RETAIN[:3], prompts,
                 FitConfig(max_length=32, max_sequences=16, batch_size=8), name="tiny")


# ---- selection and Pareto front on synthetic numbers ----------------------------------------------------------


def test_selection_picks_lowest_forget_among_configs_keeping_99_percent_of_retain():
    pts = [{"forget": 0.20, "retain": 0.50},   # forgets most, but retain 0.50 < 0.99 * 0.80
           {"forget": 0.40, "retain": 0.795},  # qualifies (0.795 >= 0.792)
           {"forget": 0.35, "retain": 0.792},  # qualifies exactly at the threshold, lower forget: chosen
           {"forget": 0.35, "retain": 0.70}]
    assert select_config(pts, base_retain=0.80) == (2, True)
    # ties on forget: the higher retain wins
    assert select_config([{"forget": 0.3, "retain": 0.80}, {"forget": 0.3, "retain": 0.81}], 0.80) == (1, True)


def test_selection_without_a_qualifying_config_takes_the_best_retain_and_says_so():
    pts = [{"forget": 0.1, "retain": 0.5}, {"forget": 0.3, "retain": 0.7}, {"forget": 0.2, "retain": 0.7}]
    assert select_config(pts, base_retain=0.9) == (2, False)
    with pytest.raises(DSGError):
        select_config([], 0.5)


def test_pareto_front_on_synthetic_points():
    pts = [{"forget": 0.2, "retain": 0.9},  # front
           {"forget": 0.3, "retain": 0.9},  # dominated by 0
           {"forget": 0.1, "retain": 0.5},  # front (lowest forget)
           {"forget": 0.5, "retain": 0.95},  # front (highest retain)
           {"forget": 0.2, "retain": 0.9},  # equal to 0: neither dominates, both on the front
           {"forget": 0.4, "retain": 0.6}]  # dominated
    assert pareto_front(pts) == [0, 2, 3, 4]
    assert dominates(pts[0], pts[1]) and not dominates(pts[0], pts[4]) and not dominates(pts[2], pts[3])


def test_config_key_depends_on_config_and_context_only():
    a = cmp.config_key("rmu", {"lr": 1e-4, "alpha": 10}, {"model": "x"})
    assert a == cmp.config_key("rmu", {"alpha": 10, "lr": 1e-4}, {"model": "x"})
    assert a != cmp.config_key("rmu", {"lr": 1e-4, "alpha": 10}, {"model": "y"})
    assert a != cmp.config_key("npo", {"lr": 1e-4, "alpha": 10}, {"model": "x"})


def test_config_refuses_unknown_methods_and_metrics():
    with pytest.raises(DSGError, match="Unknown method"):
        CompareConfig(methods="dsg,sgd").method_names()
    with pytest.raises(DSGError, match="forget_metric"):
        CompareConfig(forget_metric="mean")


def test_summaries_follow_the_chosen_scoring():
    base = {"cyber": {"correct": [True, True, False], "correct_norm": [False, True, True], "gated": [None] * 3},
            "geo": {"correct": [True, False], "correct_norm": [True, True], "gated": [None] * 2}}
    run = {"cyber": {"correct": [False, True, False], "correct_norm": [False, False, True], "gated": [True, True, False]},
           "geo": {"correct": [True, True], "correct_norm": [False, True], "gated": [False, False]}}
    summed = cmp.summarize(run, base, "cyber", norm=False)
    normed = cmp.summarize(run, base, "cyber", norm=True)
    assert summed["forget_accuracy_base_correct"] == 0.5 and summed["retain_pooled"] == 1.0  # subset {0, 1}
    assert normed["forget_accuracy_base_correct"] == 0.5 and normed["retain_pooled"] == 0.5  # subset {1, 2}
    assert summed["tasks"]["cyber"]["n_base_correct"] == normed["tasks"]["cyber"]["n_base_correct"] == 2
    assert normed["tasks"]["cyber"]["accuracy"] == pytest.approx(1 / 3) and normed["tasks"]["cyber"]["gate_rate"] == pytest.approx(2 / 3)


# ---- a whole (tiny) run ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compared(tiny_llama, tmp_path_factory):
    model, tok = tiny_llama
    bench = tiny_bench(model, tok)
    out = tmp_path_factory.mktemp("compare") / "out"
    config = CompareConfig(out=str(out), budget=0.1, generation_tokens=6, eval_batch_size=8)
    calls = {"fit": 0}
    methods = cmp.make_methods(cmp.METHODS)
    for m in methods:
        fit = m.fit

        def counted(*a, _fit=fit, **k):
            calls["fit"] += 1
            return _fit(*a, **k)

        m.fit = counted
    result = run_compare(config, bench=bench, methods=methods, progress=False)
    return config, bench, methods, calls, result, out


def test_compare_writes_json_and_a_self_contained_html_report(compared):
    config, bench, methods, calls, result, out = compared
    assert calls["fit"] == len(cmp.METHODS)  # budget < 0.5: one configuration per method
    data = json.loads((out / "compare.json").read_text())
    assert set(data["methods"]) == set(cmp.METHODS)
    for name, r in data["methods"].items():
        assert set(r["test"]["retain"]) == {"geo", "chem"}
        assert r["fit_seconds"] > 0 and r["flops"] > 0
        assert r["test"]["perplexity_change"] is not None
        assert len(r["generations"]) == 2
        assert isinstance(r["chosen"]["qualified"], bool)
        assert (r["dominated_by_dsg_validation"] is None) == (name == "dsg")
        if name != "dsg":  # the test-split position agrees with the test numbers
            a = {"forget": data["methods"]["dsg"]["test"]["forget"], "retain": data["methods"]["dsg"]["test"]["retain_pooled"]}
            b = {"forget": r["test"]["forget"], "retain": r["test"]["retain_pooled"]}
            expected = ("dsg dominates" if dominates(a, b) else "dominates dsg" if dominates(b, a)
                        else "equal" if a == b else "trade-off")
            assert r["test_vs_dsg"] == expected
    assert data["fit_time_ratio_rmu_over_dsg"] > 0
    assert data["pareto_front_validation"]
    assert len(list((out / "runs" / "rmu").glob("*.json"))) == 2  # the sweep result and the test result
    assert list((out / "runs" / "rmu").glob("*.edit/edit.safetensors"))  # the chosen edit is kept
    page = (out / "report.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and "data:image/png;base64," in page
    assert "How does the exploit work?" in page and "<h3>geo</h3>" in page
    assert "fit FLOPs" in cmp.print_table(result) and "against DSG (test)" in cmp.print_table(result)
    assert data["scoring"].startswith("length-normalised") and "acc_norm" in page


def test_a_second_run_in_the_same_folder_computes_nothing(compared, monkeypatch):
    config, bench, methods, calls, result, out = compared
    before = calls["fit"]
    monkeypatch.setattr(cmp, "score_tasks", lambda *a, **k: pytest.fail("scored again"))
    monkeypatch.setattr(cmp, "_generate", lambda *a, **k: pytest.fail("generated again"))
    again = run_compare(config, bench=bench, methods=methods, progress=False)
    assert calls["fit"] == before
    assert {m: r["test"] for m, r in again["methods"].items()} == {m: r["test"] for m, r in result["methods"].items()}
    assert cmp.print_table(again) == cmp.print_table(result)  # results read back from disk report the same
    assert cmp.table_rows(again)[0][3] == "cyber acc %"


def test_a_pruned_edit_is_retrained_when_needed(compared, tmp_path):
    config, bench, methods, calls, result, out = compared
    import shutil

    runs = out / "runs" / "ga"
    test_file = next(p for p in runs.glob("*.test.json"))
    test_file.unlink()
    shutil.rmtree(next(runs.glob("*.edit")))
    before = calls["fit"]
    again = run_compare(config, bench=bench, methods=methods, progress=False)
    assert calls["fit"] == before + 1
    assert again["methods"]["ga"]["test"]["tasks"] == result["methods"]["ga"]["test"]["tasks"]


LM_EVAL_TASK = """task: dsg_local_mcq
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question.strip()}}}}\\nA. {{{{choices[0]}}}}\\nB. {{{{choices[1]}}}}\\nC. {{{{choices[2]}}}}\\nD. {{{{choices[3]}}}}\\nAnswer:"
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

    from dsg.evaluate import accuracy, score_mcq

    model, tok = tiny_llama
    qs = questions("The capital", ["Paris", "Tokyo", "Lima", "Rome", "Oslo"], 8)
    data = tmp_path / "q.jsonl"
    data.write_text("".join(json.dumps(q) + "\n" for q in qs))
    (tmp_path / "task.yaml").write_text(LM_EVAL_TASK.format(path=data))
    ours = score_mcq(model, tok, qs, mode="letter", progress=False)
    with cmp.lm_eval_model(model, tok, batch_size=4) as lm:
        out = lm_eval.simple_evaluate(model=lm, tasks=["dsg_local_mcq"], log_samples=True,
                                      task_manager=TaskManager(include_path=str(tmp_path)))
    samples = sorted(out["samples"]["dsg_local_mcq"], key=lambda s: s["doc_id"])
    for r, s in zip(ours, samples):
        theirs = [float(x[0][0]) if isinstance(x[0], (list, tuple)) else float(x[0]) for x in s["resps"]]
        assert list(r.scores) == pytest.approx(theirs, abs=1e-4)
    assert out["results"]["dsg_local_mcq"]["acc,none"] == pytest.approx(accuracy(ours))


def test_cli_options_come_from_the_config_dataclass():
    import argparse

    parser = argparse.ArgumentParser(prog="dsg")
    sub = parser.add_subparsers(dest="command", required=True)
    cmp.add_compare(sub)
    args = parser.parse_args(["compare", "--budget", "0.1", "--methods", "dsg,rmu", "--keep-edits", "--out", "x"])
    from dsg.config import from_args

    config = from_args(CompareConfig, args)
    assert (config.budget, config.method_names(), config.keep_edits, config.out) == (0.1, ["dsg", "rmu"], True, "x")
    assert args.func is cmp.cmd_compare
    assert "paper's rule" in sub.choices["compare"].format_help()
    # options shared with `dsg demo` come from the common base, with their help text
    from dsg.config import field_docs
    from dsg.demo import DemoConfig

    docs = field_docs(CompareConfig)
    assert set(docs) == {f.name for f in dataclasses.fields(CompareConfig)}
    assert docs["normalized"] == field_docs(DemoConfig)["normalized"] and "acc_norm" in docs["normalized"]
    assert "acc_norm" in " ".join(sub.choices["compare"].format_help().split())


def test_compare_on_your_own_model_and_files_through_the_command(tiny_llama, tmp_path, capsys):
    import argparse

    from dsg.config import from_args  # noqa: F401 (cmd_compare uses it)

    model, tok = tiny_llama
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    tiny_sae(d_in=model.config.hidden_size).save(tmp_path / "sae")
    (tmp_path / "forget.txt").write_text("\n\n".join(FORGET))
    (tmp_path / "retain.txt").write_text("\n\n".join(RETAIN))
    files = {"cyber": ("The exploit", ["payload", "buffer", "shellcode", "packet"]),
             "geo": ("The capital", ["Paris", "Tokyo", "Lima", "Rome"])}
    for name, (stem, answers) in files.items():
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions(stem, answers, 12)))
    parser = argparse.ArgumentParser(prog="dsg")
    cmp.add_compare(parser.add_subparsers(dest="command"))
    out = tmp_path / "out"
    args = parser.parse_args([
        "compare", "--model", str(tmp_path / "model"), "--sae", str(tmp_path / "sae"),
        "--forget-corpus", str(tmp_path / "forget.txt"), "--retain-corpus", str(tmp_path / "retain.txt"),
        "--forget-questions", str(tmp_path / "cyber.jsonl"), "--retain-questions", str(tmp_path / "geo.jsonl"),
        "--heldout", str(tmp_path / "retain.txt"), "--methods", "dsg,ga", "--budget", "0.1",
        "--generation-tokens", "4", "--fit-sequences", "16", "--out", str(out)])
    assert args.func(args) == 0
    data = json.loads((out / "compare.json").read_text())
    assert set(data["methods"]) == {"dsg", "ga"}
    val, test = data["base"]["validation"]["tasks"], data["base"]["test"]["tasks"]
    assert val["cyber"]["n"] + test["cyber"]["n"] == 12 and val["cyber"]["n"] > 0 and test["cyber"]["n"] > 0
    assert "ga" in capsys.readouterr().out


def test_a_failing_configuration_is_recorded_and_skipped(tiny_llama, tmp_path):
    model, tok = tiny_llama
    bench = tiny_bench(model, tok)
    dsg_method, clamp = cmp.make_methods(["dsg", "static_clamp"])
    good = clamp.grid(bench, 0.1)[0]
    bad = good | {"retain_cutoff": 0.0}  # no latent fires on < 0% of retain tokens: fit raises DSGError
    clamp.grid = lambda bench, budget: [bad, good]
    calls = []
    fit = clamp.fit
    clamp.fit = lambda *a, **k: calls.append(a[1]) or fit(*a, **k)
    config = CompareConfig(out=str(tmp_path / "out"), budget=0.1, generation_tokens=2, perplexity_texts=1)
    result = run_compare(config, bench=bench, methods=[dsg_method, clamp], progress=False)
    failed = result["methods"]["static_clamp"]["failed_configs"]
    assert [f["config"] for f in failed] == [bad] and "No latent" in failed[0]["error"]
    assert result["methods"]["static_clamp"]["chosen"]["config"] == good
    run_compare(config, bench=bench, methods=[dsg_method, clamp], progress=False)
    assert calls == [bad, good]  # the failure is not retried


def test_a_grid_file_replaces_built_in_grids_and_refuses_unknown_settings(tiny_llama, tmp_path):
    model, tok = tiny_llama
    bench = tiny_bench(model, tok)
    methods = cmp.make_methods(["dsg", "conditional_clamp", "rmu", "npo"])
    path = tmp_path / "grid.json"
    path.write_text(json.dumps({"conditional_clamp": [{"n_features": 5, "clamp": 25.0}],
                                "rmu": [{"steering_coeff": 6.5, "alpha": 1200.0, "steps": 3}],
                                "npo": [{"beta": 1.0, "retain_loss": "kl"}]}))
    cmp.read_grid(str(path), methods)
    grids = {m.name: m.grid(bench, 1.0) for m in methods}
    assert grids["conditional_clamp"] == [{"variant": "conditional", "n_features": 5, "clamp": 25.0}]
    assert grids["npo"] == [{"method": "npo", "beta": 1.0, "retain_loss": "kl"}]
    assert grids["dsg"] == cmp.make_methods(["dsg"])[0].grid(bench, 1.0)  # untouched
    edit = methods[2].fit(bench, grids["rmu"][0], None, tmp_path / "e", False).edit
    assert edit.info["config"]["steering_coeff"] == 6.5 and edit.info["config"]["layer"] == bench.layer
    path.write_text(json.dumps({"rmu": [{"learning_rate": 1e-4}]}))
    with pytest.raises(DSGError, match="learning_rate"):
        cmp.read_grid(str(path), methods)
