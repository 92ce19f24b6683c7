"""Unlearning methods: RMU, GA/GradDiff/NPO on the shared training loop, weight edits, ungated SAE clamps, on tiny
models."""

import copy
import math

import pytest
import torch
from safetensors.torch import load_file

import dsg
from dsg.errors import DSGError
from dsg.lm.hooks import hooked, resolve
from dsg.lm.text import special_token_ids
from dsg.methods import METHODS, RMU, ClampConfig, GradDiffConfig, NPOConfig, RMUConfig, fit_clamp
from dsg.methods.ga import GAConfig
from dsg.methods.losses import reference_topk, target_logprobs, topk_kl
from dsg.methods.rmu import down_projection_names, frozen_activations
from dsg.methods.trained import as_sequences, batch_tensors, fixed_batches
from dsg.runtime.edit import Edit, apply_edit, edited, make_edit

from tiny import FORGET_TEXTS, RETAIN_TEXTS, random_ids, tiny_model, tiny_sae

FORGET = FORGET_TEXTS * 2
RETAIN = RETAIN_TEXTS * 2


def ids_corpus(seed, n=8, length=12):
    return random_ids(n, length, seed=seed).tolist()


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def same_weights(model, snap):
    return all(torch.equal(p, snap[n]) for n, p in model.named_parameters())


# ---- RMU ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "arch,layer,expected",
    [("llama", 3, "mlp.down_proj"), ("gpt2", 2, "mlp.c_proj"), ("gpt_neox", 2, "mlp.dense_4h_to_h")],
)
def test_rmu_changes_only_down_projections_of_the_three_layers_and_lowers_its_loss(arch, layer, expected):
    model = tiny_model(arch, layers=4)
    forget, retain = ids_corpus(1), ids_corpus(2)
    config = RMUConfig(layer=layer, steering_coeff=5.0, alpha=10.0, lr=3e-3, steps=8, batch_size=4, max_length=12)
    before = snapshot(model)
    edit = RMU().train(model, None, forget, retain, config, progress=False)
    assert same_weights(model, before)  # the model is handed back unchanged
    names = down_projection_names(model, [layer - 2, layer - 1, layer])
    assert all(expected in n for n in names)
    assert edit.names == sorted(names)
    assert edit.info["method"] == "rmu" and edit.info["cost"]["flops"] > 0 and edit.info["cost"]["seconds"] > 0
    assert (
        RMU().objective(model, None, forget, retain, config, edit)["loss"]
        < RMU().objective(model, None, forget, retain, config)["loss"]
    )


def test_rmu_cached_frozen_activations_equal_a_fresh_full_forward():
    model = tiny_model("llama", layers=3)
    seqs = ids_corpus(3, n=6)
    batches = fixed_batches(len(seqs), 4, 0)
    point = resolve(model, "blocks.1.hook_resid_post")
    cached = frozen_activations(model, point, seqs, batches, 0)
    for idx, acts in zip(batches, cached):
        ids, mask = batch_tensors(seqs, idx, 0, "cpu")
        seen = []
        with torch.no_grad(), hooked(model, point, lambda x, seen=seen: seen.append(x.clone())):
            model(input_ids=ids, attention_mask=mask)  # the whole model, no early stop
        from dsg.lm.text import real_token_mask

        assert torch.equal(seen[0][real_token_mask(ids, mask, special_token_ids(model))], acts)


def test_rmu_on_text_with_the_conftest_tokenizer(tiny_llama):
    model, tok = tiny_llama
    edit = RMU().train(model, tok, FORGET, RETAIN, RMUConfig(layer=1, steps=2, batch_size=4), progress=False)
    assert len(edit.names) == 2  # layers 0 and 1 (ℓ-2 is clipped at 0)


# ---- GA / GradDiff / NPO --------------------------------------------------------------------------------------


CONFIGS = {"ga": GAConfig, "graddiff": GradDiffConfig, "npo": NPOConfig}


@pytest.mark.parametrize(
    "method,retain_loss", [("ga", None), ("graddiff", "nll"), ("graddiff", "kl"), ("npo", "nll"), ("npo", "kl")]
)
def test_gradient_methods_lower_their_loss(tiny_llama, method, retain_loss):
    model, tok = tiny_llama
    extra = {} if method == "ga" else {"retain_loss": retain_loss, "alpha": 1.0, "kl_top_k": 16}
    extra |= {"beta": 0.5} if method == "npo" else {}
    config = CONFIGS[method](lr=3e-3, steps=6, batch_size=4, max_length=32, **extra)
    trainer = METHODS[method]()
    before = snapshot(model)
    edit = trainer.train(model, tok, FORGET, RETAIN, config, progress=False)
    assert same_weights(model, before)
    assert edit.names and all(".mlp." in n for n in edit.names)
    assert edit.info["method"] == method and edit.info["log"][-1]["step"] == 5
    start = trainer.objective(model, tok, FORGET, RETAIN, config)
    assert trainer.objective(model, tok, FORGET, RETAIN, config, edit)["loss"] < start["loss"]
    if method == "npo":  # θ = ref: (2/β)·log 2 per sequence
        assert start["forget"] == pytest.approx(2 / config.beta * math.log(2), rel=1e-6)
    if retain_loss == "kl":
        assert start["retain"] == pytest.approx(0.0, abs=1e-6)


def test_the_shared_loop_logs_the_terms_the_objective_computes(tiny_llama):
    """Step 0 of training sees the model before any update: its logged terms are the objective's on batch 0."""
    model, tok = tiny_llama
    config = GradDiffConfig(lr=1e-3, steps=1, batch_size=4, max_length=32)
    edit = METHODS["graddiff"]().train(model, tok, FORGET, RETAIN, config, progress=False)
    start = METHODS["graddiff"]().objective(model, tok, FORGET, RETAIN, config)
    assert edit.info["log"][0]["forget"] == pytest.approx(start["forget"], rel=1e-5)
    assert edit.info["log"][0]["retain"] == pytest.approx(start["retain"], rel=1e-5)


def test_npo_loss_at_step_zero_is_its_closed_form(tiny_gpt2):
    model, tok = tiny_gpt2
    for beta in (0.1, 1.0):
        edit = METHODS["npo"]().train(
            model, tok, FORGET, RETAIN, NPOConfig(beta=beta, steps=1, max_length=32), progress=False
        )
        assert edit.info["log"][0]["forget"] == pytest.approx(2 / beta * math.log(2), rel=1e-6)


def test_topk_kl_is_exact_with_the_full_vocabulary_and_a_lower_bound_otherwise(tiny_llama):
    model, tok = tiny_llama
    seqs = as_sequences(tok, RETAIN[:4], 32)
    ids, mask = batch_tensors(seqs, range(4), tok.pad_token_id, "cpu")
    with torch.no_grad():
        ref, tmask = target_logprobs(model, ids, mask)
        ref = ref[tmask]
        other = (ref + 0.3 * torch.randn_like(ref)).log_softmax(-1)
    full = (ref.exp() * (ref - other)).sum(-1).mean()
    assert float(topk_kl(*reference_topk(ref, 0), other)) == pytest.approx(float(full), rel=1e-5)
    assert float(topk_kl(*reference_topk(ref, 0), ref)) == pytest.approx(0.0, abs=1e-6)
    assert 0 <= float(topk_kl(*reference_topk(ref, 8), other)) <= float(full) + 1e-6


def test_configs_refuse_bad_values():
    with pytest.raises(DSGError, match="retain_loss"):
        GradDiffConfig(retain_loss="mse")
    with pytest.raises(DSGError, match="beta"):
        NPOConfig(beta=0.0)
    with pytest.raises(DSGError, match="lr"):
        GAConfig(lr=0.0)
    with pytest.raises(DSGError, match="Unknown unlearning method"):
        METHODS["sgd"]


# ---- weight edits ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rmu_edit():
    model = tiny_model("llama", layers=3)
    edit = RMU().train(
        model, None, ids_corpus(1), ids_corpus(2), RMUConfig(layer=2, steps=3, lr=1e-2, max_length=12), progress=False
    )
    return model, edit


def test_edit_saves_only_changed_tensors_and_apply_reproduces_logits_exactly(rmu_edit, tmp_path):
    model, edit = rmu_edit
    path = edit.save(tmp_path / "edit")
    stored = load_file(str(path / "edit.safetensors"))
    assert sorted(stored) == edit.names and len(stored) == 3
    ids = random_ids(2, 10, seed=5)
    base = snapshot(model)
    with torch.no_grad():
        with edited(model, path):
            want = model(ids).logits
        assert same_weights(model, base)  # restored bit for bit
        assert not torch.equal(want, model(ids).logits)
        fresh = copy.deepcopy(model)
        apply_edit(fresh, path)
        assert torch.equal(fresh(ids).logits, want)
    loaded = Edit.load(path)
    assert loaded.info["method"] == "rmu" and loaded.info["config"]["layer"] == 2


def test_make_edit_keeps_only_tensors_that_changed():
    model = tiny_model("llama")
    names = [n for n, _ in model.named_parameters()][:3]
    originals = {n: p.detach().clone() for n, p in model.named_parameters() if n in names}
    with torch.no_grad():
        dict(model.named_parameters())[names[1]].add_(1.0)
    edit = make_edit(model, originals, {"method": "test"})
    assert edit.names == [names[1]]


def test_edits_refuse_wrong_models_and_double_application(rmu_edit):
    model, edit = rmu_edit
    other = tiny_model("llama", layers=3, seed=7)  # same shapes, other weights
    with pytest.raises(DSGError, match="other values"):
        apply_edit(other, edit)
    with pytest.raises(DSGError, match="shape"):
        apply_edit(tiny_model("llama", layers=3, d=64), edit)
    with pytest.raises(DSGError, match="does not have"):
        apply_edit(tiny_model("gpt2", layers=3), edit)
    assert edit.info["base"]["model"]["config"]["hidden_act"] == "silu"
    reconfigured = copy.deepcopy(model)
    reconfigured.config.hidden_act = "gelu"  # the same weights compute something else
    with pytest.raises(DSGError, match="another config: hidden_act: 'silu' -> 'gelu'"):
        apply_edit(reconfigured, edit)
    fresh = copy.deepcopy(model)
    apply_edit(fresh, edit)
    with pytest.raises(DSGError, match="already applied"):
        apply_edit(fresh, edit)
    with edited(model, edit):  # a failure inside the block still restores
        pass
    base = snapshot(model)
    with pytest.raises(RuntimeError), edited(model, edit):
        raise RuntimeError("boom")
    assert same_weights(model, base)


# ---- SAE clamps -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant,mode", [("static", "all"), ("conditional", "active")])
def test_clamps_are_ungated_frequency_guardrails(tiny_llama, variant, mode):
    model, tok = tiny_llama
    sae = tiny_sae(d_in=model.config.hidden_size)
    cfg = ClampConfig(variant=variant, n_features=4, retain_cutoff=0.5, clamp=50.0)
    guard = fit_clamp(model, tok, sae, FORGET, RETAIN, cfg, dsg.FitConfig(max_length=32), progress=False)
    assert guard.clamp_mode == mode and not guard.gated and guard.clamp == 50.0
    from dsg.guard.fit import measure
    from dsg.guard.scorers import select_by_frequency

    s = measure(model, tok, sae, FORGET, RETAIN, dsg.FitConfig(max_length=32), progress=False)
    assert guard.features == select_by_frequency(s.forget.frequency, s.retain.frequency, 4, 0.5)


def test_dsg_sweeps_the_shipped_detector_gate_and_dsg_paper_the_papers_rule():
    """Whatever the bench's fit settings, `dsg` fits the detector gate and `dsg_paper` the whole-input gate."""
    from types import SimpleNamespace

    from dsg.bench.setting import DEMO_FIT

    for base in (dsg.FitConfig(), DEMO_FIT):
        bench = SimpleNamespace(fit=base)
        for budget in (0.1, 1.0, 2.0):
            for cfg in METHODS["dsg"]().grid(bench, budget):
                c = METHODS["dsg"]().fit_config(bench, cfg)
                assert c.detector and c.gate_window and c.gated
            for cfg in METHODS["dsg_paper"]().grid(bench, budget):
                c = METHODS["dsg_paper"]().fit_config(bench, cfg)
                assert not c.detector and c.gate_window is None and c.gated and not c.detector_context
                assert c.max_length == base.max_length  # data settings still come from the bench
    shipped = METHODS["dsg"]().fit_config(SimpleNamespace(fit=DEMO_FIT), METHODS["dsg"]().grid(None, 1.0)[0])
    rule = (
        "gate_window",
        "gate_hold",
        "gate_latch_percentile",
        "gate_latch_margin",
        "gate_latch_run_percentile",
        "gate_prompt_percentile",
        "gate_prompt_margin",
        "detector",
        "detector_context",
        "detector_floor",
        "gate_percentile",
        "n_features",
        "clamp",
        "clamp_mode",
    )
    assert [getattr(shipped, k) for k in rule] == [getattr(DEMO_FIT, k) for k in rule]  # dsg sweeps what ships first
    clamp = dsg.methods.sae_clamp.clamp_fit_config(ClampConfig(), DEMO_FIT)
    assert not clamp.gated and not clamp.detector and clamp.gate_window is None and not clamp.detector_context


def test_a_guardrail_runs_store_key_covers_the_gate_it_fits_with(monkeypatch):
    """The comparison's run key holds the whole fit config of a guardrail method: a change to the gate that ships
    (here its prompt level) is a new run, not one stored before it."""
    from types import SimpleNamespace

    import dsg.methods.dsg as dsg_method
    from dsg.bench.setting import DEMO_FIT
    from dsg.bench.store import config_key

    bench = SimpleNamespace(fit=DEMO_FIT, norm=True)
    method = METHODS["dsg"]()
    cfg = method.grid(None, 1.0)[0]
    before = config_key("dsg", method.settings(bench, cfg), {"model": "x"})
    assert before == config_key("dsg", method.settings(bench, dict(cfg)), {"model": "x"})
    assert method.settings(bench, cfg)["prompt_level_check"]["max_loss"] == 0.03  # how the shipped level is settled
    scored_otherwise = config_key(
        "dsg", method.settings(SimpleNamespace(fit=DEMO_FIT, norm=False), cfg), {"model": "x"}
    )
    assert scored_otherwise != before  # the check scores as the bench does: another scoring may settle another level
    monkeypatch.setattr(dsg_method, "DETECTOR", dsg_method.DETECTOR | {"gate_prompt_percentile": None})
    assert config_key("dsg", method.settings(bench, cfg), {"model": "x"}) != before
    assert "prompt_level_check" not in method.settings(bench, cfg)


def test_a_dsg_grid_entry_that_turns_the_prompt_level_off_drops_the_shipped_margin_with_it():
    """The shipped margin raises the prompt level: an entry without a prompt level fits with no margin rather than
    being refused, while one that asks for a margin without a level is still refused."""
    from types import SimpleNamespace

    from dsg.bench.setting import DEMO_FIT

    bench, method = SimpleNamespace(fit=DEMO_FIT), METHODS["dsg"]()
    assert method.fit_config(bench, {}).gate_prompt_margin == 0.5
    off = method.fit_config(bench, {"gate_prompt_percentile": None})
    assert off.gate_prompt_percentile is None and off.gate_prompt_margin == 0.0
    with pytest.raises(dsg.DSGError, match="gate_prompt_margin"):
        method.fit_config(bench, {"gate_prompt_percentile": None, "gate_prompt_margin": 0.5})


def test_a_refit_for_test_must_apply_the_prompt_level_scored_on_validation():
    """A guardrail fitted again for the test split (a windowed gate is not restored from its record) whose settled
    prompt level differs from the stored run's would be tested under another rule than the one chosen: refused."""
    from types import SimpleNamespace

    from dsg.bench.sweep import Sweep

    def method(level):
        fitted = SimpleNamespace(intervention=SimpleNamespace(check_model=lambda model: None),
                                 record={"prompt_level": level})  # fmt: skip
        return SimpleNamespace(name="dsg", restore=lambda *a: None, fit=lambda *a: fitted)

    sweep = Sweep.__new__(Sweep)
    sweep.bench, sweep.progress = SimpleNamespace(model=None), False
    run = {"config": {"n_features": 50}, "record": {"prompt_level": 3.5}}
    assert sweep.refit(method(3.5), run, None).record["prompt_level"] == 3.5
    with pytest.raises(dsg.DSGError, match="prompt level None, not the 3.5"):
        sweep.refit(method(None), run, None)


def test_a_trained_runs_store_key_covers_its_configs_defaults(monkeypatch):
    """A trained baseline's run key holds its whole config, defaults filled in: a changed default (here GA's
    learning rate, an entry that does not set it) is a new run."""
    import dataclasses
    from types import SimpleNamespace

    from dsg.bench.store import config_key

    bench = SimpleNamespace(layer=1)
    for name in ("ga", "graddiff", "npo", "rmu"):
        method = METHODS[name]()
        cfg = {k: v for k, v in method.grid(bench, 1.0)[0].items() if k != "lr"}
        settings = method.settings(bench, cfg)
        fields = {f.name for f in dataclasses.fields(method.config_class)}
        assert set(settings["config"]) == fields and all(settings[k] == v for k, v in cfg.items())
        before = config_key(name, settings, {"model": "x"})
        changed = dataclasses.make_dataclass(
            "Changed",
            [("lr", float, dataclasses.field(default=method.config_class.lr * 2))],
            bases=(method.config_class,),
        )
        monkeypatch.setattr(method, "config_class", changed)
        assert config_key(name, method.settings(bench, cfg), {"model": "x"}) != before
