"""The `dsg` command line.

    dsg fit --model PATH --sae PATH --forget FILE --retain FILE [--calibration FILE] --out DIR
    dsg generate --model PATH --guardrail DIR [--guardrail DIR2] PROMPT
    dsg inspect DIR

A wrong file, field or value prints one sentence and exits with status 2; outputs are written atomically, so a
failed command leaves no partial directory behind.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from .config import add_arguments, from_args
from .errors import DSGError

EXIT_USAGE = 2


def _model(args):
    from .models import load_model

    return load_model(args.model)


def _guardrails(paths, model, verify: bool):
    from .guardrail import Guardrail

    guards = [Guardrail.load(p) for p in paths]
    if verify:
        for g in guards:
            g.check_model(model)
    return guards


# ---- fit ------------------------------------------------------------------------------------------------------


def cmd_fit(args) -> int:
    from .corpus import read_corpus
    from .fit import FitConfig, fit
    from .sae import SAE

    config = from_args(FitConfig, args)
    forget, retain = read_corpus(args.forget), read_corpus(args.retain)
    calibration = read_corpus(args.calibration) if args.calibration else None
    sae = SAE.load(args.sae, hook_name=args.sae_hook)
    model, tokenizer = _model(args)
    guard = fit(model, tokenizer, sae, forget, retain, calibration, config, name=args.name)
    guard.save(args.out)
    print(f"Fitted {guard!r}")
    print(f"Wrote {args.out}")
    return 0


def add_fit(sub) -> None:
    from .fit import FitConfig

    p = sub.add_parser("fit", help="Fit a guardrail from a forget corpus and a retain corpus.",
                       description="Select the SAE latents of a forget domain and calibrate the gate.")
    p.add_argument("--model", required=True, help="HF model folder, or an embedded name such as smollm2-135m.")
    p.add_argument("--sae", required=True, help="SAE folder (SAELens or sparsify) or Gemma Scope params.npz.")
    p.add_argument("--sae-hook", default=None, help="Hook point for SAE files that do not record one (params.npz).")
    p.add_argument("--forget", required=True, help="Forget corpus: .txt (blank-line-separated) or .jsonl with 'text'.")
    p.add_argument("--retain", required=True, help="Retain corpus, same formats.")
    p.add_argument("--calibration", default=None, help="Texts to calibrate the gate on (default: the retain corpus).")
    p.add_argument("--out", required=True, help="Output guardrail directory.")
    p.add_argument("--name", default=None, help="A name for this guardrail (e.g. the unlearning request).")
    add_arguments(p, FitConfig)
    p.set_defaults(func=cmd_fit)


# ---- generate -------------------------------------------------------------------------------------------------


def cmd_generate(args) -> int:
    from .generation import generate

    model, tokenizer = _model(args)
    guards = _guardrails(args.guardrail, model, verify=not args.allow_model_mismatch)
    rows = generate(model, tokenizer, args.prompt, guards, max_new_tokens=args.max_new_tokens, chat=args.chat,
                    verify=False)
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
    p.add_argument("--chat", action=argparse.BooleanOptionalAction, default=True,
                   help="Wrap each prompt in the tokenizer's chat template.")
    p.add_argument("--allow-model-mismatch", action="store_true",
                   help="Apply guardrails fitted on different weights (e.g. to test a fine-tuning attack).")
    p.add_argument("--json", action="store_true", help="Print JSON instead of text.")
    p.add_argument("prompt", nargs="+")
    p.set_defaults(func=cmd_generate)


# ---- inspect --------------------------------------------------------------------------------------------------


def cmd_inspect(args) -> int:
    from .audit import describe

    print(describe(args.guardrail, top=args.top))
    return 0


def add_inspect(sub) -> None:
    p = sub.add_parser("inspect", help="Show a guardrail: features, threshold, scores, firing rates.")
    p.add_argument("guardrail", help="Guardrail directory.")
    p.add_argument("--top", type=int, default=None, help="Also list this many top-scoring latents that were not selected.")
    p.set_defaults(func=cmd_inspect)


COMMANDS = [add_fit, add_generate, add_inspect]


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="dsg", description="Precision unlearning with Dynamic SAE Guardrails.")
    parser.add_argument("--version", action="version", version=f"dsg {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except DSGError as e:
        print(f"dsg {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"dsg {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
