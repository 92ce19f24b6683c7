"""Fitting, guardrail files (round trip, byte-identical, refusal on a different SAE or model) and the CLI."""

import dataclasses
import json

import numpy as np
import pytest
import torch

import dsg
from dsg.cli import main

from tiny import FORGET_TEXTS, RETAIN_TEXTS, sparse_sae, tiny_sae

FORGET = FORGET_TEXTS * 3
RETAIN = RETAIN_TEXTS * 3


@pytest.fixture
def fitted(tiny_llama):
    model, tok = tiny_llama
    sae = sparse_sae(model, tok, FORGET + RETAIN, rate=0.1)  # latents that fire on some tokens only: the gate can open
    config = dsg.FitConfig(n_features=4, ratio_percentile=80, max_length=64, batch_size=3)
    return model, tok, sae, dsg.fit(model, tok, sae, FORGET, RETAIN, config=config, progress=False)


def test_fit_selects_by_the_rule_and_calibrates_the_threshold(fitted):
    model, tok, sae, guard = fitted
    t = guard.tensors
    assert len(guard.features) == 4
    assert guard.features == dsg.select_features(t["forget_mean"], t["retain_mean"], 4, 80, 5)
    rho = t["calibration_rho"].double().numpy()
    assert guard.threshold == pytest.approx(float(np.percentile(rho, 95)))
    assert guard.info["data"]["calibration"]["source"] == "retain"
    assert guard.info["sae"]["sha256"] == sae.sha256()
    assert guard.info["model"]["weights_sha256"]


def test_save_load_round_trip_is_byte_identical_and_behaves_the_same(fitted, tmp_path):
    model, tok, sae, guard = fitted
    guard.save(tmp_path / "a")
    again = dsg.fit(
        model,
        tok,
        sae,
        FORGET,
        RETAIN,
        config=dsg.FitConfig(n_features=4, ratio_percentile=80, max_length=64, batch_size=3),
        progress=False,
    )
    again.save(tmp_path / "b")
    for name in ("guardrail.json", "guardrail.safetensors"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    loaded = dsg.Guardrail.load(tmp_path / "a", sae=sae, model=model)
    assert (loaded.features, loaded.threshold, loaded.clamp, loaded.hook) == (
        guard.features,
        guard.threshold,
        guard.clamp,
        guard.hook,
    )
    ids = tok(FORGET[:2] + RETAIN[:2], return_tensors="pt", padding=True)
    with torch.no_grad():
        with guard.attach(model) as s1:
            a = model(**ids).logits
        # self-contained: loads and runs without the SAE it was cut from
        with dsg.Guardrail.load(tmp_path / "a").attach(model) as s2:
            b = model(**ids).logits
    assert torch.equal(a, b) and torch.equal(s1.gated, s2.gated)


def test_topk_guardrail_carries_its_sae(tiny_llama, tmp_path):
    model, tok = tiny_llama
    sae = tiny_sae(d_in=model.config.hidden_size, architecture="topk", k=8)
    guard = dsg.fit(model, tok, sae, FORGET, RETAIN, config=dsg.FitConfig(n_features=3, max_length=16), progress=False)
    guard.save(tmp_path / "g")
    assert (tmp_path / "g" / "sae" / "cfg.json").exists()
    loaded = dsg.Guardrail.load(tmp_path / "g")
    assert loaded.sae.sha256() == sae.sha256() == loaded.sae_sha256


def test_loading_against_another_sae_or_model_refuses(fitted, tmp_path, tiny_gpt2):
    model, tok, sae, guard = fitted
    guard.save(tmp_path / "g")
    other_sae = tiny_sae(d_in=model.config.hidden_size, seed=5)
    with pytest.raises(dsg.DSGError, match="fitted on SAE"):
        dsg.Guardrail.load(tmp_path / "g", sae=other_sae)
    tweaked = type(model)(model.config).eval()
    tweaked.load_state_dict(model.state_dict())
    with torch.no_grad():
        tweaked.model.layers[0].mlp.down_proj.weight.mul_(1.01)
    with pytest.raises(dsg.DSGError, match="refit it for this model"):
        dsg.Guardrail.load(tmp_path / "g", model=tweaked)
    with pytest.raises(dsg.DSGError, match="refit it for this model"):
        guard.attach(tweaked).__enter__()
    with guard.attach(tweaked, verify=False):
        pass
    # an in-place merge written through .data (PEFT's way) leaves the version counter alone: still refused
    merged = type(model)(model.config).eval()
    merged.load_state_dict(model.state_dict())
    dsg.Guardrail.load(tmp_path / "g", model=merged)  # fingerprinted (and cached) before the edit
    merged.model.layers[0].mlp.down_proj.weight.data.add_(0.5)
    with pytest.raises(dsg.DSGError, match="refit it for this model"):
        dsg.Guardrail.load(tmp_path / "g", model=merged)
    # ... and so is one value edited that way, where a strided sample of the values does not look
    one = type(model)(model.config).eval()
    one.load_state_dict(model.state_dict())
    dsg.Guardrail.load(tmp_path / "g", model=one)
    weight = one.model.embed_tokens.weight
    assert weight.numel() >= 2 * 4096, weight.numel()  # then the sample skips odd positions
    weight.data.view(-1)[1] += 5.0
    with pytest.raises(dsg.DSGError, match="refit it for this model"):
        dsg.Guardrail.load(tmp_path / "g", model=one)
    # a model cast to another dtype after the fit is refused with the reason named
    half = type(model)(model.config).eval()
    half.load_state_dict(model.state_dict())
    with pytest.raises(dsg.DSGError, match=r"bfloat16 and the fitted model's were float32.*dtype=torch.float32"):
        dsg.Guardrail.load(tmp_path / "g", model=half.to(torch.bfloat16))
    # later layers do not feed the hook, so editing them keeps the guardrail valid
    with torch.no_grad():
        model.model.layers[-1].mlp.down_proj.weight.mul_(1.0)
    dsg.Guardrail.load(tmp_path / "g", model=model)


def test_fit_rejects_bad_config():
    with pytest.raises(dsg.DSGError, match="scorer"):
        dsg.FitConfig(scorer="magic")
    with pytest.raises(dsg.DSGError, match="gate_percentile"):
        dsg.FitConfig(gate_percentile=101)
    # refused up front, not after every statistics pass (scikit-learn's generator takes no other seed)
    for seed in (-1, 2**40):
        with pytest.raises(dsg.DSGError, match="seed must be an integer from 0 to 2147483647"):
            dsg.FitConfig(seed=seed)
    for cutoff in (-1.0, 0.0):  # it was read as a percentile's fault after the statistics
        with pytest.raises(dsg.DSGError, match="retain_cutoff is a positive share of retain tokens"):
            dsg.FitConfig(scorer="frequency", retain_cutoff=cutoff)
    assert dsg.FitConfig(scorer="frequency", retain_cutoff=1.5).retain_cutoff == 1.5  # no latent cut
    from dsg.sae.train import TrainConfig

    with pytest.raises(dsg.DSGError, match="seed=-1 is invalid"):
        TrainConfig(seed=-1).validate()


def test_static_frequency_scorer_fits(tiny_llama):
    model, tok = tiny_llama
    sae = tiny_sae(d_in=model.config.hidden_size)
    config = dsg.FitConfig(
        scorer="frequency", retain_cutoff=1.0, gated=False, clamp_mode="active", n_features=3, max_length=16
    )
    guard = dsg.fit(model, tok, sae, FORGET, RETAIN, config=config, progress=False)
    freq = guard.tensors["forget_frequency"]
    assert guard.features == dsg.select_by_frequency(freq, guard.tensors["retain_frequency"], 3, 1.0)
    assert not guard.gated


# ---- CLI --------------------------------------------------------------------------------------------------------


@pytest.fixture
def files(tiny_llama, tmp_path):
    model, tok = tiny_llama
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    sparse_sae(model, tok, FORGET + RETAIN, rate=0.1).save(tmp_path / "sae")
    (tmp_path / "forget.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in FORGET))
    (tmp_path / "retain.txt").write_text("\n\n".join(RETAIN))
    return tmp_path


def test_cli_fit_inspect_generate(files, capsys):
    out = files / "guard"
    code = main(
        [
            "fit",
            "--model",
            str(files / "model"),
            "--sae",
            str(files / "sae"),
            "--forget",
            str(files / "forget.jsonl"),
            "--retain",
            str(files / "retain.txt"),
            "--out",
            str(out),
            "--n-features",
            "4",
            "--ratio-percentile",
            "80",
            "--max-length",
            "64",
        ]
    )
    assert code == 0
    meta = json.loads((out / "guardrail.json").read_text())
    assert len(meta["features"]) == 4 and meta["config"]["n_features"] == 4
    capsys.readouterr()
    assert main(["inspect", str(out), "--top", "3"]) == 0
    text = capsys.readouterr().out
    assert "Selected latents (4)" in text and "calibration rho" in text
    assert (
        main(
            [
                "generate",
                "--model",
                str(files / "model"),
                "--guardrail",
                str(out),
                "--max-new-tokens",
                "3",
                "--no-chat",
                "--json",
                "the exploit",
                "the garden",
            ]
        )
        == 0
    )
    rows = json.loads(capsys.readouterr().out)
    assert [r["prompt"] for r in rows] == ["the exploit", "the garden"]
    assert all(isinstance(r["gated"], bool) for r in rows)


def test_cli_guardrails_fitted_in_bfloat16_are_used_in_bfloat16(files, capsys):
    """The CLI loaded every model in float32, so a guardrail fitted on a bfloat16 model (dsg fit --dtype, or
    the Python API) was refused by dsg generate, eval and serve. They load the model in the dtype the guardrails
    record; --dtype float32 is refused as another model, with the dtype to load named."""
    out = files / "guard16"
    paths = {"--model": "model", "--sae": "sae", "--forget": "forget.jsonl", "--retain": "retain.txt"}
    args = ["fit", *[a for flag, name in paths.items() for a in (flag, str(files / name))]]
    args += ["--n-features", "4", "--ratio-percentile", "80", "--max-length", "64", "--dtype", "bfloat16"]
    assert main(args + ["--out", str(out)]) == 0
    assert json.loads((out / "guardrail.json").read_text())["model"]["dtype"] == "bfloat16"
    generate = ["generate", "--model", str(files / "model"), "--guardrail", str(out), "--max-new-tokens", "2",
                "--no-chat", "--json", "the exploit"]  # fmt: skip
    capsys.readouterr()
    assert main(generate) == 0
    assert isinstance(json.loads(capsys.readouterr().out)[0]["gated"], bool)
    assert main(generate + ["--dtype", "float32"]) == 2
    assert "fitted model's were bfloat16" in capsys.readouterr().err


def test_cli_fit_settles_a_prompt_level_on_held_out_forget_questions(files, capsys):
    """dsg fit --forget-questions: the prompt level is judged on the given questions and the check is in the
    written guardrail; without them dsg fit says it was not checked; the flag without a prompt level, or a file
    that holds no questions, is refused before anything is written."""
    (files / "calibration.txt").write_text("\n\n".join(f"{r} {f}" for f in FORGET_TEXTS for r in RETAIN_TEXTS))
    questions = [{"question": f"{RETAIN_TEXTS[i % 2]} {f}", "choices": [" x", " j"], "answer": i % 2}
                 for i, f in enumerate(FORGET_TEXTS * 2)]  # fmt: skip
    (files / "questions.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))
    (files / "prompts.jsonl").write_text("".join(json.dumps({"text": f}) + "\n" for f in FORGET_TEXTS))
    paths = {"--model": "model", "--sae": "sae", "--forget": "forget.jsonl", "--retain": "retain.txt",
             "--calibration": "calibration.txt"}  # fmt: skip
    args = ["fit", *[a for flag, name in paths.items() for a in (flag, str(files / name))]]
    args += ["--n-features", "4", "--ratio-percentile", "80", "--max-length", "64", "--batch-size", "3"]
    args += ["--gate-window", "6", "--detector", "--detector-c", "1.0", "--gate-percentile", "50", "--gate-hold", "3"]
    level = ["--gate-latch-percentile", "100", "--gate-prompt-percentile", "100"]
    assert main(args + level + ["--out", str(files / "unchecked")]) == 0
    assert "not checked" in capsys.readouterr().err
    assert "prompt_level_check" not in json.loads((files / "unchecked" / "guardrail.json").read_text())
    out = files / "checked"
    assert main(args + level + ["--forget-questions", str(files / "questions.jsonl"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    meta = json.loads((out / "guardrail.json").read_text())
    check = meta["prompt_level_check"]
    assert check["questions"] == len(questions) and 0 < check["base_correct"] <= len(questions)
    assert "held-out forget questions" in printed
    assert ("prompt_level" in meta) == check["kept"] == (check["loss"] <= 0.03)
    for extra, name, message in (([], "questions.jsonl", "pass --gate-prompt-percentile"),
                                 (level, "prompts.jsonl", "needs a string field 'question'")):  # fmt: skip
        out = files / "refused"
        assert main(args + extra + ["--forget-questions", str(files / name), "--out", str(out)]) == 2
        assert message in capsys.readouterr().err and not out.exists()


@pytest.mark.parametrize(
    "problem, message",
    [
        ("missing", "does not exist"),
        ("badjson", "line 2 is not valid JSON: Expecting property name enclosed in double quotes at column 2"),
        ("nofield", "no string field 'text'"),
    ],
)
def test_cli_bad_input_is_one_sentence_and_no_output(files, capsys, problem, message):
    forget = files / "bad.jsonl"
    if problem == "badjson":
        forget.write_text('{"text": "ok"}\n{oops\n')
    elif problem == "nofield":
        forget.write_text('{"body": "no text field"}\n')
    out = files / "guard"
    code = main(
        [
            "fit",
            "--model",
            str(files / "model"),
            "--sae",
            str(files / "sae"),
            "--forget",
            str(forget),
            "--retain",
            str(files / "retain.txt"),
            "--out",
            str(out),
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert message in err and err.count("\n") == 0 and "Traceback" not in err
    assert not out.exists()
    assert not [p for p in files.iterdir() if p.name.startswith(".guard")]


def test_fit_refuses_a_gate_that_could_never_open(tiny_llama):
    """Latents that fire on nearly every token of short windows give rho = 1 at the 95th percentile: strict
    rho > threshold could never hold, so no guardrail is made (this setup used to write one silently)."""
    model, tok = tiny_llama
    config = dsg.FitConfig(n_features=4, ratio_percentile=80, max_length=16, batch_size=3)
    with pytest.raises(dsg.DSGError, match="could never open"):
        dsg.fit(model, tok, tiny_sae(d_in=model.config.hidden_size), FORGET, RETAIN, config=config, progress=False)


def test_latents_that_never_fire_on_forget_text_are_not_selected(tiny_llama):
    """With three live latents and N = 8 the paper's percentile cuts both fall to 0 and would fill the selection
    with dead latents (ties at 0, lowest ids first), whose clamp pushes the residual along unrelated directions.
    Only latents that fire on the forget corpus are selected; an SAE none of whose latents fire is refused."""
    model, tok = tiny_llama
    sae = sparse_sae(model, tok, FORGET + RETAIN, rate=0.1)
    alive = [29, 13, 42]
    with torch.no_grad():
        dead = torch.ones(sae.d_sae, dtype=torch.bool)
        dead[alive] = False
        sae.b_enc[dead] = -1e4
    config = dsg.FitConfig(n_features=8, ratio_percentile=80, max_length=64, batch_size=3)
    guard = dsg.fit(model, tok, sae, FORGET, RETAIN, config=config, progress=False)
    assert sorted(guard.features) == sorted(j for j in alive if guard.tensors["forget_mean"][j] > 0)
    assert guard.features and all(guard.tensors["forget_mean"][j] > 0 for j in guard.features)
    with torch.no_grad():
        sae.b_enc[:] = -1e4
    with pytest.raises(dsg.DSGError, match="must fire on the forget corpus"):
        dsg.fit(model, tok, sae, FORGET, RETAIN, config=config, progress=False)


def test_windows_past_a_short_context_are_one_sentence_before_any_forward(tiny_gpt2, monkeypatch):
    """A model with learned positions (GPT-2: 256 here) fails inside its embedding past its context; fit names the
    setting to lower instead, for the corpora and for the calibration texts."""
    model, tok = tiny_gpt2
    sae = tiny_sae(d_in=model.config.hidden_size)
    long = [" ".join(FORGET_TEXTS * 8)]
    config = dsg.FitConfig(n_features=2, ratio_percentile=50, max_length=512)
    import sys

    fit_module = sys.modules["dsg.guard.fit"]  # the module (dsg.guard.fit the attribute is the function)

    def forward(*args, **kwargs):
        raise AssertionError("a statistics pass ran before the context was checked")

    with monkeypatch.context() as m:
        m.setattr(fit_module, "collect_stats", forward)
        with pytest.raises(
            dsg.DSGError, match="needs 512 positions, but the model takes at most 256; set --max-length"
        ):
            dsg.fit(model, tok, sae, FORGET + long, RETAIN, config=config, progress=False)
        with pytest.raises(dsg.DSGError, match="at most 256; set --max-length .max_length. to 256 or less"):
            dsg.fit(model, tok, sae, FORGET, RETAIN, calibration=RETAIN + long, config=config, progress=False)
    short = dsg.FitConfig(n_features=2, ratio_percentile=50, max_length=256, gated=False)  # cut to fit: it runs
    assert dsg.fit(model, tok, sae, FORGET + long, RETAIN, config=short, progress=False).features


def test_texts_with_no_real_token_are_refused_as_corpora_and_left_out_of_calibration(tiny_llama):
    """Only BOS/EOS/PAD: nothing to measure (a forget corpus gave latents by index order, a retain corpus a
    threshold of 0), and in the calibration texts such an input is not a benign 0 that pulls the threshold down."""
    model, tok = tiny_llama
    sae = sparse_sae(model, tok, FORGET + RETAIN, rate=0.1)
    config = dsg.FitConfig(n_features=4, ratio_percentile=80, max_length=64, batch_size=3)
    special = ["<s></s>", "</s></s></s>"]
    with pytest.raises(dsg.DSGError, match="forget corpus holds no real token"):
        dsg.fit(model, tok, sae, special, RETAIN, config=config, progress=False)
    with pytest.raises(dsg.DSGError, match="retain corpus holds no real token"):
        dsg.fit(model, tok, sae, FORGET, special, config=config, progress=False)
    with pytest.raises(dsg.DSGError, match="calibration texts hold no real token"):
        dsg.fit(model, tok, sae, FORGET, RETAIN, special, config=config, progress=False)
    alone = dsg.fit(model, tok, sae, FORGET, RETAIN, RETAIN_TEXTS, config=config, progress=False)
    padded = dsg.fit(model, tok, sae, FORGET, RETAIN, RETAIN_TEXTS + ["</s></s>"] * 20, config=config, progress=False)
    assert padded.threshold == alone.threshold
    assert torch.equal(padded.tensors["calibration_rho"], alone.tensors["calibration_rho"])


def test_statistics_measured_on_other_corpora_or_settings_are_refused(tiny_llama):
    """fit(stats=...) reuses a statistics pass; one measured with another max_length or on other corpora would give
    a guardrail whose record says one thing and whose latents say another."""
    model, tok = tiny_llama
    sae = sparse_sae(model, tok, FORGET + RETAIN, rate=0.1)
    config = dsg.FitConfig(n_features=4, ratio_percentile=80, max_length=64, batch_size=3)
    from dsg.guard.fit import measure

    stats = measure(model, tok, sae, FORGET, RETAIN, config, progress=False)
    kept = dsg.fit(model, tok, sae, FORGET, RETAIN, config=dataclasses.replace(config, clamp=50.0), stats=stats,
                   progress=False)  # fmt: skip
    assert kept.clamp == 50.0  # selection and gate settings may differ: that is what the statistics are reused for
    for changed, forget, retain, word in (
        (dataclasses.replace(config, max_length=8), FORGET, RETAIN, "max_length"),
        (dataclasses.replace(config, seed=1), FORGET, RETAIN, "seed"),
        (config, RETAIN, FORGET, "forget corpus, retain corpus"),
    ):
        with pytest.raises(dsg.DSGError, match=f"measured with another {word}"):
            dsg.fit(model, tok, sae, forget, retain, config=changed, stats=stats, progress=False)


def test_a_hook_is_checked_against_the_point_the_sae_was_trained_at(tiny_llama):
    """--hook naming the SAE's own point under another name (a layer's output is the next layer's input) is
    accepted; a hook at another layer is refused before any forward pass."""
    from dsg.guard.fit import _checked_hook

    model, tok = tiny_llama
    sae = tiny_sae(d_in=model.config.hidden_size, hook="blocks.0.hook_resid_post")
    config = dsg.FitConfig(hook="blocks.1.hook_resid_pre")
    assert _checked_hook(model, sae, config)[0] == "blocks.1.hook_resid_pre"
    with pytest.raises(dsg.DSGError, match="trained at 'blocks.0.hook_resid_post'"):
        dsg.fit(model, tok, sae, FORGET, RETAIN, config=dsg.FitConfig(hook="blocks.1.hook_resid_post"), progress=False)
    # a decoder layer's module path is its output, the same point (was refused as "another point")
    for trained in ("model.layers.0", "layers.0"):
        named = tiny_sae(d_in=model.config.hidden_size, hook=trained)
        assert _checked_hook(model, named, config)[0] == "blocks.1.hook_resid_pre"
        assert _checked_hook(model, named, dsg.FitConfig(hook="blocks.0.hook_resid_post"))[1].layer == 0
        with pytest.raises(dsg.DSGError, match=f"trained at '{trained}'"):
            _checked_hook(model, named, dsg.FitConfig(hook="blocks.1.hook_resid_post"))


def test_gate_levels_refuse_a_latch_that_cannot_be_told_from_the_threshold_or_exceeded():
    """The latch level must lie above the threshold, and (a share of flagged tokens) below 1."""
    from dsg.guard.fit import _gate_levels

    config = dsg.FitConfig(gate_window=4, gate_hold=2, gate_percentile=50, gate_latch_percentile=100)
    assert _gate_levels(torch.tensor([0.1, 0.2, 0.3, 0.6]), config, False) == pytest.approx((0.25, 0.6, None))
    with pytest.raises(dsg.DSGError, match="does not lie above the gate threshold"):
        _gate_levels(torch.full((5,), 0.4), config, False)
    with pytest.raises(dsg.DSGError, match="would never latch"):
        _gate_levels(torch.tensor([0.1, 0.2, 0.3, 1.0]), config, False)
    # a detector's mean evidence is bounded by what its weights can give, not by 1
    assert _gate_levels(torch.tensor([0.1, 0.2, 0.3, 7.0]), config, True, 8.0)[1] == pytest.approx(7.0)
    # ... and its levels are stored in weight units (SCALE per 1.0) and told per weight unit, as dsg inspect does
    with pytest.raises(dsg.DSGError, match=r"is 7: no window's mean detector evidence can exceed it \(at most 7\)"):
        _gate_levels(torch.tensor([0.1, 0.2, 0.3, 7.0]) * 1024, config, True, 7.0 * 1024)


def test_overwrite_replaces_an_earlier_guardrail(files, capsys):
    inputs = ["--forget", str(files / "forget.jsonl"), "--retain", str(files / "retain.txt")]
    args = ["fit", "--model", str(files / "model"), "--sae", str(files / "sae"), "--max-length", "64", *inputs]
    args += ["--out", str(files / "g")]
    assert main(args + ["--n-features", "3"]) == 0
    assert main(args + ["--n-features", "4"]) == 2  # refused without --overwrite
    assert main(args + ["--n-features", "4", "--overwrite"]) == 0
    assert len(dsg.Guardrail.load(files / "g").features) == 4


def test_a_topk_guardrail_fitted_with_a_bf16_sae_loads(tiny_llama, tmp_path):
    model, tok = tiny_llama
    sae = tiny_sae(d_in=model.config.hidden_size, architecture="topk", k=8).to(torch.bfloat16)
    config = dsg.FitConfig(n_features=3, max_length=64, gated=False)
    guard = dsg.fit(model, tok, sae, FORGET, RETAIN, config=config, progress=False)
    guard.save(tmp_path / "g")
    loaded = dsg.Guardrail.load(tmp_path / "g", model=model)
    assert loaded.sae.W_enc.dtype == torch.bfloat16 and loaded.sae_sha256 == sae.sha256()


def test_a_windowed_gate_is_calibrated_on_the_largest_window_share_and_saved(fitted, tmp_path):
    model, tok, sae, _ = fitted
    config = dsg.FitConfig(n_features=4, ratio_percentile=80, max_length=64, batch_size=3, gate_window=12,
                           gate_percentile=50)  # fmt: skip
    guard = dsg.fit(model, tok, sae, FORGET, RETAIN, config=config, progress=False)
    peaks = guard.tensors["calibration_rho"].double().numpy()
    assert guard.window == 12 and guard.threshold == pytest.approx(float(np.percentile(peaks, 50)))
    plain_config = dsg.FitConfig(n_features=4, ratio_percentile=80, max_length=64, batch_size=3)
    plain = dsg.fit(model, tok, sae, FORGET, RETAIN, config=plain_config, progress=False)
    assert (peaks >= plain.tensors["calibration_rho"].double().numpy() - 1e-6).all()  # a window's share >= the whole's
    guard.save(tmp_path / "g")
    assert dsg.Guardrail.load(tmp_path / "g").window == 12 and "window" not in plain.to_json()


def test_a_held_open_gate_is_fitted_saved_and_checked(fitted, tmp_path):
    from dsg.files import read_safetensors
    from dsg.guard.integrity import HASH_FIELD, content_sha256

    model, tok, sae, _ = fitted
    config = dsg.FitConfig(n_features=4, ratio_percentile=80, max_length=64, batch_size=3, gate_window=12,
                           gate_percentile=50, gate_hold=16)  # fmt: skip
    guard = dsg.fit(model, tok, sae, FORGET, RETAIN, config=config, progress=False)
    assert guard.hold == 16 and "open for 16 tokens" in guard.gate_rule()
    guard.save(tmp_path / "g")
    assert dsg.Guardrail.load(tmp_path / "g").hold == 16
    path = tmp_path / "g" / "guardrail.json"
    meta = json.loads(path.read_text())
    meta["hold"] = 0  # re-hashed, so only the field check can catch it
    meta[HASH_FIELD] = content_sha256(meta, read_safetensors(tmp_path / "g" / "guardrail.safetensors"))
    path.write_text(json.dumps(meta))
    with pytest.raises(dsg.DSGError, match="'hold' must be a positive integer"):
        dsg.Guardrail.load(tmp_path / "g")
    with pytest.raises(dsg.DSGError, match="gate_hold"):
        dsg.FitConfig(gate_hold=16)  # a hold needs a window


def test_a_latch_level_is_calibrated_above_the_threshold_saved_and_checked(fitted, tmp_path):
    from dsg.files import read_safetensors
    from dsg.guard.integrity import HASH_FIELD, content_sha256

    model, tok, sae, _ = fitted
    config = dsg.FitConfig(n_features=4, ratio_percentile=80, max_length=64, batch_size=3, gate_window=12,
                           gate_percentile=50, gate_hold=16, gate_latch_percentile=90)  # fmt: skip
    guard = dsg.fit(model, tok, sae, FORGET, RETAIN, config=config, progress=False)
    rho = guard.tensors["calibration_rho"].double().numpy()
    assert guard.latch == pytest.approx(float(np.percentile(rho, 90))) and guard.latch > guard.threshold
    assert "anywhere in the prompt guards the answer" in guard.gate_rule()
    guard.save(tmp_path / "g")
    assert dsg.Guardrail.load(tmp_path / "g").latch == guard.latch
    path = tmp_path / "g" / "guardrail.json"
    meta = json.loads(path.read_text())
    meta["latch"] = guard.threshold / 2  # below the threshold, re-hashed: only the field check can catch it
    meta[HASH_FIELD] = content_sha256(meta, read_safetensors(tmp_path / "g" / "guardrail.safetensors"))
    path.write_text(json.dumps(meta))
    with pytest.raises(dsg.DSGError, match="'latch'.*must lie above 'threshold'"):
        dsg.Guardrail.load(tmp_path / "g")
    with pytest.raises(dsg.DSGError, match="gate_latch_percentile"):
        dsg.FitConfig(gate_window=8, gate_latch_percentile=99)  # a latch needs a hold
    with pytest.raises(dsg.DSGError, match="gate_latch_percentile"):
        dsg.FitConfig(gate_window=8, gate_hold=4, gate_percentile=97, gate_latch_percentile=95)  # below the gate
    with pytest.raises(dsg.DSGError, match="'hold' must be set"):
        dsg.Guardrail(sae, features=[0], threshold=0.5, window=4, latch=0.7)
    with pytest.raises(dsg.DSGError, match="'window' must be set"):
        dsg.Guardrail(sae, features=[0], threshold=0.5, hold=4)


@pytest.mark.parametrize(
    "edit", ["decoder past any SAE", "one tensor in float16", "hold past any context", "model config not an object"]
)
def test_re_hashed_tensors_and_fields_that_break_inference_are_refused(fitted, tmp_path, edit):
    """The content hash is not a signature: whoever edits a guardrail can re-hash it. What would give NaN logits
    (a decoder row of 1e38 times the clamp), a crash at inference (one tensor in another dtype) or a gate that
    reads as always open (a hold near the never-opened sentinel) is refused by the field checks."""
    from safetensors.torch import save_file

    from dsg.files import read_safetensors
    from dsg.guard.integrity import HASH_FIELD, content_sha256

    model, tok, sae, guard = fitted
    guard.save(tmp_path / "g")
    path, tpath = tmp_path / "g" / "guardrail.json", tmp_path / "g" / "guardrail.safetensors"
    meta, tensors = json.loads(path.read_text()), read_safetensors(tpath)
    if edit == "decoder past any SAE":
        tensors["W_dec_selected"] = tensors["W_dec_selected"].clone()
        tensors["W_dec_selected"][0, 0] = 1e38
    elif edit == "one tensor in float16":
        tensors["b_dec"] = tensors["b_dec"].half()
    elif edit == "hold past any context":
        meta |= {"window": 4, "hold": 10**13}
    else:
        meta["model"]["config"] = ["rms_norm_eps", 0.5]  # crashed the model check
    save_file(tensors, str(tpath))
    meta[HASH_FIELD] = content_sha256(meta, tensors)
    path.write_text(json.dumps(meta))
    refused = "past 1e\\+06|one dtype|'hold' must be a positive integer up to|'model.config'"
    with pytest.raises(dsg.DSGError, match=refused):
        dsg.Guardrail.load(tmp_path / "g")


def test_fitting_inside_an_attachment_on_the_same_model_is_refused(fitted, tiny_llama):
    """Statistics and calibration read the model's own activations; inside attach() its guardrails would clamp
    them and the new guardrail would be fitted on edited activations, silently."""
    from dsg.guard.stats import gate_rates
    from dsg.sae.train import TrainConfig, train_sae

    model, tok, sae, guard = fitted
    config = dsg.FitConfig(n_features=4, ratio_percentile=80, max_length=64, batch_size=3)
    with guard.attach(model):
        with pytest.raises(dsg.DSGError, match="inside attach"):
            dsg.fit(model, tok, sae, FORGET, RETAIN, config=config, progress=False)
        with pytest.raises(dsg.DSGError, match="inside attach"):
            gate_rates(model, guard, [[5, 6, 7, 8]], progress=False)
        with pytest.raises(dsg.DSGError, match="inside attach"):
            small = TrainConfig(hook=guard.hook, d_sae=16, k=2, n_tokens=64, lr_warmup_steps=1)
            train_sae(model, tok, FORGET + RETAIN, small, progress=False)
    again = dsg.fit(model, tok, sae, FORGET, RETAIN, config=config, progress=False)  # outside: as before
    assert again.features == guard.features and again.threshold == guard.threshold


def test_a_model_with_the_same_weights_and_another_config_is_refused(fitted):
    """The check hashed weights only: a model whose config changes what they compute (rms_norm_eps, rope_theta,
    the activation, heads, a sliding window) was accepted though the activations at the hook differ."""
    import copy

    model, tok, sae, guard = fitted
    assert guard.info["model"]["config"]["rms_norm_eps"] == model.config.rms_norm_eps
    assert guard.info["model"]["dtype"] == "float32"
    other = copy.deepcopy(model)
    other.config.use_cache, other.config.pad_token_id = False, 3  # switches and token ids compute nothing
    guard.check_model(other)
    other.config.rms_norm_eps = 0.5
    with pytest.raises(dsg.DSGError, match=r"another config.*rms_norm_eps: 1e-06 -> 0.5"):
        guard.check_model(other)
    # a field the fitted model's transformers did not write (a newer version's default) is not compared
    del guard.info["model"]["config"]["rms_norm_eps"]
    guard.check_model(other)


def test_the_config_record_compares_what_computes_and_nothing_else():
    """Per-layer lists compare over the layers both models have (a model cut after its hook layer is the same
    model up to it), NaN equals itself, sets are recorded in one order, token ids are not compared, and a record
    that is not an object is refused instead of crashing the check."""
    from types import SimpleNamespace

    from dsg.lm.fingerprint import config_differences, config_record

    def model(**fields):
        return SimpleNamespace(config=SimpleNamespace(to_dict=lambda: fields))

    full = model(layer_types=["full", "sliding"] * 2, cap=float("nan"), tags={"b", "a", "c"}, unk_token_id=0)
    record = config_record(full)
    assert "unk_token_id" not in record and record["tags"] == ["a", "b", "c"]
    cut = model(layer_types=["full", "sliding"], cap=float("nan"), tags={"c", "a", "b"}, unk_token_id=7)
    assert config_differences(record, cut) == []
    other = model(layer_types=["sliding", "sliding"], cap=1.0)
    assert config_differences(record, other) == ["cap: nan -> 1.0", "layer_types: ['full', 'sliding', 'full', "
                                                 "'sliding'] -> ['sliding', 'sliding']"]  # fmt: skip
    with pytest.raises(dsg.DSGError, match="recorded model config must be an object"):
        config_differences(["cap", 1.0], full)


def test_guardrails_fitted_in_different_dtypes_are_refused_together(fitted):
    from dsg.guard.guardrail import fitted_dtype

    model, tok, sae, guard = fitted
    assert fitted_dtype([guard]) == "float32" and fitted_dtype([]) is None
    other = dsg.Guardrail(sae, features=[1, 2], threshold=0.1, name="half")
    other.info["model"] = {**guard.info["model"], "dtype": "bfloat16"}
    with pytest.raises(dsg.DSGError, match=r"different dtypes \(0: float32, half: bfloat16\)"):
        fitted_dtype([guard, other])


def test_inspect_of_a_static_guardrail_says_every_calibration_input_is_clamped(tmp_path):
    """A static rule (gated=False) clamps every input: the audit must not read its stored threshold as a gate."""
    from dsg.guard.inspect import describe

    from tiny import bpe_tokenizer, sparse_sae, tiny_model

    tok = bpe_tokenizer(add_bos=True)
    model = tiny_model("llama", seed=0, vocab=len(tok))
    sae = sparse_sae(model, tok, FORGET_TEXTS + RETAIN_TEXTS, rate=0.2)
    config = dsg.FitConfig(n_features=4, gated=False)
    dsg.fit(model, tok, sae, FORGET_TEXTS, RETAIN_TEXTS, RETAIN_TEXTS, config, progress=False).save(tmp_path / "g")
    shown = describe(tmp_path / "g")
    assert "static (every input)" in shown and "100.0% of calibration inputs gated" in shown


def test_selected_latents_that_decode_to_nothing_are_refused():
    """A latent whose decoder row is all zeros (a pruned or damaged SAE) fires, so it can be selected, but clamping
    it changes nothing: the guardrail written did nothing, with no warning."""
    from tiny import bpe_tokenizer, sparse_sae, tiny_model

    tok = bpe_tokenizer(add_bos=True)
    model = tiny_model("llama", seed=0, vocab=len(tok))
    sae = sparse_sae(model, tok, FORGET_TEXTS + RETAIN_TEXTS, rate=0.2)
    config = dsg.FitConfig(n_features=4, gated=False)
    chosen = dsg.fit(model, tok, sae, FORGET_TEXTS, RETAIN_TEXTS, RETAIN_TEXTS, config, progress=False).features
    sae.W_dec.data[chosen[1]] = 0.0
    with pytest.raises(dsg.DSGError, match=f"The selected latents {chosen[1]} have all-zero decoder rows"):
        dsg.fit(model, tok, sae, FORGET_TEXTS, RETAIN_TEXTS, RETAIN_TEXTS, config, progress=False)
