"""Serving throughput with guardrails: vLLM's OpenAI-compatible server with and without a guardrail, and HF
`generate` with the guardrail, at the same concurrency, on the embedded default.

The two vLLM servers take turns, repeat by repeat (one at a time: vLLM binds its threads to the cores, so two
engines on one small machine would fight over them), with the order alternating between repeats so that drift
hits both alike; each cell is the median over repeats of output tokens per second (every request decodes exactly
--tokens tokens: `ignore_eos`). Requests mix offensive-cyber and benign chat prompts, so the guarded server
gates some and not others. Both servers run with the settings the paper's gate needs (no chunked prefill, no
prefix caching), so the ratio is the guardrail's own cost. HF generates each concurrency level as one left-padded
batch under `dsg.attach`.

    bash scripts/install-vllm.sh && .venv/bin/dsg demo            # once: vLLM, and a guardrail to serve
    .venv/bin/python benchmarks/serving.py --guardrail dsg-demo/guardrail [--levels 1,8,32] [--repeats 3]

Prints the table and writes benchmarks/results/serving.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from dsg import Guardrail  # noqa: E402
from dsg.lm.text import pad_batch  # noqa: E402
from dsg.models import load_model  # noqa: E402
from dsg.tables import table  # noqa: E402
from test_vllm_serve import FORGET, RETAIN, Server  # noqa: E402 (the tests' server harness)

PROMPTS = (
    FORGET
    + RETAIN
    + [
        "Explain what a reverse shell is and how attackers set one up.",
        "How does Git track changes to a file?",
        "What is phishing and how do attackers craft a convincing email?",
        "What is the tallest mountain in Europe?",
    ]
)


async def _load(url: str, concurrency: int, tokens: int) -> tuple[float, int, int]:
    """(seconds, output tokens, gated requests) for `concurrency` requests in flight together."""
    from openai import AsyncOpenAI

    async with AsyncOpenAI(base_url=url + "/v1", api_key="none", timeout=600, max_retries=0) as client:

        async def one(i: int):
            p = PROMPTS[i % len(PROMPTS)]
            r = await client.chat.completions.create(
                model="smollm2-135m", messages=[{"role": "user", "content": p}], max_tokens=tokens, temperature=0,
                extra_body={"ignore_eos": True},
            )  # fmt: skip
            return r.usage.completion_tokens, bool((r.model_extra or {}).get("dsg", {}).get("gated"))

        t = time.perf_counter()
        done = await asyncio.gather(*(one(i) for i in range(concurrency)))
        return time.perf_counter() - t, sum(n for n, _ in done), sum(g for _, g in done)


def _hf(model, tok, guard, concurrency: int, tokens: int) -> float:
    texts = [tok.apply_chat_template([{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}], tokenize=False,
                                     add_generation_prompt=True) for i in range(concurrency)]  # fmt: skip
    ids, mask = pad_batch([tok(t, add_special_tokens=False)["input_ids"] for t in texts], tok.pad_token_id, "left")
    t = time.perf_counter()
    with torch.inference_mode(), guard.attach(model, verify=False):
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=tokens, min_new_tokens=tokens,
                             do_sample=False, pad_token_id=tok.pad_token_id)  # fmt: skip
    seconds = time.perf_counter() - t
    return (out.shape[1] - ids.shape[1]) * concurrency / seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--guardrail", required=True, help="Guardrail directory (e.g. dsg-demo/guardrail).")
    ap.add_argument("--levels", default="1,8,32", help="Concurrency levels.")
    ap.add_argument("--tokens", type=int, default=64, help="Output tokens per request.")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "serving.json"))
    args = ap.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="dsg-serving-"))
    runs: dict[str, dict[int, list[float]]] = {k: {c: [] for c in levels} for k in ("plain", "guarded", "hf")}
    gated: dict[int, int] = {}
    for rep in range(args.repeats):
        order = [("plain", []), ("guarded", [Path(args.guardrail)])]
        for name, guards in order if rep % 2 == 0 else order[::-1]:
            server = Server(guards, tmp, ("--", "--no-enable-chunked-prefill"))  # both: the paper gate's settings
            try:
                server.wait_ready()
                asyncio.run(_load(server.url, 8, 8))  # warm up
                for c in levels:
                    seconds, n, g = asyncio.run(_load(server.url, c, args.tokens))
                    runs[name][c].append(n / seconds)
                    if name == "guarded":
                        gated[c] = g
                    print(f"repeat {rep + 1}: {name}: concurrency {c}: {n / seconds:.1f} tok/s", flush=True)
            finally:
                server.stop()
    torch.set_num_threads(2)
    model, tok = load_model("smollm2-135m")
    guard = Guardrail.load(args.guardrail)
    for _ in range(args.repeats):
        for c in levels:
            runs["hf"][c].append(_hf(model, tok, guard, c, args.tokens))
    med = {k: {c: statistics.median(v) for c, v in per.items()} for k, per in runs.items()}
    rows = [[str(c), f"{med['plain'][c]:.1f}", f"{med['guarded'][c]:.1f}", f"{med['guarded'][c] / med['plain'][c]:.3f}",
             f"{med['hf'][c]:.1f}", f"{med['guarded'][c] / med['hf'][c]:.2f}", f"{gated[c]}/{c}"]
            for c in levels]  # fmt: skip
    print(table(["concurrency", "vLLM tok/s", "vLLM+guard tok/s", "guard/plain", "HF+guard tok/s", "vLLM/HF (guarded)",
                 "gated"], rows))  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"levels": levels, "tokens": args.tokens, "repeats": args.repeats, "runs": runs,
                               "median_tokens_per_s": med, "gated": gated}, indent=1))  # fmt: skip
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
