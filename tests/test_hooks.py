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


def test_a_forward_stopped_after_a_hook_stops_only_in_its_own_thread():
    """stopped_after ends this thread's forwards at the hook (the rest of the block is skipped); a forward another
    thread runs on the same model meanwhile passes through whole, with the logits it has without the block."""
    import threading

    from dsg.lm.hooks import stopped_after

    model = tiny_model("llama", layers=3)
    ids = random_ids(2, 7)
    with torch.no_grad():
        expected = model(ids).logits
    seen, reached = {}, []
    with torch.no_grad(), stopped_after(model, "blocks.1.hook_resid_post", lambda x: seen.setdefault("x", x)):
        other = threading.Thread(target=lambda: seen.__setitem__("other", model(ids).logits))
        other.start()
        other.join()
        model(ids)
        reached.append(True)  # never: the forward above ended at the hook
    assert not reached and seen["x"].shape == (2, 7, model.config.hidden_size)
    assert torch.equal(seen["other"], expected)
    with torch.no_grad(), stopped_after(model, "blocks.1.hook_resid_post", lambda x: False):
        assert torch.equal(model(ids).logits, expected)  # `stop` said go on


def test_gates_are_all_decided_after_the_deepest_guardrail_hook():
    from dsg.runtime.intervention import as_intervention, gates_decided

    model = tiny_model("llama", layers=3)
    sae = lambda hook: dsg.SAE(torch.eye(32)[:, :8].clone(), torch.eye(32)[:8].clone(), torch.zeros(8),  # noqa: E731
                               torch.zeros(32), hook_name=hook)  # fmt: skip
    g = {h: dsg.Guardrail(sae(h), features=[0], threshold=0.1, clamp=1.0)
         for h in ("blocks.0.hook_resid_post", "blocks.1.hook_resid_pre", "blocks.1.hook_resid_post")}  # fmt: skip
    name = lambda *hooks: gates_decided(model, as_intervention([g[h] for h in hooks])).name  # noqa: E731
    assert name("blocks.1.hook_resid_pre", "blocks.0.hook_resid_post") == "blocks.1.hook_resid_pre"
    assert name("blocks.1.hook_resid_pre", "blocks.1.hook_resid_post") == "blocks.1.hook_resid_post"
    assert gates_decided(model, None) is None


@pytest.mark.parametrize("this_thread", [False, True])
def test_a_hook_for_this_thread_leaves_other_threads_forwards_alone(this_thread):
    import threading

    model = tiny_model("llama", layers=2)
    ids = random_ids(1, 5)
    with torch.no_grad():
        expected = model(ids).logits
    seen = {}
    with torch.no_grad(), hooked(model, "blocks.0.hook_resid_post", torch.zeros_like, this_thread=this_thread):
        other = threading.Thread(target=lambda: seen.__setitem__("other", model(ids).logits))
        other.start()
        other.join()
        mine = model(ids).logits
    assert not torch.equal(mine, expected)  # the hook edits this thread's forward either way
    assert torch.equal(seen["other"], expected) == this_thread


@pytest.mark.parametrize(
    "name, match",
    [
        ("model", "gives a BaseModelOutputWithPast"),  # a model output object: crashed on .shape
        ("model.rotary_emb", r"gives a tensor of shape \(1, 7, 8\) for \(2, 7\) input tokens"),  # rotary tables
    ],
)
def test_a_hook_whose_output_is_not_per_token_activations_is_refused(name, match):
    """Such hooks crashed with an AttributeError or an IndexError deep in the statistics; a Gemma3n decoder
    layer's stacked [streams, batch, tokens, width] output is refused the same way."""
    model = tiny_model("llama")
    with pytest.raises(dsg.DSGError, match=match):
        next(dsg.lm.hooks.activations_by_batch(model, name, [([0, 1], random_ids(2, 7), torch.ones(2, 7))]))
    stacked = model.model.layers[0].register_forward_hook(lambda m, a, out: out.expand(3, *out.shape))
    try:
        refused = pytest.raises(dsg.DSGError, match=r"gives a tensor of shape \(3, 2, 7, 32\)")
        with refused, hooked(model, "blocks.0.hook_resid_post", lambda x: None), torch.no_grad():
            model(random_ids(2, 7))
    finally:
        stacked.remove()
