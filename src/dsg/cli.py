"""The `dsg` command line: argument parsing only; each command calls one library function.

    dsg demo | compare | fit | eval | generate | inspect | train-sae | data

A wrong file, field or value prints one sentence and exits with status 2; outputs are written atomically, so a
failed command leaves no partial directory behind. Ctrl-C (status 130), SIGTERM (143: `kill`, a job scheduler,
torchrun stopping its workers) and SIGHUP (129: the terminal closed) unwind the same way, removing the staging
folder of a write in progress.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import signal
import sys
import threading
from pathlib import Path

from tqdm.auto import tqdm

from . import __version__
from .bench.demo import DEMO_FIT, DemoConfig, main_demo
from .bench.report import print_table
from .bench.sweep import CompareConfig, run_compare
from .config import add_arguments, from_args
from .data import available_domains, export, load_domain
from .errors import DSGError
from .eval.files import evaluate_files
from .eval.mcq import check_questions_fit, read_questions
from .eval.prompt_level import describe as describe_prompt_level
from .eval.prompt_level import settle_prompt_level
from .files import check_output_dir, check_output_file, given_twice, write_text_atomic
from .guard.fit import FitConfig, fit
from .guard.guardrail import Guardrail, dtype_for
from .guard.inspect import describe
from .lm.fingerprint import tokenizer_digest, weights_digest
from .lm.models import DTYPES, KNOWN_MODELS, load_model
from .lm.text import corpus_sha256, read_corpus
from .parallel import agree, init_from_env, launched, leave_together, sharded, shutdown
from .runtime.generation import generate
from .sae import SAE
from .sae.train import TrainConfig, save_trained_sae, train_sae
from .tables import printable

EXIT_USAGE = 2


DTYPE_HELP = ("The model's weights dtype (default: the dtype the guardrails' model was fitted in, float32 when they "
              "record none; a model cast after the fit is not the fitted one).")  # fmt: skip


def _model(args, guards=()):
    """The model and tokenizer, in --dtype, or else in the dtype the guardrails were fitted in."""
    given = getattr(args, "dtype", None)
    return load_model(args.model, dtype=DTYPES[given] if given else dtype_for(guards))


def _guardrails(paths, verify: bool):
    return [Guardrail.load(p, allow_missing_model=not verify) for p in paths]


def _checked(guards, model, verify: bool):
    if verify:
        for g in guards:
            g.check_model(model)
    return guards


# ---- fit ------------------------------------------------------------------------------------------------------


OVERWRITE_HELP = "Replace the output folder if it already holds what this command writes (never anything else)."


FEW_CALIBRATION_SEQUENCES = 20  # fewer, and the gate's percentile is a handful of texts' largest value


def model_input(name: str) -> str | None:
    """--model as an input the output must not replace: a folder, never an embedded model's name (read from the
    package, not from a folder of that name)."""
    return None if str(name).strip().lower() in KNOWN_MODELS else name


def cmd_fit(args) -> int:
    config = from_args(FitConfig, args)
    inputs = (args.sae, args.forget, args.retain, args.calibration, args.forget_questions, model_input(args.model))
    check_output_dir(args.out, "guardrail", overwrite=args.overwrite, inputs=inputs)
    forget, retain = read_corpus(args.forget), read_corpus(args.retain)
    calibration = read_corpus(args.calibration) if args.calibration else None
    if args.forget_questions and (config.gate_prompt_percentile is None or not config.gated):
        raise DSGError("--forget-questions settles a prompt level; pass --gate-prompt-percentile (with a gate) too.")
    held_out = read_questions(args.forget_questions) if args.forget_questions else None
    sae = SAE.load(args.sae, hook_name=args.sae_hook)
    model, tokenizer = _model(args)
    if held_out:  # refused now, not after the fit's passes
        check_questions_fit(model, tokenizer, held_out, "Forget question")
    if launched():  # every process must fold its share from the same inputs
        texts = {"forget corpus": forget, "retain corpus": retain, "calibration corpus": calibration}
        agree({"arguments": {k: v for k, v in sorted(vars(args).items()) if k != "func"},
               "model": weights_digest(model), "tokenizer": tokenizer_digest(tokenizer), "SAE": sae.sha256(),
               **{k: corpus_sha256(v) if v is not None else None for k, v in texts.items()},
               "forget questions": json.dumps(held_out, sort_keys=True) if held_out else None})  # fmt: skip
    with sharded() as world:  # under torchrun: each process runs its share of the batches
        guard = fit(model, tokenizer, sae, forget, retain, calibration, config, name=args.name,
                    progress=world.main)  # fmt: skip
    # the first process's own work from here (the prompt level's check, the write) can outlast the group's timeout
    if leave_together() and not world.main:
        return 0
    check = settle_prompt_level(model, tokenizer, guard, held_out, progress=True) if held_out else None
    guard.save(args.out)
    print(f"Fitted {guard!r}" + (f" on {world.size} processes" if world.size > 1 else ""))
    calibrated_on = guard.info.get("data", {}).get("calibration", {}).get("sequences")
    if guard.gated and isinstance(calibrated_on, int) and calibrated_on < FEW_CALIBRATION_SEQUENCES:
        print(f"dsg fit: the gate's threshold is a percentile of only {calibrated_on} calibration sequence(s); "
              "give more benign text (--calibration, or a larger retain corpus) for a threshold that holds on "
              "text it has not seen.", file=sys.stderr)  # fmt: skip
    if len(guard.features) < config.n_features:
        print(f"dsg fit: only {len(guard.features)} latents fire on the forget corpus and pass the selection "
              f"filters; the guardrail clamps those, not {config.n_features}.", file=sys.stderr)  # fmt: skip
    if check:
        print(describe_prompt_level(check))
    elif config.gate_prompt_percentile is not None:
        print("The prompt level was not checked on held-out forget questions (--forget-questions): with a weak "
              "detector it can leave forget questions unclamped and forget less.", file=sys.stderr)  # fmt: skip
    print(f"Wrote {args.out}")
    return 0


def add_fit(sub) -> None:
    p = sub.add_parser(
        "fit",
        help="Fit a guardrail from a forget corpus and a retain corpus.",
        description="Select the SAE latents of a forget domain and calibrate the gate.",
    )
    p.add_argument("--model", required=True, help="HF model folder, or an embedded name such as smollm2-135m.")
    p.add_argument("--sae", required=True, help="SAE folder (SAELens or sparsify) or Gemma Scope params.npz.")
    p.add_argument(
        "--sae-hook",
        default=None,
        help="Hook point for SAE files that do not record one (params.npz); an SAE that records another is refused.",
    )
    p.add_argument("--forget", required=True, help="Forget corpus: .txt (blank-line-separated) or .jsonl with 'text'.")
    p.add_argument("--retain", required=True, help="Retain corpus, same formats.")
    p.add_argument("--calibration", default=None, help="Texts to calibrate the gate on (default: the retain corpus).")
    p.add_argument("--forget-questions", default=None,
                   help="Held-out forget-domain questions, never fitted on (.jsonl with question, choices, answer): "
                   "a prompt level (--gate-prompt-percentile) is kept only if, of those the base model answers "
                   "correctly, the guarded model keeps at most 3 points more with it than without it.")  # fmt: skip
    p.add_argument("--out", required=True, help="Output guardrail directory.")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    p.add_argument("--name", default=None, help="A name for this guardrail (e.g. the unlearning request).")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                   help="The model's weights dtype; the guardrail records it, and dsg eval, generate and serve load "
                   "the model in it.")  # fmt: skip
    add_arguments(p, FitConfig)
    p.set_defaults(func=cmd_fit)


# ---- generate -------------------------------------------------------------------------------------------------


def cmd_generate(args) -> int:
    guards = _guardrails(args.guardrail, verify=not args.allow_model_mismatch)
    model, tokenizer = _model(args, guards)
    _checked(guards, model, verify=not args.allow_model_mismatch)
    if args.chat and not getattr(tokenizer, "chat_template", None):
        print("dsg generate: the model has no chat template; prompts are used as written (--no-chat).", file=sys.stderr)
    rows = generate(
        model, tokenizer, args.prompt, guards, max_new_tokens=args.max_new_tokens, chat=args.chat, verify=False
    )
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for row in rows:
        gate = "" if row["gated"] is None else (" [guarded]" if row["gated"] else " [not guarded]")
        print(f"> {row['prompt']}{gate}\n{row['completion']}\n")
    return 0


def add_generate(sub) -> None:
    p = sub.add_parser("generate", help="Generate text with guardrails attached.")
    p.add_argument("--model", required=True, help="HF model folder, or an embedded name such as smollm2-135m.")
    p.add_argument("--guardrail", action="append", default=[], help="Guardrail directory (repeat for several).")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument(
        "--chat",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Wrap each prompt in the tokenizer's chat template (a model without one gets the prompt as written).",
    )
    p.add_argument(
        "--allow-model-mismatch",
        action="store_true",
        help="Apply guardrails fitted on different weights (e.g. to test a fine-tuning attack).",
    )
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help=DTYPE_HELP)
    p.add_argument("--json", action="store_true", help="Print JSON instead of text.")
    p.add_argument("prompt", nargs="+")
    p.set_defaults(func=cmd_generate)


# ---- inspect --------------------------------------------------------------------------------------------------


def cmd_inspect(args) -> int:
    print(describe(args.guardrail, top=args.top))
    return 0


def add_inspect(sub) -> None:
    p = sub.add_parser("inspect", help="Show a guardrail: features, threshold, scores, firing rates.")
    p.add_argument("guardrail", help="Guardrail directory.")
    p.add_argument(
        "--top", type=int, default=None, help="Also list this many top-scoring latents that were not selected."
    )
    p.set_defaults(func=cmd_inspect)


# ---- eval -----------------------------------------------------------------------------------------------------


def cmd_eval(args) -> int:
    if args.out is not None:  # an empty --out is refused, not taken for no --out
        inputs = [*args.questions, *args.guardrail, model_input(args.model)]
        check_output_file(args.out, inputs=inputs, overwrite=args.overwrite,
                          keys=("mode", "tasks", "all"))  # what evaluate_files returns  # fmt: skip
    guards = _guardrails(args.guardrail, verify=not args.allow_model_mismatch)
    model, tokenizer = _model(args, guards)
    _checked(guards, model, verify=not args.allow_model_mismatch)
    summary = evaluate_files(
        model,
        tokenizer,
        args.questions,
        intervention=guards,
        mode=args.mode,
        base_correct=args.base_correct,
        permutations=args.permutations,
        chat=args.chat,
        prompt_format=args.prompt_format,
        description=args.description,
        batch_size=args.batch_size,
        verify=False,
        details=args.details,
    )
    text = json.dumps(summary, indent=2)
    if args.out is not None:
        write_text_atomic(args.out, text + "\n")
    print(text)
    return 0


def add_eval(sub) -> None:
    p = sub.add_parser("eval", help="Score multiple-choice question files, with or without guardrails.")
    p.add_argument("--model", required=True, help="HF model folder, or an embedded name such as smollm2-135m.")
    p.add_argument("--guardrail", action="append", default=[], help="Guardrail directory (repeat for several).")
    p.add_argument("--questions", nargs="+", required=True, help="WMDP/MMLU-shaped JSONL files; task name = file stem.")
    p.add_argument(
        "--mode",
        choices=["likelihood", "letter"],
        default="likelihood",
        help="likelihood: log-prob of each choice's text; letter: lm-eval's ' A'..' D' convention.",
    )
    p.add_argument("--prompt-format", default="{question}", help="likelihood mode: the prompt built from a question.")
    p.add_argument("--description", default="", help="letter mode: text before each question.")
    p.add_argument("--chat", action="store_true", help="letter mode: the SAEBench/DSG chat-template prompt.")
    p.add_argument(
        "--base-correct", action="store_true", help="Also report accuracy on the base model's correct subset."
    )
    p.add_argument("--permutations", action="store_true", help="Base-correct means correct under all 24 choice orders.")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--details", action="store_true", help="Include every question's result.")
    p.add_argument("--allow-model-mismatch", action="store_true")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help=DTYPE_HELP)
    p.add_argument("--out", default=None, help="Also write the JSON summary here.")
    p.add_argument("--overwrite", action="store_true",
                   help="Replace the --out file if it holds an earlier dsg eval summary.")  # fmt: skip
    p.set_defaults(func=cmd_eval)


# ---- train-sae ------------------------------------------------------------------------------------------------


def _domain_names(value: str | None) -> list[str] | None:
    """The data domains a --domains value names (None when the option was not given)."""
    if value is None:
        return None
    names = [n.strip() for n in value.split(",") if n.strip()]
    if not names:
        raise DSGError("--domains names no data domain; leave it out for the default.")
    twice = next((n for i, n in enumerate(names) if n in names[:i]), None)
    if twice is not None:  # train-sae would read its texts twice as often, as with a --text file given twice
        raise DSGError(f"--domains names {twice!r} twice.")
    return names


TRAIN_DOMAINS = "cyber,hpo,geography,chemistry,general"  # `dsg train-sae` without --text or --domains


def cmd_train_sae(args) -> int:
    config = from_args(TrainConfig, args)
    check_output_dir(args.out, "SAE", overwrite=args.overwrite, inputs=[*args.text, model_input(args.model)])
    if args.text and args.domains is not None:
        raise DSGError("Give the training text as --text files or as --domains, not both.")
    if args.text:
        twice = given_twice(args.text)
        if twice is not None:
            raise DSGError(f"--text {twice!r} is given twice; the SAE would train on its texts twice as often.")
        texts = [t for path in args.text for t in read_corpus(path)]
        sources = [f"file:{Path(p).name}" for p in args.text]
    else:
        names = _domain_names(args.domains) or _domain_names(TRAIN_DOMAINS)
        texts = [t for name in names for t in load_domain(name).texts["fit"]]
        sources = [f"domain:{n} (fit)" for n in names]
    model, tokenizer = _model(args)
    sae, metrics = train_sae(model, tokenizer, texts, config)
    save_trained_sae(args.out, sae, metrics, model, sources=sources)
    shown = {k: metrics.get(k) for k in ("fvu", "l0", "dead_fraction", "ce_loss_recovered", "train_tokens")}
    print(json.dumps(shown, indent=2))
    print(f"Wrote {args.out}")
    fvu, start = metrics.get("fvu"), metrics.get("fvu_at_init")
    if isinstance(fvu, float) and isinstance(start, float) and not fvu < start:
        print(f"dsg train-sae: warning: the SAE reconstructs held-out activations no better than at initialisation "
              f"(FVU {fvu:.3f}, {start:.3f} at the start, after {metrics.get('steps')} steps): train on more tokens "
              "(--n-tokens) before fitting a guardrail on it.", file=sys.stderr)  # fmt: skip
    return 0


def add_train_sae(sub) -> None:
    p = sub.add_parser("train-sae", help="Train a TopK (or ReLU+L1) SAE on one hook of a model; SAELens format.")
    p.add_argument("--model", required=True, help="HF model folder, or an embedded name such as smollm2-135m.")
    p.add_argument("--text", action="append", default=[], help="Training corpus file (.txt/.jsonl); repeatable.")
    p.add_argument(
        "--domains",
        default=None,
        help=f"Instead of --text: train on the 'fit' texts of these embedded data domains (default: {TRAIN_DOMAINS}).",
    )
    p.add_argument("--out", required=True, help="Output SAE folder (cfg.json, sae_weights.safetensors, training.json).")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    add_arguments(p, TrainConfig)
    p.set_defaults(func=cmd_train_sae)


# ---- data -----------------------------------------------------------------------------------------------------


def cmd_data(args) -> int:
    names = _domain_names(args.domains)
    if args.action == "list":
        if args.out is not None or args.overwrite:
            raise DSGError("'dsg data list' prints the packs; --out and --overwrite are options of 'dsg data export'.")
        for name in names or available_domains():
            d = load_domain(name)
            sizes = ", ".join(f"{k} {len(v)}" for k, v in {**d.texts, **d.questions}.items())
            print(f"{name:<10} {d.role:<7} {d.description} ({sizes})")
        return 0
    out = args.out if args.out is not None else "dsg-data"
    paths = export(names or available_domains(), out, overwrite=args.overwrite)
    print(f"Wrote {len(paths)} files under {out}")
    return 0


def add_data(sub) -> None:
    p = sub.add_parser("data", help="The embedded data packs: list them, or export them as JSONL files.")
    p.add_argument("action", choices=["list", "export"])
    p.add_argument("--domains", default=None, help="Comma-separated domains (default: all available).")
    p.add_argument("--out", default=None, help="export: output folder (default: dsg-data).")
    p.add_argument("--overwrite", action="store_true", help="export: replace domain folders an earlier export wrote.")
    p.set_defaults(func=cmd_data)


# ---- demo -----------------------------------------------------------------------------------------------------


def cmd_demo(args) -> int:
    return main_demo(from_args(DemoConfig, args), from_args(DEMO_FIT, args))


def add_demo(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="Forget offensive cyber security in SmolLM2-135M while keeping neighbouring computing, geography and "
        "chemistry.",
        description="The whole pipeline on the embedded default: model, data, SAE, fit, evaluate, report.",
    )
    add_arguments(p, DemoConfig)
    add_arguments(p, DEMO_FIT)
    p.set_defaults(func=cmd_demo)


# ---- serve ----------------------------------------------------------------------------------------------------


def cmd_serve(args) -> int:
    from .runtime.serve import check_vllm, serve_command

    check_vllm()
    if args.guardrail and not args.allow_model_mismatch:
        # the weights are checked in the dtype the guardrails were fitted in; vLLM then runs them in --dtype (a
        # guardrail fitted in float32 serves in bfloat16 as the same weights read at lower precision)
        guards = _guardrails(args.guardrail, verify=True)
        model, _ = load_model(args.model, dtype=dtype_for(guards))
        _checked(guards, model, verify=True)
        del model
    extra = args.vllm_args[1:] if args.vllm_args[:1] == ["--"] else args.vllm_args
    argv, env = serve_command(args.model, args.guardrail, host=args.host, port=args.port, audit_log=args.audit_log,
                              max_model_len=args.max_model_len, kv_cache_gib=args.kv_cache_gib,
                              prefix_caching=args.prefix_caching, dtype=args.dtype, extra=extra)  # fmt: skip
    print(f"dsg serve: {args.model} with {len(args.guardrail)} guardrail(s) on http://{args.host}:{args.port}/v1",
          file=sys.stderr, flush=True)  # fmt: skip
    os.execvpe(argv[0], argv, env)  # vLLM's server takes this process over (signals reach it directly)
    return 0  # pragma: no cover


def add_serve(sub) -> None:
    p = sub.add_parser(
        "serve",
        help="Serve a guarded model with vLLM's OpenAI-compatible server (needs scripts/install-vllm.sh).",
        description="Start vLLM's OpenAI-compatible server with guardrails inside its engine: each request is "
        "gated on its own, responses carry x-dsg-gated / x-dsg-rho headers, and every decision is appended to the "
        "audit log. Arguments after -- go to vLLM.",
    )
    p.add_argument("--model", default="smollm2-135m", help="Embedded model name or HF model folder.")
    p.add_argument("--guardrail", action="append", default=[], help="Guardrail directory (repeatable; none: plain).")
    p.add_argument("--host", default="127.0.0.1", help="Address to listen on (default: loopback only).")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--audit-log", default=None, help="JSONL file the decisions are appended to (dsg-audit.jsonl).")
    p.add_argument("--max-model-len", type=int, default=2048, help="Longest prompt + completion, in tokens.")
    p.add_argument("--kv-cache-gib", type=float, default=None, help="KV cache size, GiB (default on a CPU: room "
                   "for 8 sequences of --max-model-len tokens, at most a quarter of the free memory; on a GPU, "
                   "vLLM's).")  # fmt: skip
    p.add_argument("--prefix-caching", action="store_true",
                   help="Enable prefix caching (refused with a gated guardrail).")  # fmt: skip
    p.add_argument("--dtype", default=None, help="Weights dtype in vLLM (float32 for embedded models, else auto).")
    p.add_argument("--allow-model-mismatch", action="store_true", help="Skip checking the guardrails' model.")
    p.add_argument("vllm_args", nargs=argparse.REMAINDER, help="-- then arguments for vLLM's server.")
    p.set_defaults(func=cmd_serve)


# ---- compare --------------------------------------------------------------------------------------------------


def cmd_compare(args) -> int:
    config = from_args(CompareConfig, args)
    config.method_names()  # fail early on a typo
    config.check(domains=not config.forget_corpus)  # fail before the slow stages: the model, its SAE, the domains
    bench = None
    if launched():  # under torchrun the processes share the statistics pass; the rest runs in the first process
        check_output_dir(config.out, "comparison", resume=True)
        bench = config.bench()
        agree({"arguments": dataclasses.asdict(config), **bench.context()})  # the processes read the same
        with sharded() as world:
            bench.latent_stats(progress=world.main)
        # the first process runs the comparison on for minutes to hours, longer than a barrier waits
        leave_together()
        if not world.main:
            return 0
    compare = run_compare(config, bench=bench)
    print(print_table(compare))
    print(f"\nwrote {config.out}/compare.json, {config.out}/report.html")
    return 0


def add_compare(sub) -> None:
    p = sub.add_parser(
        "compare",
        help="DSG against RMU, GA, GradDiff, NPO and ungated SAE clamps on the same model and data.",
        description="Sweep every method, pick each configuration on validation questions by the paper's rule "
        "(lowest forget accuracy with retain >= 99% of base), report it on test questions. Resumable.",
    )
    add_arguments(p, CompareConfig)
    p.set_defaults(func=cmd_compare)


SHARDED_COMMANDS = ("fit", "compare")  # the commands that shard their statistics pass under torchrun
COMMANDS = [add_demo, add_compare, add_fit, add_eval, add_generate, add_serve, add_inspect, add_train_sae, add_data]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dsg", description="Precision unlearning with Dynamic SAE Guardrails.")
    parser.add_argument("--version", action="version", version=f"dsg {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(sub)
    return parser


def _close_bars() -> None:
    """Close the progress bars a failure or an interrupt cut short, so that its message gets a line of its own."""
    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def _print_error(command: str, text: str) -> None:
    """`dsg COMMAND: error: TEXT` on stderr, on one line and with nothing that drives the terminal."""
    _close_bars()
    print(f"dsg {command}: error: {' '.join(printable(text).split())}", file=sys.stderr)


def _quiet() -> None:
    """After a broken pipe: progress bars closed, and what is left in stdout's and stderr's buffers goes nowhere."""
    with contextlib.suppress(OSError, ValueError):
        _close_bars()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError, AttributeError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), stream.fileno())


class Terminated(BaseException):
    """SIGTERM or SIGHUP, raised where the main thread is so that `finally` blocks and atomic writes unwind as for
    Ctrl-C."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _terminate(signum, frame):
    raise Terminated(signum)


def _stop_listening(previous: dict, on_main_thread: bool) -> None:
    """Stopping already: a second stop signal is not a second stop. torchrun forwards Ctrl-C as SIGINT and then
    SIGTERM within a millisecond, which raised inside the first one's handling. `previous` gets SIGINT's handler,
    restored with the others."""
    if not on_main_thread:
        return
    for s in (signal.SIGINT, *STOP_SIGNALS):
        handler = signal.signal(s, signal.SIG_IGN)
        previous.setdefault(s, handler)


# kill and job schedulers send SIGTERM; closing the terminal (or an ssh session) sends SIGHUP
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    on_main_thread = threading.current_thread() is threading.main_thread()
    # a signal ignored on entry stays ignored: `nohup dsg ...` runs on when its terminal closes
    stops = [s for s in STOP_SIGNALS if signal.getsignal(s) is not signal.SIG_IGN] if on_main_thread else []
    previous = {s: signal.signal(s, _terminate) for s in stops}
    try:
        if launched():
            if args.command not in SHARDED_COMMANDS:
                raise DSGError(f"Under torchrun only {' and '.join(SHARDED_COMMANDS)} shard their work; run "
                               f"'dsg {args.command}' as one process.")  # fmt: skip
            init_from_env()
        code = args.func(args)
        sys.stdout.flush()  # here, not at exit, so that a reader gone away is met by the handler below
        return code
    except DSGError as e:
        try:
            _print_error(args.command, str(e))
        except BrokenPipeError:  # and so did the reader of our errors
            _quiet()
            return 128 + signal.SIGPIPE
        return EXIT_USAGE
    except BrokenPipeError:  # the reader of our output went away (`dsg inspect G | head -1`): stop, say nothing
        _quiet()
        return 128 + signal.SIGPIPE
    except OSError as e:  # the machine, not the input: a full disk, a folder made read-only mid-run
        where = f" ({e.filename})" if e.filename else ""
        _print_error(args.command, f"{e.strerror or e}{where}.")
        return 1
    except KeyboardInterrupt:
        _stop_listening(previous, on_main_thread)
        _close_bars()
        print(f"dsg {args.command}: interrupted", file=sys.stderr)
        return 130
    except Terminated as e:
        _stop_listening(previous, on_main_thread)
        _close_bars()
        with contextlib.suppress(OSError):  # after SIGHUP the terminal may be gone
            print(f"dsg {args.command}: {'hung up' if e.signum != signal.SIGTERM else 'terminated'}", file=sys.stderr)
        return 128 + e.signum
    finally:
        shutdown()  # under torchrun: leave the process group before the interpreter tears gloo down
        for s, handler in previous.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)


if __name__ == "__main__":
    sys.exit(main())
