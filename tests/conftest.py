"""The shared fixtures: one thread per tiny-model test, and tiny seeded models with a real tokenizer (the
builders live in tiny.py)."""

from __future__ import annotations

import os

import pytest
import torch

from tiny import bpe_tokenizer, tiny_model

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


@pytest.fixture(scope="session")
def tiny_llama():
    """(LlamaForCausalLM with 2 layers, hidden 32; tokenizer that adds BOS)."""
    tok = bpe_tokenizer(add_bos=True)
    return tiny_model("llama", seed=0, vocab=len(tok)), tok


@pytest.fixture(scope="session")
def tiny_gpt2():
    """(GPT2LMHeadModel with 2 layers, hidden 32; tokenizer without BOS, like SmolLM2's)."""
    tok = bpe_tokenizer(add_bos=False)
    return tiny_model("gpt2", seed=1, vocab=len(tok), positions=256), tok


@pytest.fixture(scope="session")
def demo(tmp_path_factory):
    """`dsg demo --quick` on the embedded default, run once per session: its folder (results, guardrail/)."""
    from dsg.cli import main

    out = tmp_path_factory.mktemp("demo") / "out"
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    return out
