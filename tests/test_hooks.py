"""Hook points resolve on every decoder-only architecture we support, and fail loudly otherwise."""

import pytest
import torch

import dsg
from dsg.lm.hooks import StopForward, hooked, resolve

from tiny import random_ids, tiny_model

ARCHS = ["llama", "gpt2", "qwen2", "gemma2", "gemma3", "gpt_neox"]


@pytest.mark.parametrize("arch", ARCHS)
def test_resid_post_is_the_decoder_layer_output(arch):
    model = tiny_model(arch, layers=3)
    ids = random_ids(2, 7)
    seen = {}
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
        for layer in range(3):
            with hooked(model, f"blocks.{layer}.hook_resid_post", lambda x, layer=layer: seen.__setitem__(layer, x)):
                model(ids)
            with hooked(
                model, f"blocks.{layer}.hook_resid_pre", lambda x, layer=layer: seen.__setitem__(("pre", layer), x)
            ):
                model(ids)
    # hidden_states[L] is the input of layer L; the last entry is taken after the final norm, so compare up to it
    for layer in range(3):
        assert torch.allclose(seen[("pre", layer)], out.hidden_states[layer], atol=1e-6)
    for layer in range(2):
        assert torch.allclose(seen[layer], out.hidden_states[layer + 1], atol=1e-6)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_editing_resid_pre_changes_the_output(arch):
    model = tiny_model(arch)
    ids = random_ids(1, 5)
    with torch.no_grad():
        base = model(ids).logits
        with hooked(model, "blocks.1.hook_resid_pre", lambda x: x * 0):
            edited = model(ids).logits
    assert not torch.allclose(base, edited)


def test_plain_module_names_resolve_from_model_or_base_model():
    model = tiny_model("llama")
    assert resolve(model, "model.layers.1.mlp").module is model.model.layers[1].mlp
    assert resolve(model, "layers.1").module is model.model.layers[1]  # sparsify-style, relative to base_model


def test_unknown_hook_names_both_and_lists_the_range():
    model = tiny_model("llama")
    with pytest.raises(dsg.DSGError, match=r"'blocks\.2\.hook_resid_post'.*layers 0\.\.1"):
        resolve(model, "blocks.2.hook_resid_post")
    with pytest.raises(dsg.DSGError, match=r"Unknown hook point 'nope'.*0 <= L < 2"):
        resolve(model, "nope")


def test_stop_forward_ends_the_pass_and_hooks_are_removed():
    model = tiny_model("llama")
    calls = []

    def stop(x):
        calls.append(x.shape)
        raise StopForward

    with hooked(model, "blocks.0.hook_resid_post", stop), pytest.raises(StopForward):
        model(random_ids(1, 4))
    assert len(model.model.layers[0]._forward_hooks) == 0
    model(random_ids(1, 4))
    assert calls == [torch.Size([1, 4, 32])]
