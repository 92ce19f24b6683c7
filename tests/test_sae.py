"""SAE math and every on-disk format we read or write."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import dsg

from tiny import tiny_sae

ARCHS = ["standard", "jumprelu", "topk"]


def x_batch(d=32, n=20, seed=1):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed)) * 0.2


@pytest.mark.parametrize("arch", ARCHS)
def test_encode_matches_the_architecture_definition(arch):
    sae = tiny_sae(architecture=arch)
    x = x_batch()
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    f = sae.encode(x)
    assert (f >= 0).all()
    if arch == "standard":
        assert torch.equal(f, torch.relu(pre))
    elif arch == "jumprelu":
        assert torch.equal(f, torch.relu(pre) * (pre > sae.threshold))
    else:
        assert ((f > 0).sum(-1) <= sae.k).all()
        top = pre.topk(sae.k, -1)
        assert torch.allclose(f.gather(-1, top.indices), torch.relu(top.values))
    assert torch.allclose(sae.decode(f), f @ sae.W_dec + sae.b_dec)


@pytest.mark.parametrize("arch", ARCHS)
def test_saelens_v6_round_trip(tmp_path, arch):
    sae = tiny_sae(architecture=arch)
    sae.save(tmp_path / "sae")
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert cfg["architecture"] == arch and cfg["metadata"]["hook_name"] == "blocks.0.hook_resid_post"
    back = dsg.SAE.load(tmp_path / "sae")
    assert back.sha256() == sae.sha256()
    assert back.hook_name == sae.hook_name and back.k == sae.k
    assert torch.equal(back.encode(x_batch()), sae.encode(x_batch()))


def test_saelens_flat_pre_v6_config(tmp_path):
    sae = tiny_sae(architecture="topk", k=5)
    d = tmp_path / "old"
    d.mkdir()
    save_file({n: t.contiguous() for n, t in sae.tensors().items()}, str(d / "sae_weights.safetensors"))
    (d / "cfg.json").write_text(
        json.dumps(
            {
                "d_in": 32,
                "d_sae": 64,
                "hook_point": "blocks.4.hook_resid_post",
                "activation_fn_str": "topk",
                "activation_fn_kwargs": {"k": 5},
                "apply_b_dec_to_input": True,
                "model_name": "tiny",
            }
        )
    )
    back = dsg.SAE.load(d)
    assert back.architecture == "topk" and back.k == 5 and back.hook_name == "blocks.4.hook_resid_post"
    assert back.model_name == "tiny"
    assert back.sha256() == sae.sha256()


def _sparsify_folder(d, sae, **cfg):
    """`sae` written the way EleutherAI sparsify writes one hookpoint: encoder transposed, its own cfg.json."""
    d.mkdir()
    save_file(
        {
            "encoder.weight": sae.W_enc.data.T.contiguous(),
            "encoder.bias": sae.b_enc.data,
            "W_dec": sae.W_dec.data,
            "b_dec": sae.b_dec.data,
        },
        str(d / "sae.safetensors"),
    )
    base = {"activation": "topk", "k": sae.k, "num_latents": sae.d_sae, "d_in": sae.d_in, "expansion_factor": 2}
    (d / "cfg.json").write_text(json.dumps(base | {"normalize_decoder": True} | cfg))
    return d


def test_sparsify_folder_with_transposed_encoder(tmp_path):
    sae = tiny_sae(architecture="topk", k=6)
    d = _sparsify_folder(tmp_path / "layers.3", sae)
    back = dsg.SAE.load(d)
    assert back.hook_name == "layers.3"
    assert back.sha256() == sae.sha256()
    assert torch.equal(back.encode(x_batch()), sae.encode(x_batch()))
    # saving a sparsify SAE writes SAELens, which reads back to the same SAE
    back.save(tmp_path / "as_saelens")
    assert dsg.SAE.load(tmp_path / "as_saelens").sha256() == sae.sha256()
    # a run folder with several hookpoints names them
    with pytest.raises(dsg.DSGError, match="layers.3"):
        dsg.SAE.load(tmp_path)


def test_sparsify_folder_name_is_its_recorded_hook(tmp_path):
    """sparsify names a folder after its hook point: another --sae-hook is refused as for a SAELens file that
    records one (it was read at that point silently), and a folder renamed to a plain name takes the given one."""
    sae = tiny_sae(architecture="topk", k=6)
    d = _sparsify_folder(tmp_path / "layers.3", sae)
    assert dsg.SAE.load(d, hook_name="layers.3").hook_name == "layers.3"
    with pytest.raises(dsg.DSGError, match="records its hook point 'layers.3'"):
        dsg.SAE.load(d, hook_name="blocks.0.hook_resid_post")
    for name in ("my_sae", "v1.2", "checkpoint.1000"):  # folders a user named, not hook points
        renamed = _sparsify_folder(tmp_path / name, sae)
        assert dsg.SAE.load(renamed, hook_name="blocks.0.hook_resid_post").hook_name == "blocks.0.hook_resid_post"
    with pytest.raises(dsg.DSGError, match="records its hook point 'transformer.h.5'"):
        dsg.SAE.load(_sparsify_folder(tmp_path / "transformer.h.5", sae), hook_name="blocks.0.hook_resid_post")


@pytest.mark.parametrize(
    "cfg, match",
    [
        # tanh(relu(.)) caps codes at 1; read as a ReLU SAE the codes, the statistics and the clamp were all wrong
        ({"activation_fn_str": "tanh-relu"}, "activation function 'tanh-relu' is not supported"),
        ({"activation_fn": "tanh-relu"}, "activation function 'tanh-relu' is not supported"),
        # the JumpReLU threshold was dropped and the SAE read as TopK
        ({"architecture": "jumprelu", "activation_fn_str": "topk", "activation_fn_kwargs": {"k": 4}},
         "architecture 'jumprelu' with activation function 'topk'"),
    ],
)  # fmt: skip
def test_saelens_activation_functions_other_than_relu_and_topk_are_refused(tmp_path, cfg, match):
    sae = tiny_sae(architecture="jumprelu")
    sae.save(tmp_path / "s")
    path = tmp_path / "s" / "cfg.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | cfg))
    with pytest.raises(dsg.DSGError, match=match):
        dsg.SAE.load(tmp_path / "s")
    path.write_text(json.dumps(json.loads(path.read_text()) | {"activation_fn_str": "relu", "activation_fn": None,
                                                                "architecture": "jumprelu"}))  # fmt: skip
    assert dsg.SAE.load(tmp_path / "s").sha256() == sae.sha256()


@pytest.mark.parametrize(
    "key, value, match",
    [
        ("k", 6.5, "k must be an integer, got 6.5"),  # was truncated to 6
        ("k", True, "k must be an integer, got True"),  # was read as k = 1
        ("k", "6", "k must be an integer"),
        ("num_latents", "64", "num_latents must be an integer"),
        ("d_in", 32.5, "d_in must be an integer"),  # was truncated to 32 and matched the weights
    ],
)
def test_sae_config_numbers_are_integers_not_coerced(tmp_path, key, value, match):
    sae = tiny_sae(architecture="topk", k=6)
    with pytest.raises(dsg.DSGError, match=match):
        dsg.SAE.load(_sparsify_folder(tmp_path / "sparsify", sae, **{key: value}))
    sae.save(tmp_path / "saelens")
    cfg = json.loads((tmp_path / "saelens" / "cfg.json").read_text())
    if key in ("k", "d_in"):
        (tmp_path / "saelens" / "cfg.json").write_text(json.dumps(cfg | {key: value}))
        with pytest.raises(dsg.DSGError, match=match):
            dsg.SAE.load(tmp_path / "saelens")


def test_sae_config_whole_numbers_written_as_floats_are_read(tmp_path):
    sae = tiny_sae(architecture="topk", k=6)
    back = dsg.SAE.load(_sparsify_folder(tmp_path / "sparsify", sae, k=6.0, num_latents=64.0, d_in=32.0))
    assert back.k == 6 and isinstance(back.k, int) and back.sha256() == sae.sha256()
    sae.save(tmp_path / "flat")
    cfg = json.loads((tmp_path / "flat" / "cfg.json").read_text())
    bad_kwargs = {"activation_fn_str": "topk", "activation_fn_kwargs": [6]}
    (tmp_path / "flat" / "cfg.json").write_text(json.dumps(cfg | bad_kwargs))
    with pytest.raises(dsg.DSGError, match="activation_fn_kwargs must be an object"):
        dsg.SAE.load(tmp_path / "flat")


def test_gemma_scope_npz(tmp_path):
    sae = tiny_sae(architecture="jumprelu")
    arrays = {n: t.numpy() for n, t in sae.tensors().items()}
    np.savez(tmp_path / "params.npz", **arrays)
    with pytest.raises(dsg.DSGError, match="hook"):
        dsg.SAE.load(tmp_path / "params.npz")
    back = dsg.SAE.load(tmp_path / "params.npz", hook_name="blocks.3.hook_resid_post")
    assert back.architecture == "jumprelu" and not back.apply_b_dec_to_input
    x = x_batch()
    pre = x @ sae.W_enc + sae.b_enc  # Gemma Scope does not subtract b_dec from the input
    assert torch.equal(back.encode(x), torch.relu(pre) * (pre > sae.threshold))
    back.save(tmp_path / "gs")
    assert dsg.SAE.load(tmp_path / "gs").sha256() == back.sha256()


def test_shapes_and_files_are_checked(tmp_path):
    sae = tiny_sae()
    with pytest.raises(dsg.DSGError, match="W_dec"):
        dsg.SAE(sae.W_enc.data, sae.W_dec.data[:10], sae.b_enc.data, sae.b_dec.data)
    with pytest.raises(dsg.DSGError, match="threshold"):
        dsg.SAE(sae.W_enc.data, sae.W_dec.data, sae.b_enc.data, sae.b_dec.data, architecture="jumprelu")
    with pytest.raises(dsg.DSGError, match="integer k"):
        dsg.SAE(sae.W_enc.data, sae.W_dec.data, sae.b_enc.data, sae.b_dec.data, architecture="topk")
    with pytest.raises(dsg.DSGError, match="does not exist"):
        dsg.SAE.load(tmp_path / "missing")
    sae.save(tmp_path / "s")
    cfg = json.loads((tmp_path / "s" / "cfg.json").read_text())
    (tmp_path / "s" / "cfg.json").write_text(json.dumps({**cfg, "d_sae": 65}))
    with pytest.raises(dsg.DSGError, match="d_sae=65"):
        dsg.SAE.load(tmp_path / "s")
    (tmp_path / "s" / "cfg.json").write_text("{not json")
    with pytest.raises(dsg.DSGError, match="JSON"):
        dsg.SAE.load(tmp_path / "s")


def test_failed_save_leaves_nothing(tmp_path):
    sae = tiny_sae()
    (tmp_path / "file").write_text("x")
    with pytest.raises(dsg.DSGError, match="not a directory"):
        sae.save(tmp_path / "file")
    assert (tmp_path / "file").read_text() == "x"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_topk_sparse_statistics_equal_dense_ones():
    from dsg.guard.stats import LatentSums

    sae = tiny_sae(architecture="topk", k=5)
    x = x_batch(n=50)
    dense, sparse = LatentSums.zeros(sae.d_sae), LatentSums.zeros(sae.d_sae)
    dense.add(sae.encode(x), x)
    sparse.add_sparse(*sae.encode_topk(x), x)
    for a, b in zip(dense.as_tensors(), sparse.as_tensors()):
        assert torch.allclose(a, b, atol=1e-9)
    assert sparse.fire_count.sum() > 0


def test_an_sae_whose_values_no_sae_has_is_refused_where_it_loads(tmp_path):
    """A decoder past 1e6 (a guardrail fitted on it was refused only by the commands that read it back), values past
    the dtype it is loaded in (they read as infinite), and float8 weights (no isfinite of their own: a traceback)."""
    sae = tiny_sae()
    tensors = {k: v.clone() for k, v in sae.tensors().items()}
    with pytest.raises(dsg.DSGError, match="'W_dec' holds values past 1e"):
        dsg.SAE(tensors["W_enc"], tensors["W_dec"] * 1e7, tensors["b_enc"], tensors["b_dec"], architecture="standard")
    past_half = tensors["W_dec"] * (5e5 / tensors["W_dec"].abs().max())  # inside 1e6, past float16's 65504
    big = dsg.SAE(tensors["W_enc"], past_half, tensors["b_enc"], tensors["b_dec"], architecture="standard")
    big.save(tmp_path / "big")
    assert torch.isfinite(dsg.SAE.load(tmp_path / "big").W_dec).all()
    with pytest.raises(dsg.DSGError, match="past the range of torch.float16"):
        dsg.SAE.load(tmp_path / "big", dtype=torch.float16)
    f8 = getattr(torch, "float8_e4m3fn", None)
    if f8 is not None:  # loads, and reads as float32
        small = dsg.SAE(tensors["W_enc"].to(f8), tensors["W_dec"], tensors["b_enc"], tensors["b_dec"],
                        architecture="standard")  # fmt: skip
        small.save(tmp_path / "f8")
        assert dsg.SAE.load(tmp_path / "f8").W_enc.dtype == torch.float32
