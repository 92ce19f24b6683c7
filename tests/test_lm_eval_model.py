"""The registered lm-eval model `dsg`, run by the real lm-eval command line on local tasks built from our question
files, gives the accuracy `dsg eval` gives on the same questions, with the demo's guardrail and without."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None, reason="lm-eval not installed"),
]

TASK = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
target_delimiter: " "
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""


def _lm_eval(tmp, model_args: str, tasks: list[str], out: str) -> dict:
    cmd = [sys.executable, "-m", "dsg.runtime.lm_eval", "run", "--model", "dsg", "--model_args", model_args,
           "--tasks", *tasks, "--include_path", str(tmp), "--batch_size", "8",
           "--output_path", str(tmp / out)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    found = sorted((tmp / out).rglob("results*.json"))
    assert found, done.stdout[-2000:]
    return json.loads(found[-1].read_text())["results"]


def test_registered_lm_eval_model_matches_dsg_eval(demo, tmp_path):
    from dsg import Guardrail
    from dsg.data import load_domain
    from dsg.eval import score_mcq
    from dsg.models import load_model

    tasks = {}
    for domain in ("cyber", "geography"):
        qs = [q.to_json() for q in load_domain(domain).questions["test"][:24]]
        path = tmp_path / f"{domain}.jsonl"
        path.write_text("".join(json.dumps(q) + "\n" for q in qs))
        (tmp_path / f"{domain}.yaml").write_text(TASK.format(name=f"dsg_{domain}", path=path))
        tasks[f"dsg_{domain}"] = qs
    guard = demo / "guardrail"
    guarded = _lm_eval(tmp_path, f"pretrained=smollm2-135m,guardrail={guard}", list(tasks), "guarded")
    base = _lm_eval(tmp_path, "pretrained=smollm2-135m", list(tasks), "base")

    model, tok = load_model("smollm2-135m")
    g = Guardrail.load(guard, model=model)
    changed = False
    for name, qs in tasks.items():
        for results, intervention in ((guarded, [g]), (base, None)):
            ours = score_mcq(model, tok, qs, intervention=intervention, progress=False)
            acc = sum(r.prediction == q["answer"] for r, q in zip(ours, qs)) / len(qs)
            acc_norm = sum(r.prediction_norm == q["answer"] for r, q in zip(ours, qs)) / len(qs)
            assert results[name]["acc,none"] == pytest.approx(acc, abs=1e-9), (name, intervention is not None)
            assert results[name]["acc_norm,none"] == pytest.approx(acc_norm, abs=1e-9), (name, intervention is not None)
        changed |= guarded[name]["acc,none"] != base[name]["acc,none"]
    assert changed  # the guardrail acts inside lm-eval (the cyber accuracy moves)


def test_a_refusal_is_one_line_and_status_2(tmp_path):
    """A guardrail path that is not one is refused in one line (no traceback) with status 2, as `dsg` refuses it."""
    qs = tmp_path / "q.jsonl"
    qs.write_text(json.dumps({"question": "Q?", "choices": ["a", "b"], "answer": 0}) + "\n")
    (tmp_path / "q.yaml").write_text(TASK.format(name="dsg_q", path=qs))
    cmd = [sys.executable, "-m", "dsg.runtime.lm_eval", "run", "--model", "dsg", "--model_args",
           f"pretrained=smollm2-135m,guardrail={tmp_path / 'nosuch'}", "--tasks", "dsg_q", "--include_path",
           str(tmp_path)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("dsg lm_eval: error: ")
    assert "is not a guardrail directory" in done.stderr


def test_under_torchrun_the_dsg_model_is_refused_in_one_line(monkeypatch, capsys):
    """lm-eval takes the dsg model object as one process's, so under torchrun or accelerate every process ran every
    request (and said only 'assuming single-process'): refused in one line, status 2."""
    from dsg.runtime.lm_eval import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(sys, "argv", ["lm_eval", "run", "--model", "dsg", "--tasks", "none"])
    assert main() == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dsg lm_eval: error: the dsg model runs in one process") and len(err.splitlines()) == 1
    from dsg.runtime.lm_eval import _model_argument  # lm-eval's own HF model shards its requests: not refused

    assert [_model_argument(a) for a in (["--model", "hf"], ["--model=dsg"], ["--tasks", "x"])] == ["hf", "dsg", None]


def test_model_args_the_dsg_model_would_drop_are_refused_before_loading(tmp_path):
    """lm-eval hands HFLM the model dsg loaded, so HFLM drops the arguments it reads only when it loads a model by
    name, and any key it does not know, with a generic warning: `dtype=bfloat16` gave a float32 run, and a typo such
    as `guardrails=` would give an unguarded one, each with status 0."""
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    import dsg
    from dsg.runtime.lm_eval import DSGLM

    from tiny import tiny_sae

    guard = dsg.Guardrail(tiny_sae(d_in=576), features=[1, 2])
    guard.save(tmp_path / "g")
    for kwargs, message in (
        (dict(guardrails=str(tmp_path / "g")), "does not take guardrails"),
        (dict(revision="main"), "does not take revision"),
        (dict(dtype="float17"), "dtype must be one of float32, bfloat16, float16"),
        (dict(guardrail=str(tmp_path / "g"), dtype="bfloat16"), "differs from the dtype the guardrails were fitted"),
        (dict(guardrail=f"{tmp_path / 'g'}|{tmp_path / 'g'}/"), "is given twice"),
    ):
        with pytest.raises(dsg.DSGError, match=message):
            DSGLM(pretrained="smollm2-135m", allow_model_mismatch=True, **kwargs)
