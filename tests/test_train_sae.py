"""SAE training on tiny models: it learns, it is deterministic, its sparse gradients equal the dense ones, and
what it saves reads back bit-for-bit."""

from __future__ import annotations

import json
import math
import random
from dataclasses import asdict

import pytest
import torch

import dsg.sae.train as train_module
from dsg.config import field_docs
from dsg.errors import DSGError
from dsg.lm.text import corpus_sha256
from dsg.sae import SAE
from dsg.sae.train import TrainConfig, _SparseDecode, _TopKEncode, save_trained_sae, train_sae

SENTENCES = [
    "The capital of France is Paris.",
    "The capital of Japan is Tokyo.",
    "The capital of Peru is Lima.",
    "Sodium is a soft metal and its chemical symbol is Na.",
    "Gold has the symbol Au.",
    "The exploit injects a malicious payload through an unchecked buffer in the server.",
    "An attacker escalates privileges with a crafted packet and a stolen password hash.",
    "The garden had roses, tulips and a small pond with fish.",
    "The train left the station.",
    "Question: Answer: A B C D.",
]


def make_texts(n: int = 60, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(SENTENCES) for _ in range(rng.randint(2, 6))) for _ in range(n)]


def small_config(**overrides) -> TrainConfig:
    values = dict(
        hook="blocks.1.hook_resid_post",
        d_sae=64,
        k=4,
        batch_size=256,
        n_tokens=8192,
        max_length=32,
        eval_tokens=1024,
        ce_eval_tokens=256,
        dead_tokens=1024,
        lr=5e-3,
        lr_warmup_steps=2,
        val_fraction=0.2,
    )
    values.update(overrides)
    return TrainConfig(**values)


@pytest.fixture(scope="module")
def trained(tiny_llama):
    model, tok = tiny_llama
    return train_sae(model, tok, make_texts(), small_config(), progress=False)


def test_training_reduces_fvu_and_reports_metrics(trained, tiny_llama):
    sae, metrics = trained
    for key in (
        "fvu",
        "fvu_at_init",
        "l0",
        "dead_fraction",
        "ce_clean",
        "ce_zero_ablation",
        "ce_with_sae",
        "ce_loss_recovered",
        "train_tokens",
        "unique_tokens",
        "collect_tokens_per_s",
        "train_tokens_per_s",
        "wall_time_s",
        "config",
    ):
        assert key in metrics, key
    assert metrics["fvu"] < 0.8 * metrics["fvu_at_init"]
    assert 0 < metrics["l0"] <= 4
    assert 0 <= metrics["dead_fraction"] <= 1
    assert all(math.isfinite(metrics[k]) for k in ("ce_clean", "ce_zero_ablation", "ce_with_sae"))
    assert metrics["config"]["d_sae"] == 64 and metrics["config"]["seed"] == 0
    assert sae.architecture == "topk" and sae.k == 4 and (sae.d_in, sae.d_sae) == (32, 64)
    assert sae.hook_name == "blocks.1.hook_resid_post"
    norms = sae.W_dec.norm(dim=1)
    torch.testing.assert_close(norms, torch.ones_like(norms))


def test_same_seed_same_sae_and_other_seed_differs(trained, tiny_llama):
    model, tok = tiny_llama
    again, _ = train_sae(model, tok, make_texts(), small_config(), progress=False)
    assert again.sha256() == trained[0].sha256()
    other, _ = train_sae(model, tok, make_texts(), small_config(seed=1, n_tokens=1024), progress=False)
    assert other.sha256() != trained[0].sha256()


def test_save_reads_back_identically(trained, tiny_llama, tmp_path):
    sae, metrics = trained
    model, _ = tiny_llama
    out = save_trained_sae(tmp_path / "sae", sae, metrics, model=model)
    assert sorted(p.name for p in out.iterdir()) == ["cfg.json", "sae_weights.safetensors", "training.json"]
    back = SAE.load(out)
    assert back.sha256() == sae.sha256()
    assert (back.architecture, back.k, back.hook_name) == ("topk", 4, "blocks.1.hook_resid_post")
    record = json.loads((out / "training.json").read_text())
    assert record["sae_sha256"] == sae.sha256()
    assert record["seed"] == 0 and record["config"]["k"] == 4
    assert record["metrics"]["fvu"] == metrics["fvu"]
    assert record["model"]["weights_sha256"]
    assert "dsg_version" in record and "wall_time_s" in record
    # what the bytes depend on: the texts (count and hash, in order) and the machine's kind of sums
    assert record["texts"] == {"documents": len(make_texts()), "sha256": corpus_sha256(make_texts())}
    assert record["texts"]["sha256"] != corpus_sha256(make_texts()[::-1])
    assert record["machine"]["threads"] >= 1 and record["machine"]["cpu_capability"]
    assert not {"texts", "machine"} & set(record["metrics"])


def test_failed_save_leaves_nothing(trained, tmp_path, monkeypatch):
    sae, metrics = trained

    def boom(*_a, **_k):
        raise OSError("disk full")

    monkeypatch.setattr(train_module, "write_json", boom)
    with pytest.raises(OSError):
        save_trained_sae(tmp_path / "sae", sae, metrics)
    assert list(tmp_path.iterdir()) == []


def test_standard_relu_sae_on_gpt2(tiny_gpt2):
    model, tok = tiny_gpt2
    cfg = small_config(architecture="standard", l1_coefficient=0.01, n_tokens=4096, ce_eval_tokens=0)
    sae, metrics = train_sae(model, tok, make_texts(), cfg, progress=False)
    assert sae.architecture == "standard" and sae.k is None
    assert metrics["config"]["k"] is None and metrics["config"]["k_aux"] is None  # given k=4: not recorded as used
    assert metrics["fvu"] < metrics["fvu_at_init"]
    assert "ce_loss_recovered" not in metrics


def test_windows_past_a_short_context_are_one_sentence(tiny_gpt2):
    model, tok = tiny_gpt2  # learned positions: 256
    long = [" ".join(make_texts(80, seed=s)) for s in range(4)]
    cfg = small_config(architecture="standard", l1_coefficient=0.01, max_length=512, ce_eval_tokens=0)
    with pytest.raises(DSGError, match="needs 512 positions, but the model takes at most 256; set --max-length"):
        train_sae(model, tok, long, cfg, progress=False)


def test_cache_smaller_than_n_tokens_is_reused_over_epochs(tiny_llama):
    model, tok = tiny_llama
    cfg = small_config(unique_tokens=300, n_tokens=2048, val_fraction=0.0)
    _, metrics = train_sae(model, tok, make_texts(), cfg, progress=False)
    assert metrics["unique_tokens"] == 300
    assert metrics["epochs"] > 5
    assert "fvu" not in metrics  # nothing held out


def test_a_cache_smaller_than_a_batch_reports_the_tokens_it_trained_on(tiny_llama):
    """Each step then takes the whole cache: 9 steps of 100 tokens are 900 tokens and 9 epochs, not 9 x 1000."""
    model, tok = tiny_llama
    cfg = small_config(unique_tokens=100, batch_size=1000, n_tokens=9000, val_fraction=0.0)
    _, metrics = train_sae(model, tok, make_texts(), cfg, progress=False)
    assert metrics["steps"] == 9 and metrics["unique_tokens"] == 100
    assert metrics["train_tokens"] == 900 and metrics["epochs"] == pytest.approx(9.0)


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(architecture="gated"), "architecture='gated'"),
        (dict(k=0), "k=0"),
        (dict(val_fraction=1.0), "val_fraction=1.0"),
        (dict(cache_dtype="int8"), "cache_dtype='int8'"),
        (dict(hook="blocks.9.hook_resid_post"), "layer 9"),
        (dict(l1_coefficient=float("nan")), "l1_coefficient=nan"),  # NaN passed a "< 0" check
        (dict(auxk_coefficient=float("inf")), "auxk_coefficient=inf"),
        (dict(lr=float("inf")), "lr=inf"),
        (dict(hook="model.layers.0.mlp.gate_proj"), "reads a residual stream of width"),  # was a traceback
        (dict(lr_warmup_steps=33), "at most the run's 32 steps"),  # trained at 1e-4 x lr, with exit status 0
    ],
)
def test_bad_options_are_one_sentence(tiny_llama, overrides, match):
    model, tok = tiny_llama
    with pytest.raises(DSGError, match=match):
        train_sae(model, tok, make_texts(), small_config(**overrides), progress=False)


def test_needs_two_texts_to_hold_one_out(tiny_llama):
    model, tok = tiny_llama
    with pytest.raises(DSGError, match="at least 2 texts"):
        train_sae(model, tok, ["The capital of France is Paris."], small_config(), progress=False)


def test_every_config_field_has_help_text():
    docs = field_docs(TrainConfig)
    missing = [f for f in TrainConfig.__dataclass_fields__ if not docs.get(f)]
    assert missing == []


def test_sparse_gradients_equal_dense_autograd():
    torch.manual_seed(0)
    B, D, F, k, k_aux = 48, 12, 40, 5, 7
    x = torch.randn(B, D, dtype=torch.float64)
    params = [torch.randn(s, dtype=torch.float64, requires_grad=True) for s in ((D,), (F, D), (F,), (F, D))]
    dead = torch.rand(F) < 0.5

    def sparse(b_dec, W_enc, b_enc, W_dec):
        top, idx, aux, aux_idx = _TopKEncode.apply(x, b_dec, W_enc, b_enc, k, dead, k_aux)
        x_hat = _SparseDecode.apply(torch.relu(top), idx, W_dec) + b_dec
        e_hat = _SparseDecode.apply(torch.relu(aux), aux_idx, W_dec)
        return (x_hat - x).pow(2).sum() + (e_hat - (x - x_hat).detach()).pow(2).sum()

    def dense(b_dec, W_enc, b_enc, W_dec):
        pre = (x - b_dec) @ W_enc.t() + b_enc
        top, idx = pre.topk(k, dim=-1)
        x_hat = torch.zeros_like(pre).scatter(-1, idx, torch.relu(top)) @ W_dec + b_dec
        aux, aux_idx = pre.masked_fill(~dead, -math.inf).topk(k_aux, dim=-1)
        e_hat = torch.zeros_like(pre).scatter(-1, aux_idx, torch.relu(aux)) @ W_dec
        return (x_hat - x).pow(2).sum() + (e_hat - (x - x_hat).detach()).pow(2).sum()

    loss_s, loss_d = sparse(*params), dense(*params)
    torch.testing.assert_close(loss_s, loss_d)
    for gs, gd in zip(torch.autograd.grad(loss_s, params), torch.autograd.grad(loss_d, params)):
        torch.testing.assert_close(gs, gd)


def test_the_command_records_where_its_texts_came_from(tiny_llama, tmp_path, capsys):
    """`dsg train-sae --text F` writes training.json naming its source (the file's name) beside the texts' hash."""
    from dsg.cli import main

    model, tok = tiny_llama
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    (tmp_path / "corpus.txt").write_text("\n\n".join(make_texts()))
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in asdict(small_config()).items()
             if k in ("hook", "d_sae", "k", "batch_size", "n_tokens", "max_length", "eval_tokens", "ce_eval_tokens",
                      "dead_tokens", "val_fraction")]  # fmt: skip
    args = ["train-sae", "--model", str(tmp_path / "model"), "--text", str(tmp_path / "corpus.txt"), *flags]
    assert main([*args, "--out", str(tmp_path / "sae")]) == 0
    record = json.loads((tmp_path / "sae" / "training.json").read_text())
    assert record["texts"]["sources"] == ["file:corpus.txt"] and record["texts"]["documents"] == len(make_texts())
    metrics = record["metrics"]
    warned = "no better than at initialisation" in capsys.readouterr().err
    assert warned == (metrics["fvu"] >= metrics["fvu_at_init"])
    # one step on a handful of tokens wrote an SAE worse than its initialisation, with status 0 and no word
    short = [a for a in args if not a.startswith(("--n-tokens", "--batch-size", "--lr-warmup"))]
    code = main([*short, "--n-tokens=8", "--batch-size=8", "--lr-warmup-steps=0", "--out", str(tmp_path / "sae8")])
    metrics = json.loads((tmp_path / "sae8" / "training.json").read_text())["metrics"]
    err = capsys.readouterr().err
    assert code == 0 and metrics["steps"] == 1 and metrics["fvu"] >= metrics["fvu_at_init"]
    assert f"(FVU {metrics['fvu']:.3f}, {metrics['fvu_at_init']:.3f} at the start, after 1 steps)" in err, err
