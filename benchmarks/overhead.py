"""Cost of a guardrail at inference, and of statistics collection, on a SmolLM2-135M-shaped model.

Random weights (30 layers, d_model 576, 9 heads / 3 KV heads, MLP 1536, vocab 49152): only the shapes matter
for speed. Configurations are interleaved inside every repeat, so machine noise hits them alike; we report the
median of per-repeat ratios.

    python benchmarks/overhead.py [--repeats 5] [--batch 8] [--seq 512] [--layer 6] [--d-sae 4608] [--arch jumprelu]

Forward throughput: unguarded vs guarded with every input gated (worst case: the selected latents fire on every
token, so every token is clamped) vs guarded with no input gated.
Statistics throughput: dsg.collect_stats (full SAE encode + running sums) vs a plain forward stopped at the hook.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from contextlib import suppress
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import dsg
from dsg.guard.stats import collect_stats
from dsg.lm.hooks import StopForward, hooked, resolve


def smollm2_shaped(layers: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=layers,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
        tie_word_embeddings=True,
        max_position_embeddings=8192,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    return LlamaForCausalLM(cfg).eval()


def random_sae(d_in: int, d_sae: int, arch: str, hook: str, always_on: list[int]) -> dsg.SAE:
    g = torch.Generator().manual_seed(0)
    W_dec = torch.randn(d_sae, d_in, generator=g)
    W_dec /= W_dec.norm(dim=1, keepdim=True)
    b_enc = torch.randn(d_sae, generator=g) * 0.1
    b_enc[always_on] = 1e4  # these latents fire on every token: the worst case for the clamp
    return dsg.SAE(
        W_dec.T.clone(),
        W_dec,
        b_enc,
        torch.zeros(d_in),
        architecture=arch,
        threshold=torch.full((d_sae,), 0.05) if arch == "jumprelu" else None,
        k=64 if arch == "topk" else None,
        hook_name=hook,
    )


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--layer", type=int, default=6, help="hooked decoder layer")
    ap.add_argument("--d-sae", type=int, default=4608)
    ap.add_argument("--arch", default="jumprelu", choices=["standard", "jumprelu", "topk"])
    ap.add_argument("--n-features", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/overhead.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    model = smollm2_shaped(args.layers)
    hook = f"blocks.{args.layer}.hook_resid_post"
    features = list(range(0, args.n_features * 7, 7))
    sae = random_sae(576, args.d_sae, args.arch, hook, features)
    always = dsg.Guardrail(sae, hook, features, threshold=-1.0, clamp=500.0)
    never = dsg.Guardrail(sae, hook, features, threshold=1.0, clamp=500.0)
    ids = torch.randint(3, 49152, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    seqs = ids.tolist()
    point = resolve(model, hook)

    def forward():
        model(input_ids=ids, attention_mask=mask, use_cache=False)

    def guarded(g):
        def run():
            with g.attach(model, verify=False) as session:
                forward()
            assert bool(session.gated.all()) == (g is always)

        return run

    def to_hook():
        def stop(_x):
            raise StopForward

        with hooked(model, point, stop), suppress(StopForward):
            forward()

    def stats():
        collect_stats(model, sae, hook, seqs, batch_size=args.batch, pad_id=2, progress=False)

    runs = {
        "unguarded": forward,
        "guarded_all_gated": guarded(always),
        "guarded_none_gated": guarded(never),
        "forward_to_hook": to_hook,
        "statistics": stats,
    }
    with torch.inference_mode():
        for fn in runs.values():  # warm-up
            fn()
        times = {k: [] for k in runs}
        for r in range(args.repeats):
            for name, fn in runs.items():
                times[name].append(timed(fn))
            print(
                f"repeat {r + 1}/{args.repeats}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items()),
                flush=True,
            )

    def ratio(a, b):
        return statistics.median(x / y for x, y in zip(times[a], times[b]))

    tokens = args.batch * args.seq
    result = {
        "setup": vars(args) | {"tokens_per_forward": tokens, "torch": torch.__version__, "dsg": dsg.__version__},
        "median_seconds": {k: statistics.median(v) for k, v in times.items()},
        "overhead_all_gated": ratio("guarded_all_gated", "unguarded") - 1,
        "overhead_none_gated": ratio("guarded_none_gated", "unguarded") - 1,
        "statistics_vs_forward_to_hook_throughput": 1 / ratio("statistics", "forward_to_hook"),
        "times": times,
    }
    print()
    print(f"{'measure':<44}{'value':>10}")
    print(f"{'unguarded forward (tokens/s, median)':<44}{tokens / result['median_seconds']['unguarded']:>10.0f}")
    print(f"{'guarded overhead, every input gated':<44}{result['overhead_all_gated']:>+10.2%}")
    print(f"{'guarded overhead, no input gated':<44}{result['overhead_none_gated']:>+10.2%}")
    print(f"{'statistics / forward-to-hook throughput':<44}{result['statistics_vs_forward_to_hook_throughput']:>10.3f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
