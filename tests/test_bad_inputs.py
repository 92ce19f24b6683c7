"""Bad inputs and tampered files, through the CLI and the API: each gets one clear sentence (a DSGError; exit
status 2 and one `dsg CMD: error: ...` line on the command line, no traceback), and nothing is written, changed
or deleted. The workspace holds a real tiny model, SAE, corpora, question files, guardrails and a folder of the
user's own files; each case snapshots it before and after."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import dsg
from dsg.cli import main
from dsg.eval import score_mcq
from dsg.runtime import generate

from tiny import FORGET_TEXTS, RETAIN_TEXTS, bpe_tokenizer, sparse_sae, tiny_model, tiny_sae

FORGET, RETAIN = FORGET_TEXTS * 3, RETAIN_TEXTS * 3


def _question(i: int, **change) -> dict:
    return {
        "question": f"The capital number {i} is",
        "choices": ["Paris", "Tokyo", "Lima", "Rome"],
        "answer": 0,
    } | change


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """The workspace: model/, model_nobos/, sae/, topk/, corpora, questions, guardrails, keep/ (user files)."""
    root = tmp_path_factory.mktemp("ws")
    tok = bpe_tokenizer(add_bos=True)
    model = tiny_model("llama", seed=0, vocab=len(tok))
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    nobos = bpe_tokenizer(add_bos=False)
    tiny_model("gpt2", seed=1, vocab=len(nobos), positions=256).save_pretrained(root / "model_nobos")
    nobos.save_pretrained(root / "model_nobos")
    sae = sparse_sae(model, tok, FORGET + RETAIN, rate=0.1)
    sae.save(root / "sae")
    (root / "forget.txt").write_text("\n\n".join(FORGET))
    (root / "retain.txt").write_text("\n\n".join(RETAIN))
    (root / "nul.txt").write_text("a normal line\n\nand a \x00 byte")
    (root / "bad.jsonl").write_text('{"text": "fine"}\n{not json\n')
    (root / "table.csv").write_text("a,b\n")
    (root / "q.jsonl").write_text("".join(json.dumps(_question(i)) + "\n" for i in range(6)))
    (root / "dup.jsonl").write_text(json.dumps(_question(0, choices=["Paris", "Paris", "Lima", "Rome"])) + "\n")
    (root / "empty_choice.jsonl").write_text(json.dumps(_question(0, choices=["Paris", " ", "Lima"])) + "\n")
    (root / "badanswer.jsonl").write_text(json.dumps(_question(0, answer=7)) + "\n")
    (root / "noanswer.jsonl").write_text(json.dumps({k: v for k, v in _question(0).items() if k != "answer"}) + "\n")
    line = json.dumps(_question(0, answer=0))  # the same line naming 'answer' twice: JSON would keep the last
    (root / "twice.jsonl").write_text(line[:-1] + ', "answer": 2}\n')
    (root / "near_dup.jsonl").write_text(json.dumps(_question(0, choices=["Paris", "Lima", "Paris ", "Rome"])) + "\n")
    (root / "nul.jsonl").write_text(json.dumps(_question(0) | {"question": "Capital\x00 of France?"}) + "\n")
    (root / "sub").mkdir()
    (root / "sub" / "q.jsonl").write_text((root / "q.jsonl").read_text())
    config = dsg.FitConfig(n_features=4, ratio_percentile=80, max_length=64, batch_size=3)
    guard = dsg.fit(model, tok, sae, FORGET, RETAIN, config=config, progress=False)
    guard.save(root / "guard")
    for name, edit in {
        "guard_threshold": lambda m: m | {"threshold": 5},
        "guard_gated_string": lambda m: m | {"gated": "false"},
        "guard_no_model": lambda m: {k: v for k, v in m.items() if k != "model"},
    }.items():
        shutil.copytree(root / "guard", root / name)
        meta = json.loads((root / name / "guardrail.json").read_text())
        (root / name / "guardrail.json").write_text(json.dumps(edit(meta)))
    shutil.copytree(root / "guard", root / "guard_twice")  # a key named twice: json.loads would keep the last
    text = (root / "guard_twice" / "guardrail.json").read_text()
    (root / "guard_twice" / "guardrail.json").write_text('{"threshold": 0.5, ' + text.lstrip()[1:])
    shutil.copytree(root / "guard", root / "guard_bytes")
    tensors = load_file(str(root / "guard_bytes" / "guardrail.safetensors"))
    tensors["W_enc_selected"] = tensors["W_enc_selected"] * 1.01
    save_file(tensors, str(root / "guard_bytes" / "guardrail.safetensors"))
    dsg.Guardrail(sae, features=[1, 2], threshold=0.1).save(root / "guard_unrecorded")  # saved without a model
    topk = dsg.fit(model, tok, tiny_sae(d_in=32, architecture="topk", k=4), FORGET, RETAIN, progress=False,
                   config=dsg.FitConfig(n_features=2, max_length=64, gated=False))  # fmt: skip
    topk.save(root / "guard_topk")
    sae_copy = load_file(str(root / "guard_topk" / "sae" / "sae_weights.safetensors"))
    save_file({k: torch.zeros_like(v) if k == "W_enc" else v for k, v in sae_copy.items()},
              str(root / "guard_topk" / "sae" / "sae_weights.safetensors"))  # fmt: skip
    (root / "keep").mkdir()
    (root / "keep" / "notes.txt").write_text("the user's own file")
    shutil.copytree(root / "guard", root / "guard_plus")
    (root / "guard_plus" / "notes.md").write_text("the user's notes, kept beside the guardrail")
    (root / "tensorboard" / "runs").mkdir(parents=True)
    (root / "tensorboard" / "runs" / "events.out").write_text("not a comparison")
    (root / "link").symlink_to(root / "keep")
    (root / "exported" / "geography").mkdir(parents=True)
    (root / "exported" / "geography" / "mine.txt").write_text("the user's own file")
    shutil.copytree(root / "guard", root / "guard_version")
    meta = json.loads((root / "guard_version" / "guardrail.json").read_text())
    (root / "guard_version" / "guardrail.json").write_text(json.dumps(meta | {"format_version": "x"}))
    (root / "a_file").write_text("not a folder")
    for name, edit in {
        "sae_d_in_text": lambda c: c | {"d_in": "abc"},
        "sae_d_sae_list": lambda c: c | {"d_sae": [64]},
        "sae_metadata_list": lambda c: c | {"metadata": [1]},
        "sae_hook_int": lambda c: c | {"hook_name": 3, "metadata": {"hook_name": 3}},
    }.items():
        shutil.copytree(root / "sae", root / name)
        cfg = json.loads((root / name / "cfg.json").read_text())
        (root / name / "cfg.json").write_text(json.dumps(edit(cfg)))
    (root / "notes.txt").write_text("the user's notes")
    (root / "summary.json").write_text('{"mode": "likelihood", "tasks": {}, "all": {}}')  # an earlier eval summary
    (root / "config.json").write_text('{"model_type": "gpt2"}')  # another tool's JSON object
    (root / "exported_twice" / "geography").mkdir(parents=True)
    (root / "exported_twice" / "geography" / "test_questions.jsonl").write_text("the user's own question file")
    for name, text in {"guard_utf16": b"\xff\xfe{}", "guard_deep": b"[" * 100_000 + b"]" * 100_000}.items():
        shutil.copytree(root / "guard", root / name)
        (root / name / "guardrail.json").write_bytes(text)
    weights = load_file(str(root / "model" / "model.safetensors"))
    early, late = "model.layers.0.mlp.down_proj.weight", "model.layers.1.mlp.down_proj.weight"
    for name, edit in {
        "model_nan": lambda t: t | {early: t[early].index_fill(0, torch.tensor([0]), float("nan"))},
        "model_missing": lambda t: {k: v for k, v in t.items() if k != late},
    }.items():
        shutil.copytree(root / "model", root / name)
        save_file(edit(dict(weights)), str(root / name / "model.safetensors"), metadata={"format": "pt"})
    shutil.copytree(root / "model", root / "model_layers")
    config = json.loads((root / "model_layers" / "config.json").read_text())
    (root / "model_layers" / "config.json").write_text(json.dumps(config | {"num_hidden_layers": 1}))
    (root / "surrogate.jsonl").write_text(json.dumps(_question(0))[:-1] + ', "note": "\\udc80"}\n')
    (root / "long_q.jsonl").write_text(json.dumps(_question(0, question="word " * 3000)) + "\n")
    (root / "loop1.txt").symlink_to(root / "loop2.txt")  # a loop of symbolic links
    (root / "loop2.txt").symlink_to(root / "loop1.txt")
    (root / "deep.jsonl").write_text("[" * 100_000 + "]" * 100_000 + "\n")
    (root / "bigint.jsonl").write_text('{"text": "fine", "n": ' + "9" * 5000 + "}\n")
    (root / "invisible.txt").write_text("\u200b\n\n\ufeff\n\n\u2060 \u200d\n")  # nothing shows in any record
    (root / "letter.jsonl").write_text(json.dumps(_question(0, answer="A")) + "\n")
    os.link(root / "q.jsonl", root / "q_link.jsonl")  # the same file under a second name
    five = _question(1, choices=["Paris", "Lima", "Rome", "Oslo", "Bern"])
    (root / "five.jsonl").write_text(json.dumps(_question(0)) + "\n" + json.dumps(five) + "\n")
    # benign text, then a forget text, each saved with a byte-order mark and joined as `cat a b` joins them
    (root / "calibration_bom.txt").write_text("\ufeffA benign line about gardens.\n\n\ufeff" + FORGET[0] + "\n")
    return root


def snapshot(root: Path) -> dict:
    """Every file (its bytes' hash) and folder under root."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in sorted(root.rglob("*"))
    }


def _cli(ws, args):
    return [a.format(ws=ws) for a in args]


FIT = ["fit", "--model", "{ws}/model", "--sae", "{ws}/sae", "--forget", "{ws}/forget.txt", "--retain",
       "{ws}/retain.txt", "--max-length", "64", "--ratio-percentile", "80"]  # fmt: skip
GEN = ["generate", "--model", "{ws}/model", "--max-new-tokens", "2", "--no-chat"]
EVAL = ["eval", "--model", "{ws}/model"]
TRAIN = ["train-sae", "--model", "{ws}/model", "--text", "{ws}/forget.txt"]


def _fit_forget(forget: str) -> list[str]:
    """FIT with another forget corpus, writing a new guardrail."""
    return FIT[:5] + ["--forget", forget] + FIT[7:] + ["--out", "{ws}/new"]


CLI_CASES = {
    # outputs
    "fit --out the input SAE": (FIT + ["--out", "{ws}/sae"], "would replace the input"),
    "fit --out a folder of user files": (FIT + ["--out", "{ws}/keep"], "does not hold a dsg guardrail"),
    "fit --out an existing guardrail": (FIT + ["--out", "{ws}/guard"], "pass --overwrite"),
    "fit --out an existing file": (FIT + ["--out", "{ws}/a_file"], "exists and is not a directory"),
    "fit --out under /proc": (FIT + ["--out", "/proc/dsg-out"], "Cannot write"),
    "fit --overwrite a folder of user files": (FIT + ["--out", "{ws}/keep", "--overwrite"], "does not hold"),
    "fit --overwrite a guardrail the user added a file to": (
        FIT + ["--out", "{ws}/guard_plus", "--overwrite"],
        "does not hold",
    ),  # fmt: skip
    "fit --out a symbolic link": (FIT + ["--out", "{ws}/link"], "symbolic link"),
    "fit --clamp beyond any use": (FIT + ["--out", "{ws}/new", "--clamp", "1e39"], "up to"),
    "compare --out a folder with someone else's runs/": (
        ["compare", "--out", "{ws}/tensorboard"],
        "does not hold a dsg comparison",
    ),  # fmt: skip
    "eval --out inside a guardrail folder": (
        EVAL + ["--guardrail", "{ws}/guard", "--questions", "{ws}/q.jsonl", "--out", "{ws}/guard/eval.json"],
        "inside the input folder",
    ),  # fmt: skip
    "eval --out inside a guardrail that is not an input": (
        EVAL + ["--questions", "{ws}/q.jsonl", "--out", "{ws}/guard/eval.json"],
        "lies inside .*guard', which dsg wrote as one result",
    ),  # fmt: skip
    "eval of two files, the second's question too long": (
        EVAL + ["--questions", "{ws}/q.jsonl", "{ws}/long_q.jsonl"],
        "long_q.jsonl' question 1 with its longest choice needs",
    ),  # fmt: skip
    "train-sae --out the working folder": (TRAIN + ["--out", "."], "is the working folder or one above it"),
    "fit --out the root folder": (FIT + ["--out", "/"], "is the working folder or one above it"),
    "data export --out a symbolic link": (
        ["data", "export", "--domains", "geography", "--out", "{ws}/link"],
        "is a symbolic link",
    ),  # fmt: skip
    "data export over a folder of user files": (
        ["data", "export", "--domains", "geography", "--out", "{ws}/exported"],
        "does not write",
    ),  # fmt: skip
    "inspect a guardrail with a broken format_version": (["inspect", "{ws}/guard_version"], "format_version"),
    "train-sae --out a folder of user files": (
        TRAIN + ["--hook", "blocks.0.hook_resid_post", "--out", "{ws}/keep"],
        "does not hold",
    ),  # fmt: skip
    "train-sae --out an existing SAE": (
        TRAIN + ["--hook", "blocks.0.hook_resid_post", "--out", "{ws}/sae"],
        "already holds an SAE; pass --overwrite",
    ),  # fmt: skip
    "compare --out a folder of user files": (["compare", "--out", "{ws}/keep"], "does not hold a dsg comparison"),
    "demo --out a folder of user files": (["demo", "--out", "{ws}/keep"], "does not hold a dsg demo"),
    "eval --out a question file": (
        EVAL + ["--questions", "{ws}/q.jsonl", "--out", "{ws}/q.jsonl"],
        "would replace the input",
    ),  # fmt: skip
    "eval --out in a missing folder": (
        EVAL + ["--questions", "{ws}/q.jsonl", "--out", "{ws}/nowhere/x.json"],
        "does not exist",
    ),  # fmt: skip
    "eval --out empty": (EVAL + ["--questions", "{ws}/q.jsonl", "--out", ""], "output path is empty"),
    "fit --out inside a guardrail a user added notes to": (
        FIT + ["--out", "{ws}/guard_plus/sub"],
        "lies inside .*guard_plus', which dsg wrote as one result",
    ),  # fmt: skip
    "data export --domains with a domain twice": (
        ["data", "export", "--domains", "geography,geography", "--out", "{ws}/new"],
        "names 'geography' twice",
    ),  # fmt: skip
    "data export --out a guardrail": (
        ["data", "export", "--domains", "geography", "--out", "{ws}/guard"],
        "holds a result dsg wrote",
    ),  # fmt: skip
    "data export --out inside a guardrail": (
        ["data", "export", "--domains", "geography", "--out", "{ws}/guard/data"],
        "lies inside .*guard', which dsg wrote as one result",
    ),  # fmt: skip
    "eval --out a folder": (EVAL + ["--questions", "{ws}/q.jsonl", "--out", "{ws}/keep"], "is a directory"),
    "eval --out a user's file": (
        EVAL + ["--questions", "{ws}/q.jsonl", "--out", "{ws}/notes.txt", "--overwrite"],
        "does not hold a summary this command wrote",
    ),  # fmt: skip
    "eval --out another tool's JSON": (
        EVAL + ["--questions", "{ws}/q.jsonl", "--out", "{ws}/config.json", "--overwrite"],
        "does not hold a summary this command wrote",
    ),  # fmt: skip
    "eval --out an earlier summary": (
        EVAL + ["--questions", "{ws}/q.jsonl", "--out", "{ws}/summary.json"],
        "already exists; pass --overwrite",
    ),  # fmt: skip
    "data export over an earlier export": (
        ["data", "export", "--domains", "geography", "--out", "{ws}/exported_twice"],
        "pass --overwrite",
    ),  # fmt: skip
    "inspect a guardrail.json that is not UTF-8": (["inspect", "{ws}/guard_utf16"], "Cannot read .* as JSON"),
    "inspect a guardrail.json nested too deep": (["inspect", "{ws}/guard_deep"], "Cannot read .* as JSON"),
    "train-sae --out a guardrail's SAE copy": (
        TRAIN + ["--hook", "blocks.0.hook_resid_post", "--out", "{ws}/guard_topk/sae", "--overwrite"],
        "lies inside",
    ),  # fmt: skip
    # damaged models
    "eval a model whose weights hold NaN": (
        ["eval", "--model", "{ws}/model_nan", "--questions", "{ws}/q.jsonl"],
        "not a finite number",
    ),  # fmt: skip
    "eval a model folder that lacks a tensor": (
        ["eval", "--model", "{ws}/model_missing", "--questions", "{ws}/q.jsonl"],
        "lacks weights its config.json needs",
    ),  # fmt: skip
    "eval a model whose config names fewer layers": (
        ["eval", "--model", "{ws}/model_layers", "--questions", "{ws}/q.jsonl"],
        "holds weights of layers its config.json does not have",
    ),  # fmt: skip
    "fit on a model whose weights hold NaN": (
        ["fit", "--model", "{ws}/model_nan", *FIT[3:], "--out", "{ws}/new"],
        "activations at 'blocks.0.hook_resid_post' hold NaN",
    ),  # fmt: skip
    "fit --sae-hook another point than the SAE records": (
        FIT + ["--sae-hook", "blocks.1.hook_resid_post", "--out", "{ws}/new"],
        "records its hook point 'blocks.0.hook_resid_post'",
    ),  # fmt: skip
    "fit --calibration the forget corpus": (
        FIT + ["--calibration", "{ws}/forget.txt", "--out", "{ws}/new"],
        "calibration texts are also forget texts",
    ),  # fmt: skip
    "fit --forget-questions past the context": (
        FIT
        + [
            "--gate-window",
            "4",
            "--gate-hold",
            "4",
            "--gate-prompt-percentile",
            "100",
            "--forget-questions",
            "{ws}/long_q.jsonl",
            "--out",
            "{ws}/new",
        ],
        "Forget question 0 with its longest choice needs",
    ),  # fmt: skip
    "train-sae --text one file twice": (
        TRAIN + ["--text", "{ws}/forget.txt", "--hook", "blocks.0.hook_resid_post", "--out", "{ws}/new"],
        "given twice",
    ),  # fmt: skip
    "train-sae at a learning rate that diverges": (
        TRAIN + ["--hook", "blocks.0.hook_resid_post", "--lr", "1e9", "--out", "{ws}/new"],
        "diverged",
    ),  # fmt: skip
    # numbers
    "fit --clamp nan": (FIT + ["--out", "{ws}/new", "--clamp", "nan"], "clamp must be a finite number"),
    "fit --clamp inf": (FIT + ["--out", "{ws}/new", "--clamp", "inf"], "clamp must be a finite number"),
    "fit --clamp -5": (FIT + ["--out", "{ws}/new", "--clamp", "-5"], "clamp must be a positive number"),
    "fit --n-features 0": (FIT + ["--out", "{ws}/new", "--n-features", "0"], "n_features must be at least 1"),
    "fit --n-features beyond the SAE": (FIT + ["--out", "{ws}/new", "--n-features", "100000"], "exceeds the SAE"),
    "fit --gate-percentile 150": (FIT + ["--out", "{ws}/new", "--gate-percentile", "150"], "gate_percentile"),
    "fit --scorer unknown": (FIT + ["--out", "{ws}/new", "--scorer", "magic"], "scorer must be one of"),
    "fit --clamp-mode unknown": (FIT + ["--out", "{ws}/new", "--clamp-mode", "some"], "clamp_mode must be one of"),
    "fit --hook beyond the model": (
        FIT + ["--out", "{ws}/new", "--hook", "blocks.9.hook_resid_post"],
        "asks for layer 9",
    ),  # fmt: skip
    # the SAE names its own hook, so another point is refused before the width is read
    "fit --hook on lm_head": (FIT + ["--out", "{ws}/new", "--hook", "lm_head"], "trained at 'blocks.0"),
    "fit --hook at another layer than the SAE's": (
        FIT + ["--out", "{ws}/new", "--hook", "blocks.1.hook_resid_post"],
        "trained at 'blocks.0.hook_resid_post'",
    ),  # fmt: skip
    "fit with forget == retain": (
        [
            "fit",
            "--model",
            "{ws}/model",
            "--sae",
            "{ws}/sae",
            "--forget",
            "{ws}/retain.txt",
            "--retain",
            "{ws}/retain.txt",
            "--out",
            "{ws}/new",
        ],
        "also in the retain corpus",
    ),  # fmt: skip
    # files
    "fit --forget missing": (FIT[:6] + ["{ws}/missing.txt"] + FIT[7:] + ["--out", "{ws}/new"], "does not exist"),
    "fit --forget a folder": (FIT[:6] + ["{ws}/keep"] + FIT[7:] + ["--out", "{ws}/new"], "is a directory"),
    "fit --forget with a NUL byte": (FIT[:6] + ["{ws}/nul.txt"] + FIT[7:] + ["--out", "{ws}/new"], "NUL byte"),
    "fit --forget bad JSONL": (FIT[:6] + ["{ws}/bad.jsonl"] + FIT[7:] + ["--out", "{ws}/new"], "not valid JSON"),
    "fit --forget a .csv": (
        FIT[:6] + ["{ws}/table.csv"] + FIT[7:] + ["--out", "{ws}/new"],
        "must end in .txt or .jsonl",
    ),  # fmt: skip
    "fit --sae missing": (FIT[:4] + ["{ws}/nosae"] + FIT[5:] + ["--out", "{ws}/new"], "does not exist"),
    "fit --sae not an SAE": (FIT[:4] + ["{ws}/keep"] + FIT[5:] + ["--out", "{ws}/new"], "is not an SAE"),
    "fit --model missing": (FIT[:2] + ["{ws}/nomodel"] + FIT[3:] + ["--out", "{ws}/new"], "does not exist"),
    "fit --model not a model": (FIT[:2] + ["{ws}/keep"] + FIT[3:] + ["--out", "{ws}/new"], "not a HuggingFace model"),
    # guardrails
    "a guardrail whose threshold was edited": (GEN + ["--guardrail", "{ws}/guard_threshold", "x"], "content hash"),
    "a guardrail naming a key twice": (
        GEN + ["--guardrail", "{ws}/guard_twice", "x"],
        "names the key 'threshold' twice",
    ),
    "a guardrail whose gated was edited": (GEN + ["--guardrail", "{ws}/guard_gated_string", "x"], "content hash"),
    "a guardrail whose model record was deleted": (
        GEN + ["--guardrail", "{ws}/guard_no_model", "x"],
        "content hash",
    ),  # fmt: skip
    "a guardrail whose encoder was edited": (GEN + ["--guardrail", "{ws}/guard_bytes", "x"], "content hash"),
    "a guardrail without a model record": (
        GEN + ["--guardrail", "{ws}/guard_unrecorded", "x"],
        "no record of the model",
    ),  # fmt: skip
    "a TopK guardrail whose SAE copy was zeroed": (GEN + ["--guardrail", "{ws}/guard_topk", "x"], "was changed"),
    "the same guardrail twice": (
        GEN + ["--guardrail", "{ws}/guard", "--guardrail", "{ws}/guard", "x"],
        "attached twice",
    ),  # fmt: skip
    "a folder that is not a guardrail": (GEN + ["--guardrail", "{ws}/keep", "x"], "is not a guardrail directory"),
    "inspect a missing guardrail": (["inspect", "{ws}/nothing"], "is not a guardrail directory"),
    "inspect --top below zero": (["inspect", "{ws}/guard", "--top", "-3"], "non-negative"),  # listed 57 latents
    "data export --domains empty": (["data", "export", "--domains", "", "--out", "{ws}/new"], "names no data domain"),
    "data list --out": (
        ["data", "list", "--domains", "geography", "--out", "{ws}/new"],
        "options of 'dsg data export'",
    ),
    # generation
    "generate --max-new-tokens 0": (GEN[:4] + ["0", "--no-chat", "x"], "max_new_tokens must be a positive"),
    "generate --max-new-tokens -5": (GEN[:4] + ["-5", "--no-chat", "x"], "max_new_tokens must be a positive"),
    "generate an empty prompt without BOS": (["generate", "--model", "{ws}/model_nobos", "--no-chat", ""], "no tokens"),
    # questions
    "eval duplicate choices": (EVAL + ["--questions", "{ws}/dup.jsonl"], "repeats a choice"),
    "eval an empty choice": (EVAL + ["--questions", "{ws}/empty_choice.jsonl"], "empty choice"),
    "eval an answer out of range": (EVAL + ["--questions", "{ws}/badanswer.jsonl"], "'answer'"),
    "eval a question with no answer": (EVAL + ["--questions", "{ws}/noanswer.jsonl"], "no field 'answer'"),
    "eval a line naming a key twice": (EVAL + ["--questions", "{ws}/twice.jsonl"], "names the key 'answer' twice"),
    "eval choices equal but for spaces": (EVAL + ["--questions", "{ws}/near_dup.jsonl"], "repeats a choice"),
    "eval a question holding NUL": (EVAL + ["--questions", "{ws}/nul.jsonl"], "NUL character"),
    "eval a line escaping half a surrogate pair": (EVAL + ["--questions", "{ws}/surrogate.jsonl"], "surrogate pair"),
    "eval a --prompt-format that writes the answer": (
        EVAL + ["--questions", "{ws}/q.jsonl", "--prompt-format", "{{question}} ({{answer}})"],
        "writes the question's answer",
    ),  # fmt: skip
    "eval a --prompt-format that reaches into a field": (
        EVAL + ["--questions", "{ws}/q.jsonl", "--prompt-format", "{{question.__class__}}"],
        "reaches into a field",
    ),  # fmt: skip
    "eval a broken --prompt-format": (
        EVAL + ["--questions", "{ws}/q.jsonl", "--prompt-format", "{{question"],
        "not a valid format string",
    ),  # fmt: skip
    "eval a --prompt-format with an unknown field": (
        EVAL + ["--questions", "{ws}/q.jsonl", "--prompt-format", "{{subject}}"],
        "refers to",
    ),  # fmt: skip
    # options that the mode would ignore, yet record as used
    "eval --description in likelihood mode": (
        EVAL + ["--questions", "{ws}/q.jsonl", "--description", "About {{nope}}: "],
        "description applies to mode='letter' only",
    ),  # fmt: skip
    "eval --prompt-format in letter mode": (
        EVAL + ["--questions", "{ws}/q.jsonl", "--mode", "letter", "--prompt-format", "Q: {{question}}"],
        "prompt_format applies to mode='likelihood' only",
    ),  # fmt: skip
    "eval --permutations without --base-correct": (
        EVAL + ["--questions", "{ws}/q.jsonl", "--permutations"],
        "needs base_correct",
    ),  # fmt: skip
    **{
        f"fit on an SAE whose cfg.json has {what}": (
            [*FIT[:3], "--sae", f"{{ws}}/{name}", *FIT[5:], "--out", "{ws}/new"],
            "Cannot read the SAE|names its hook point|must be an integer",
        )
        for name, what in (
            ("sae_d_in_text", "d_in as text"),
            ("sae_d_sae_list", "d_sae as a list"),
            ("sae_metadata_list", "metadata as a list"),
            ("sae_hook_int", "a number for a hook"),
        )
    },  # fmt: skip
    "generate from bytes that are not UTF-8": (GEN + ["abc\udcff"], "not valid text"),
    "eval two files with one stem": (EVAL + ["--questions", "{ws}/q.jsonl", "{ws}/sub/q.jsonl"], "distinct names"),
    # options
    "train-sae --k 0": (
        TRAIN + ["--k", "0", "--out", "{ws}/new"],
        "k=0",
    ),  # fmt: skip
    "train-sae with --text and --domains": (
        TRAIN + ["--domains", "nonexistent", "--out", "{ws}/new"],
        "not both",
    ),  # fmt: skip
    "compare a corpus that is a question file": (
        [
            "compare",
            "--model",
            "{ws}/model",
            "--sae",
            "{ws}/sae",
            "--forget-corpus",
            "{ws}/q.jsonl",
            "--retain-corpus",
            "{ws}/retain.txt",
            "--forget-questions",
            "{ws}/q.jsonl",
            "--retain-questions",
            "{ws}/long_q.jsonl",
            "--out",
            "{ws}/new",
        ],
        "is both a corpus and a question file",
    ),  # fmt: skip
    "compare --grid a missing file": (["compare", "--grid", "{ws}/no.json", "--out", "{ws}/new"], "no.json' does not"),
    "compare --grid a folder": (["compare", "--grid", "{ws}/keep", "--out", "{ws}/new"], "is a folder; give a JSON"),
    "compare an unknown method": (["compare", "--methods", "dsg,sgd", "--out", "{ws}/new"], "Unknown method"),
    "compare a forget domain also retained": (
        ["compare", "--forget", "geography", "--retain", "geography,chemistry", "--out", "{ws}/new"],
        "is also --retain",
    ),  # fmt: skip
    "demo a forget domain also the general one": (
        ["demo", "--forget", "cyber", "--general", "cyber", "--out", "{ws}/new"],
        "is also --general",
    ),  # fmt: skip
    "demo a forget domain typed wrong": (["demo", "--forget", "cyb", "--out", "{ws}/new"], "Unknown data domain 'cyb'"),
    "demo a retain domain typed wrong": (
        ["demo", "--retain", "geography,chem", "--out", "{ws}/new"],
        "Unknown data domain 'chem'",
    ),  # fmt: skip
    "demo a model folder that is not there": (
        ["demo", "--model", "{ws}/no/model", "--out", "{ws}/new"],
        "Model folder .* does not exist",
    ),  # fmt: skip
    "demo an SAE folder that is not there": (["demo", "--sae", "{ws}/no_sae", "--out", "{ws}/new"], "does not exist"),
    "demo a model folder without --sae": (["demo", "--model", "{ws}/model", "--out", "{ws}/new"], "No SAE ships"),
    "compare a model folder that is not there": (
        ["compare", "--model", "{ws}/no/model", "--out", "{ws}/new"],
        "Model folder .* does not exist",
    ),  # fmt: skip
    "compare a forget domain typed wrong": (["compare", "--forget", "cyb", "--out", "{ws}/new"], "Unknown data domain"),
    "compare without a retain domain": (["compare", "--retain", ",", "--out", "{ws}/new"], "At least one retain"),
    "fit a corpus that is a loop of links": (
        _fit_forget("{ws}/loop1.txt"),
        "symbolic link that leads nowhere",
    ),
    "train-sae a text that is a loop of links": (
        TRAIN[:3] + ["--text", "{ws}/loop1.txt", "--out", "{ws}/new"],
        "symbolic link that leads nowhere",
    ),
    "eval questions that are a loop of links": (
        EVAL + ["--guardrail", "{ws}/guard", "--questions", "{ws}/loop1.txt", "--out", "{ws}/e.json"],
        "symbolic link that leads nowhere",
    ),
    "fit a JSONL line nested past the parser's stack": (
        _fit_forget("{ws}/deep.jsonl"),
        "line 1 is not valid JSON",
    ),
    "fit a JSONL line with an integer past Python's digits": (
        _fit_forget("{ws}/bigint.jsonl"),
        "line 1 is not valid JSON",
    ),
    "eval questions nested past the parser's stack": (
        EVAL + ["--guardrail", "{ws}/guard", "--questions", "{ws}/deep.jsonl"],
        "line 1 is not valid JSON",
    ),
    "fit a corpus of invisible characters only": (
        _fit_forget("{ws}/invisible.txt"),
        "holds no documents",
    ),
    "fit a question file whose answer is a letter": (
        _fit_forget("{ws}/letter.jsonl"),
        "not a choice's index",
    ),
    "fit calibration joined with a byte-order mark before a forget text": (
        FIT + ["--calibration", "{ws}/calibration_bom.txt", "--out", "{ws}/new"],
        "also forget texts",
    ),
    "eval --out a hard link to its questions": (
        EVAL + ["--questions", "{ws}/q.jsonl", "--out", "{ws}/q_link.jsonl", "--overwrite"],
        "would replace the input",
    ),  # fmt: skip
    "eval --permutations of five choices": (
        EVAL + ["--questions", "{ws}/q.jsonl", "{ws}/five.jsonl", "--base-correct", "--permutations"],
        "five.jsonl' question 2: Checking every ordering of 5 choices",
    ),  # fmt: skip
    "compare a retain domain twice": (
        ["compare", "--retain", "chemistry,chemistry", "--out", "{ws}/new"],
        "names a domain twice",
    ),  # fmt: skip
}


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_cli_bad_input_is_one_sentence_and_touches_nothing(ws, case, capsys):
    args, expected = CLI_CASES[case]
    before = snapshot(ws)
    code = main(_cli(ws, args))
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if ": error: " in line]
    assert len(errors) == 1 and errors[0].startswith(f"dsg {args[0]}: error: "), err
    import re

    assert re.search(expected, errors[0]), errors[0]
    assert errors[0].rstrip().endswith((".", ")", "'")), errors[0]
    assert snapshot(ws) == before  # nothing written, changed or deleted


# ---- the API ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def loaded(ws):
    model, tok = dsg.load_model(ws / "model")
    return model, tok, dsg.SAE.load(ws / "sae")


def _api_cases(ws, model, tok, sae):
    nan = float("nan")
    return {
        "fit on a string corpus": (lambda: dsg.fit(model, tok, sae, "a string", RETAIN), "must be a list of texts"),
        "fit on a list of bytes": (lambda: dsg.fit(model, tok, sae, [b"x"], RETAIN), "must hold strings"),
        "fit with the forget texts twice as retain": (
            lambda: dsg.fit(model, tok, sae, FORGET, FORGET * 2),
            "also in the retain corpus",
        ),  # fmt: skip
        "fit with forget a subset of retain": (
            lambda: dsg.fit(model, tok, sae, FORGET[:2], RETAIN + FORGET),
            "also in the retain corpus",
        ),  # fmt: skip
        "fit with forget as retain, spaced apart": (
            lambda: dsg.fit(model, tok, sae, [f" {t}  " for t in FORGET], FORGET),
            "also in the retain corpus",
        ),  # fmt: skip
        "FitConfig clamp nan": (lambda: dsg.FitConfig(clamp=nan), "clamp must be a finite number"),
        "FitConfig clamp past float": (lambda: dsg.FitConfig(clamp=10**400), "clamp must be a finite number"),
        "FitConfig n_features as text": (lambda: dsg.FitConfig(n_features="5"), "n_features must be an integer"),
        "FitConfig gated as text": (lambda: dsg.FitConfig(gated="false"), "gated must be true or false"),
        "Guardrail threshold 5": (lambda: dsg.Guardrail(sae, features=[1], threshold=5), "'threshold'"),
        "Guardrail clamp nan": (lambda: dsg.Guardrail(sae, features=[1], clamp=nan), "'clamp'"),
        "Guardrail gated as text": (lambda: dsg.Guardrail(sae, features=[1], gated="false"), "'gated'"),
        "Guardrail hold past any context": (
            lambda: dsg.Guardrail(sae, features=[1], threshold=0.1, window=4, hold=10**13),
            "'hold' must be a positive integer up to",
        ),  # a hold near rule.NEVER reads as always open, one past int64 overflows
        "FitConfig gate_hold past any context": (
            lambda: dsg.FitConfig(gate_window=4, gate_hold=2**63),
            "gate_hold must be a positive number of tokens up to",
        ),
        "load a tampered guardrail": (lambda: dsg.Guardrail.load(ws / "guard_threshold"), "content hash"),
        "attach one guardrail twice": (
            lambda: dsg.attach(model, *[dsg.Guardrail.load(ws / "guard")] * 2).__enter__(),
            "attached twice",
        ),
        "an SAE with NaN weights": (
            lambda: dsg.SAE(torch.full((4, 8), nan), torch.zeros(8, 4), torch.zeros(8), torch.zeros(4)),
            "NaN",
        ),  # fmt: skip
        "score duplicate choices": (lambda: score_mcq(model, tok, [_question(0, choices=["a", "a"])]), "repeats"),
        "generate zero tokens": (lambda: generate(model, tok, ["x"], max_new_tokens=0), "max_new_tokens"),
        "generate from one string": (lambda: generate(model, tok, "x"), "list of strings"),
        "generate past the model's context": (lambda: generate(model, tok, ["word " * 3000]), "takes at most 2048"),
        "score past the model's context": (
            lambda: score_mcq(model, tok, [_question(0) | {"question": "word " * 3000}]),
            "takes at most 2048",
        ),  # fmt: skip
        "generate text with unpaired surrogates": (lambda: generate(model, tok, ["abc\udcff"]), "not valid text"),
        "fit on a text with an unpaired surrogate": (
            lambda: dsg.fit(model, tok, sae, ["abc\udc80 def"] + FORGET, RETAIN),
            "unpaired surrogate",
        ),  # fmt: skip
        "a guarded forward with a mask narrower than its inputs": (
            lambda: _guarded_forward(ws, model, tok, columns=-2),
            "attention mask has 3 columns for 5 new tokens",
        ),  # the model alone runs; the gate could not read its tokens
        "a guarded forward with a mask wider than its inputs": (
            lambda: _guarded_forward(ws, model, tok, columns=1),
            "attention mask has 6 columns for 5 new tokens",
        ),  # the model alone reads its first columns, the gate its last: judged on other tokens
        "fit a clamp float16 cannot hold": (
            lambda: dsg.fit(
                *dsg.load_model(ws / "model", dtype=torch.float16),
                sae,
                FORGET,
                RETAIN,
                progress=False,
                config=dsg.FitConfig(n_features=4, ratio_percentile=80, clamp=1e6),
            ),
            "more than the model's float16 holds",
        ),  # fmt: skip  # the guarded activations would be inf: an empty answer that reads like forgetting
        "attach a clamp float16 cannot hold": (
            lambda: dsg.attach(
                dsg.load_model(ws / "model", dtype=torch.float16)[0],
                dsg.Guardrail(sae, features=[1, 2], clamp=1e6),
                verify=False,
            ).__enter__(),
            "more than the model's float16 holds",
        ),  # fmt: skip
        "a guarded continuation with a mask wider than its cache and inputs": (
            lambda: _guarded_forward(ws, model, tok, columns=1, cached=True),
            "attention mask has 9 columns for 5 cached and 3 new tokens",
        ),  # the model reads its first 8 columns, the gate would take the last new token for padding
        "attach a clamp a float16 SAE cannot hold": (
            lambda: dsg.attach(
                model, dsg.Guardrail(dsg.SAE.load(ws / "sae", dtype=torch.float16), features=[1, 2], clamp=7e4)
            ).__enter__(),
            "more than the guardrail's float16 holds",
        ),  # its coefficients, -clamp - f, are computed in the SAE's dtype
        "fit with a name holding a line break": (
            lambda: dsg.fit(model, tok, sae, FORGET, RETAIN, name="cyber\nthreshold 0.0", progress=False),
            "'name' must be one line",
        ),  # dsg inspect and the audit log print it: it could pass for a line dsg wrote
        "save a guardrail whose name holds a terminal escape": (
            lambda: dsg.Guardrail(sae, features=[1], name="g\x1b[2J").save(ws / "never_written"),
            "'name' must be one line",
        ),  # fmt: skip
        "load a guardrail's guardrail.json for its folder": (
            lambda: dsg.Guardrail.load(ws / "guard" / "guardrail.json"),
            "give the folder that holds it",
        ),  # fmt: skip
    }


API_NAMES = list(_api_cases(None, None, None, None))


def _guarded_forward(ws, model, tok, columns: int, cached: bool = False):
    ids = torch.tensor([tok(FORGET[0])["input_ids"][:5]])
    with torch.no_grad(), dsg.attach(model, dsg.Guardrail.load(ws / "guard")):
        if not cached:
            model(input_ids=ids, attention_mask=torch.ones(1, 5 + columns, dtype=torch.long))
            return
        cache = model(input_ids=ids, attention_mask=torch.ones(1, 5, dtype=torch.long), use_cache=True).past_key_values
        more = torch.tensor([tok(FORGET[1])["input_ids"][1:4]])
        model(input_ids=more, attention_mask=torch.ones(1, 8 + columns, dtype=torch.long), past_key_values=cache)


@pytest.mark.parametrize("case", API_NAMES)
def test_api_bad_input_raises_one_clear_sentence(ws, loaded, case):
    model, tok, sae = loaded
    call, expected = _api_cases(ws, model, tok, sae)[case]
    before = snapshot(ws)
    with pytest.raises(dsg.DSGError, match=expected) as info:
        call()
    message = str(info.value)
    assert "\n" not in message and not math.isnan(len(message))
    assert snapshot(ws) == before


def test_the_suite_is_large_enough():
    assert len(CLI_CASES) + len(API_NAMES) >= 40


@pytest.mark.parametrize("command", ["demo", "compare", "fit", "eval", "generate", "serve", "inspect", "train-sae",
                                     "data"])  # fmt: skip
def test_every_help_text_prints_as_written(command, capsys):
    """argparse %-formats help: a docstring's "99 % rule" must print as written, not as a dump of the option."""
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "option_strings" not in out and "%(" not in out
    if command == "compare":
        assert "the 99 % rule" in " ".join(out.split())


def test_a_full_disk_is_one_line_not_a_traceback(ws, capsys, monkeypatch):
    """The machine failing under a command (here: no space left while the guardrail is saved) gets one line naming
    the cause and the path, exit status 1, and no output folder."""
    import errno

    def full(self, path, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(dsg.Guardrail, "save", full)
    code = main(_cli(ws, FIT + ["--out", "{ws}/full"]))
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err, err
    lines = [line for line in err.splitlines() if ": error: " in line]
    assert len(lines) == 1 and "No space left on device" in lines[0] and "full" in lines[0], err
    assert not (ws / "full").exists()


def test_generate_runs_its_forwards_in_inference_mode(loaded):
    """generate() is an inference entry point: no forward it makes builds an autograd graph."""
    model, tok, _ = loaded
    modes = []
    hook = model.register_forward_pre_hook(lambda *_: modes.append(torch.is_inference_mode_enabled()))
    try:
        generate(model, tok, ["hello"], max_new_tokens=2, chat=False)
    finally:
        hook.remove()
    assert modes and all(modes)


def test_generate_in_chat_mode_without_a_template_encodes_the_prompt_as_written(ws, tmp_path, capsys):
    """`--chat` (the default) on a model without a chat template uses the prompt as written, with the tokenizer's
    BOS, exactly as --no-chat does, and says so; it used to drop the BOS and generate something else."""
    model, tok = dsg.load_model(ws / "model")
    tok.chat_template = None
    model.save_pretrained(tmp_path / "plain")
    tok.save_pretrained(tmp_path / "plain")
    assert tok.bos_token_id is not None
    prompts = ["The exploit injects a payload", "Paris is the capital"]
    chat = generate(model, tok, prompts, max_new_tokens=6, chat=True)
    plain = generate(model, tok, prompts, max_new_tokens=6, chat=False)
    assert [r["completion"] for r in chat] == [r["completion"] for r in plain]
    assert main(["generate", "--model", str(tmp_path / "plain"), "--max-new-tokens", "2", "hello"]) == 0
    assert "no chat template" in capsys.readouterr().err


def test_an_interrupt_closes_the_progress_bars_before_saying_so(monkeypatch, capsys):
    """Ctrl-C mid-run: the message starts a line of its own instead of landing on a progress bar's."""
    from tqdm.auto import tqdm

    from dsg import cli

    def interrupted(args):
        bar = tqdm(total=10, desc="train SAE")
        bar.update(3)
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "cmd_data", interrupted)
    assert main(["data", "list"]) == 130
    err = capsys.readouterr().err
    assert "\ndsg data: interrupted\n" in err and not list(getattr(tqdm, "_instances", ()))


def test_ctrl_c_while_the_command_line_loads_is_one_line_and_status_130(monkeypatch, capsys):
    """The `dsg` entry point imports nothing heavy before it can catch a Ctrl-C: torch and transformers load
    inside it (seconds), and an interrupt then used to print their import traceback."""
    import importlib.abc
    import subprocess
    import sys

    from dsg import entry

    code = "import sys, dsg.entry; print(sorted({'torch', 'transformers', 'dsg.cli'} & set(sys.modules)))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "[]"

    class Interrupt(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name == "dsg.cli":
                raise KeyboardInterrupt
            return None

    monkeypatch.delitem(sys.modules, "dsg.cli")
    monkeypatch.setattr(sys, "meta_path", [Interrupt(), *sys.meta_path])
    assert entry.main() == 130
    assert capsys.readouterr().err == "dsg: interrupted\n"


def test_dsg_public_names_and_submodules_load_on_first_use():
    import subprocess
    import sys

    code = (
        "import os, sys, types, dsg; "
        "assert os.environ['HF_HUB_OFFLINE'] == '1' and 'transformers' not in sys.modules; "
        "missing = [n for n in dsg.__all__ if getattr(dsg, n, None) is None]; "
        "assert not missing, missing; "
        "assert isinstance(dsg.guard, types.ModuleType) and dsg.sae.SAE is dsg.SAE; "
        "assert not hasattr(dsg, 'no_such_name'); print('ok')"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={"PATH": "/usr/bin"})
    assert run.stdout.strip() == "ok", run.stderr[-2000:]


def test_a_tilde_in_out_names_one_place_for_the_checks_and_the_write(ws, tmp_path, monkeypatch, capsys):
    """`--out=~/r.json` reaches dsg unexpanded (the shell expands only a word that starts with ~): the check and
    the write both read it as the home folder's, so a second run without --overwrite is refused."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    monkeypatch.chdir(tmp_path)
    args = _cli(ws, EVAL + ["--questions", "{ws}/q.jsonl"]) + ["--out=~/r.json"]
    assert main(args) == 0
    assert json.loads((tmp_path / "home" / "r.json").read_text())["mode"] == "likelihood"
    assert not (tmp_path / "~").exists()
    capsys.readouterr()
    assert main(args) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err


def test_ctrl_c_while_the_argument_parser_is_built_is_one_line_and_status_130(monkeypatch, capsys):
    from dsg import cli, entry

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "build_parser", interrupted)
    assert entry.main() == 130
    assert capsys.readouterr().err == "dsg: interrupted\n"


def test_generate_fills_the_context_exactly(ws):
    """The last new token is generated, never read: a prompt as long as the context takes one new token."""
    model, tok = dsg.load_model(ws / "model_nobos")  # learned positions: 256
    prompt = ""
    while len(tok(prompt)["input_ids"]) < 256:
        prompt += " abc"
    while len(tok(prompt)["input_ids"]) > 256:
        prompt = prompt[:-1]
    assert len(tok(prompt)["input_ids"]) == 256
    assert len(generate(model, tok, [prompt], max_new_tokens=1, chat=False)[0]["completion"]) >= 0
    with pytest.raises(dsg.DSGError, match="needs 257 positions, but the model takes at most 256"):
        generate(model, tok, [prompt], max_new_tokens=2, chat=False)


def test_a_reader_that_goes_away_ends_the_command_quietly(ws):
    """`dsg inspect G | head -1`: once the reader has closed the pipe, dsg stops with SIGPIPE's status and writes
    no error (a broken pipe is not a fault of the command or its input)."""
    import signal
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "dsg", "inspect", str(ws / "guard"), "--top", "40"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    proc.stdout.close()  # before dsg has written anything (its imports take seconds)
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 128 + signal.SIGPIPE, err
    assert err == "", err


def test_demo_help_tells_its_own_defaults():
    """`dsg demo --help` shows the demo's settings as defaults; the field docstrings' "Default: ..." sentences,
    which tell `dsg fit`'s defaults, are left out where the demo's differ (and kept for `dsg fit`)."""
    import contextlib
    import io

    from dsg.cli import build_parser

    def help_of(command):
        out = io.StringIO()
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
            build_parser().parse_args([command, "--help"])
        return " ".join(out.getvalue().split())

    demo, fit = help_of("demo"), help_of("fit")
    assert "Default: latch. (default: 32)" not in demo and "or opens during the answer. (default: 32)" in demo
    assert "Default: latch. (default: None)" in fit
    assert "Default 0: the percentile's value. (default: 0.25)" not in demo
    assert "computing" in help_of("--help").split("demo", 2)[2][:200]


@pytest.mark.parametrize("command", ["demo", "compare"])
def test_a_misnamed_domain_is_refused_before_the_model_loads(ws, command, monkeypatch, capsys):
    """A typo in a domain name is refused at once, not after the model (and for compare the SAE) has loaded."""
    import dsg.bench.demo
    import dsg.bench.setting

    def loading(*a, **k):
        raise AssertionError("the model was loaded before the domain names were checked")

    monkeypatch.setattr(dsg.bench.demo, "load_model", loading)
    monkeypatch.setattr(dsg.bench.setting, "load_model", loading)
    assert main([command, "--retain", "geography,chem", "--out", str(ws / "new")]) == 2
    assert "Unknown data domain 'chem'" in capsys.readouterr().err


def test_a_reader_of_errors_that_goes_away_ends_the_command_quietly(ws, tmp_path):
    """`dsg fit ... 2>&1 | head -c 1`: a broken pipe met while the model loads is not reported as a model that
    cannot be loaded (it was wrapped as one, and its report then failed on the same pipe with a traceback)."""
    import signal
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "dsg", *_cli(ws, FIT), "--out", str(tmp_path / "g")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    proc.stdout.close()
    assert proc.wait(timeout=300) == 128 + signal.SIGPIPE
