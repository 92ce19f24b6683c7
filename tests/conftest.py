"""Shared fixtures: tiny seeded HF models with a real (byte-level BPE) tokenizer built in code."""

from __future__ import annotations

import os

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _threads(request):
    """Tiny models run fastest on one thread (2 threads make them ~30x slower on a loaded 2-core machine);
    end-to-end tests on the real model keep two."""
    before = torch.get_num_threads()
    torch.set_num_threads(2 if request.node.get_closest_marker("e2e") else 1)
    yield
    torch.set_num_threads(before)

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


def build_tokenizer(add_bos: bool) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(TRAINING_TEXT * 4, trainer)
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


@pytest.fixture(scope="session")
def tiny_llama():
    """(LlamaForCausalLM with 2 layers, hidden 32; tokenizer that adds BOS)."""
    tok = build_tokenizer(add_bos=True)
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=len(tok), bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval(), tok


@pytest.fixture(scope="session")
def tiny_gpt2():
    """(GPT2LMHeadModel with 2 layers, hidden 32; tokenizer without BOS, like SmolLM2's)."""
    tok = build_tokenizer(add_bos=False)
    torch.manual_seed(1)
    cfg = GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=256, vocab_size=len(tok), bos_token_id=1,
                     eos_token_id=2, pad_token_id=0)
    return GPT2LMHeadModel(cfg).eval(), tok
