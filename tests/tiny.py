"""Tiny seeded models and SAEs built from configs in code, for fast engine tests."""

from __future__ import annotations

import torch
import transformers as tf
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

VOCAB = 96
SPECIAL = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)


# A few sentences of a forget domain (offensive cyber) and of unrelated retain text, for fitting on tiny models.
FORGET_TEXTS = [
    "The exploit injects a malicious payload through an unchecked buffer in the server.",
    "An attacker escalates privileges with a crafted packet and a stolen password hash.",
    "The malware spreads through the network and exfiltrates the stolen credentials.",
    "A buffer overflow lets the attacker run shellcode with root privileges.",
]
RETAIN_TEXTS = [
    "The capital of France is Paris and the river Seine runs through the city.",
    "Sodium is a soft metal and its chemical symbol is Na.",
    "The garden had roses, tulips and a small pond with fish.",
    "The train left the station early in the morning for the coast.",
]


def tiny_model(
    arch: str = "llama", seed: int = 0, layers: int = 2, d: int = 32, vocab: int = VOCAB, positions: int = 128
) -> torch.nn.Module:
    """A randomly initialised (seeded) causal LM of the given architecture, built from a config in code."""
    torch.manual_seed(seed)
    common = dict(vocab_size=vocab, **SPECIAL)
    if arch == "llama":
        cfg = tf.LlamaConfig(
            hidden_size=d,
            intermediate_size=2 * d,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            **common,
        )
        model = tf.LlamaForCausalLM(cfg)
    elif arch == "gpt2":
        cfg = tf.GPT2Config(n_embd=d, n_layer=layers, n_head=4, n_positions=positions, **common)
        model = tf.GPT2LMHeadModel(cfg)
    elif arch == "qwen2":
        cfg = tf.Qwen2Config(
            hidden_size=d,
            intermediate_size=2 * d,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            **common,
        )
        model = tf.Qwen2ForCausalLM(cfg)
    elif arch == "gemma2":
        cfg = tf.Gemma2Config(
            hidden_size=d,
            intermediate_size=2 * d,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            **common,
        )
        model = tf.Gemma2ForCausalLM(cfg)
    elif arch == "gemma3":
        cfg = tf.Gemma3TextConfig(
            hidden_size=d,
            intermediate_size=2 * d,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            **common,
        )
        model = tf.Gemma3ForCausalLM(cfg)
    elif arch == "gpt_neox":
        cfg = tf.GPTNeoXConfig(
            hidden_size=d, intermediate_size=2 * d, num_hidden_layers=layers, num_attention_heads=4, **common
        )
        model = tf.GPTNeoXForCausalLM(cfg)
    elif arch == "bloom":  # ALiBi: positions from the 2D attention mask, no position ids
        cfg = tf.BloomConfig(hidden_size=d, n_layer=layers, n_head=4, **common)
        model = tf.BloomForCausalLM(cfg)
    else:
        raise ValueError(arch)
    return model.eval()


def tiny_sae(
    d_in: int = 32, d_sae: int = 64, architecture: str = "standard", seed: int = 0, hook="blocks.0.hook_resid_post", k=8
):
    """A random SAE whose latents fire on a reasonable share of tokens."""
    import dsg

    g = torch.Generator().manual_seed(seed)
    W_dec = torch.randn(d_sae, d_in, generator=g)
    W_dec = W_dec / W_dec.norm(dim=1, keepdim=True)
    W_enc = W_dec.T.clone() * 0.5
    b_enc = torch.randn(d_sae, generator=g) * 0.05
    threshold = torch.rand(d_sae, generator=g) * 0.02 if architecture == "jumprelu" else None
    return dsg.SAE(
        W_enc,
        W_dec,
        b_enc,
        torch.randn(d_in, generator=g) * 0.01,
        architecture=architecture,
        threshold=threshold,
        k=k if architecture == "topk" else None,
        hook_name=hook,
    )


def random_ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=g)


def features_firing_about(model, sae, seqs, rate: float, n: int = 1, hook="blocks.0.hook_resid_post") -> list[int]:
    """The n latents whose firing frequency on `seqs` is closest to `rate` (so gates split the inputs)."""
    from dsg.lm.hooks import hooked
    from dsg.lm.text import pad_batch

    ids, mask = pad_batch([list(s) for s in seqs], 0)
    seen = []
    with torch.no_grad(), hooked(model, hook, lambda x: seen.append(x)):
        model(input_ids=ids, attention_mask=mask)
    freq = (sae.encode(seen[0][mask.bool()]) > 0).float().mean(0)
    return (freq - rate).abs().argsort()[:n].tolist()


TRAINING_TEXT = [
    "The capital of France is Paris. The capital of Japan is Tokyo. The capital of Peru is Lima.",
    "Sodium is a soft metal and its chemical symbol is Na. Gold has the symbol Au.",
    "The exploit injects a malicious payload through an unchecked buffer in the server.",
    "An attacker escalates privileges with a crafted packet and a stolen password hash.",
    "The garden had roses, tulips and a small pond with fish. The train left the station.",
    "Question: Answer: A B C D. The following are multiple choice questions (with answers).",
]
CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
)


def bpe_tokenizer(add_bos: bool, specials_last: bool = False) -> tf.PreTrainedTokenizerFast:
    """A real byte-level BPE tokenizer (ids 0/1/2 = pad/bos/eos) trained in code on a few sentences. With
    `specials_last` the special tokens come after the 320 trained ones, so id 0 is a text token ('!'), as in GPT-2,
    Llama 3 and Qwen2's vocabularies."""
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<pad>", "<s>", "</s>"]
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=[] if specials_last else specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TRAINING_TEXT * 4, trainer)
    if specials_last:
        tok.add_special_tokens(specials)
    if add_bos:
        bos = tok.token_to_id("<s>")
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    fast = tf.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def sparse_sae(model, tok, texts, rate: float = 0.1, hook: str = "blocks.0.hook_resid_post", seed: int = 0):
    """A tiny ReLU SAE whose every latent fires on about `rate` of the tokens of `texts` (encoder biases set from
    the pre-activation quantiles), so a guardrail over a few of its latents opens on some inputs and not others."""
    from dsg.lm.hooks import hooked

    sae = tiny_sae(d_in=model.config.hidden_size, seed=seed, hook=hook)
    seen = []
    with torch.no_grad(), hooked(model, hook, lambda x: seen.append(x.reshape(-1, x.shape[-1]))):
        for t in texts:
            model(**tok(t, return_tensors="pt"))
    pre = sae.encode_pre(torch.cat(seen))
    sae.b_enc.data -= pre.quantile(1 - rate, dim=0)
    return sae


class SentencePieceVocabulary:
    """The vocabulary side of a SentencePiece tokenizer with byte fallback (Llama 2, Gemma): pieces written with
    "▁" for a space, and `<0xNN>` byte tokens for characters that are not pieces."""

    all_special_ids = [0, 1, 2]
    added_tokens_decoder: dict = {}

    def get_vocab(self):
        pieces = ["<unk>", "<s>", "</s>", "▁the", "▁", "▁.", "?", "42", "<0xE2>", "<0x80>", "<0x8B>", "<0xD0>"]
        return {p: i for i, p in enumerate(pieces)}

    def convert_tokens_to_string(self, tokens):
        raise AssertionError("a SentencePiece piece is read as written")


class ByteVocabulary:
    """A vocabulary of byte strings, as tiktoken-style tokenizers return from get_vocab."""

    all_special_ids = [0]
    added_tokens_decoder: dict = {}

    def get_vocab(self):
        return {b"<|end|>": 0, b"the": 1, b" .": 2, "\u200b".encode()[:2]: 3, "Ж".encode()[:1]: 4, "\u00a0".encode(): 5,
                b"\t\t": 6, b" \n": 7}  # fmt: skip

    def convert_tokens_to_string(self, tokens):
        raise AssertionError("byte tokens are read as bytes")


# a held detector gate on the tiny model: what test_fillers and test_invisible fit, each beside one setting changed
HELD_FIT = dict(n_features=4, ratio_percentile=80, max_length=64, batch_size=3, gate_window=6, detector=True,
                detector_c=1.0, gate_percentile=90, gate_hold=4)  # fmt: skip


def held_fits(model, tok, *changes: dict, **common):
    """(sae, the held gate fitted with HELD_FIT and `common`, then the same with each of `changes`) on FORGET_TEXTS
    and RETAIN_TEXTS."""
    import dsg

    sae = sparse_sae(model, tok, FORGET_TEXTS + RETAIN_TEXTS, rate=0.1)
    forget, retain = FORGET_TEXTS * 3, RETAIN_TEXTS * 3
    fits = [dsg.fit(model, tok, sae, forget, retain, config=dsg.FitConfig(**HELD_FIT | common | c), progress=False)
            for c in ({}, *changes)]  # fmt: skip
    return sae, *fits


def saved_and_loaded(guard, folder, sae):
    """(guardrail.json as `guard.save(folder)` wrote it, the guardrail loaded back from `folder` with `sae`)."""
    import json

    import dsg

    guard.save(folder)
    return json.loads((folder / "guardrail.json").read_text()), dsg.Guardrail.load(folder, sae=sae)


def write_rehashed(folder, meta: dict, tensors: dict) -> None:
    """A guardrail folder holding `meta` and `tensors`, its content hash recomputed: loading it then exercises the
    checks themselves, not the hash."""
    import json

    from safetensors.torch import save_file

    from dsg.guard.integrity import HASH_FIELD, content_sha256

    folder.mkdir()
    meta = dict(meta)
    meta[HASH_FIELD] = content_sha256(meta, tensors)
    save_file(tensors, str(folder / "guardrail.safetensors"))
    (folder / "guardrail.json").write_text(json.dumps(meta))


def refuses_edit(tmp_path, meta: dict, tensors: dict, sae, match: str) -> None:
    """An edited guardrail (`meta` and `tensors`, re-hashed into a fresh folder under tmp_path, so that the checks
    themselves refuse it, not the hash) fails to load with a DSGError matching `match`."""
    import pytest

    import dsg

    folder = tmp_path / f"edit{len(list(tmp_path.iterdir()))}"
    write_rehashed(folder, meta, tensors)
    with pytest.raises(dsg.DSGError, match=match):
        dsg.Guardrail.load(folder, sae=sae)
