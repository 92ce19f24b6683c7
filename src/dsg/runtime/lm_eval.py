"""The lm-eval route: guardrails (or a weight edit) on lm-eval's `HFLM`.

From Python, any model with any intervention:

    with lm_eval_model(model, tokenizer, guard) as lm:
        lm_eval.simple_evaluate(model=lm, tasks=[...])

From lm-eval's command line, the registered model `dsg` (this module registers it; `python -m dsg.runtime.lm_eval`
is lm-eval's own CLI with it registered, since lm-eval finds models only in modules it has imported):

    python -m dsg.runtime.lm_eval run --model dsg --model_args pretrained=smollm2-135m,guardrail=dsg-demo/guardrail \\
        --tasks wmdp_cyber                         # several guardrails: guardrail=a|b

`pretrained` is an embedded model name or a HuggingFace folder. The `dsg` model judges each context (the question)
alone and holds that decision for all of its continuations, exactly as `dsg eval` does (dsg.eval.mcq), so both
give the same accuracy on the same questions. Perplexity tasks (`loglikelihood_rolling`), and requests with an
empty context, read each window of a text whole, every token judged as prompt, as `dsg.eval.perplexity_stats`
does. A row whose context cannot be
found (a context longer than the model's window, cut on the left) is judged as a whole, context and continuation
together, in batches of such rows only, so the rows batched with it keep their contexts' decisions whatever the
batch size. `lm_eval_model` keeps lm-eval's plain behaviour: each (context, continuation) forward is judged whole.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext

import torch

from ..errors import DSGError
from ..files import given_twice
from ..guard.guardrail import Guardrail
from ..lm.text import pad_batch, pad_id_of, position_ids
from .hf import attach
from .intervention import Intervention, as_intervention

try:
    from lm_eval.api.registry import register_model
    from lm_eval.models.huggingface import HFLM
except ImportError:  # lm-eval is optional
    HFLM = None


@contextmanager
def lm_eval_model(
    model: torch.nn.Module, tokenizer, intervention: Intervention | Sequence | None = None, **hflm_kwargs
) -> Iterator:
    """An lm-eval `HFLM` over `model` with `intervention` applied for the block."""
    if HFLM is None:
        raise DSGError("lm_eval_model needs lm-eval: pip install lm-eval.")
    intervention = as_intervention(intervention)
    with intervention.applied(model, verify=False) if intervention is not None else nullcontext():
        yield HFLM(pretrained=model, tokenizer=tokenizer, **hflm_kwargs)


if HFLM is not None:
    HFLM_ARGS = set(inspect.signature(HFLM.__init__).parameters) - {"self", "kwargs"}
    # HFLM reads these only when it loads the model itself from a name; dsg hands it the loaded model
    LOADING_ARGS = {"revision", "subfolder", "trust_remote_code", "use_fast_tokenizer", "parallelize", "tp_plan",
                    "max_memory_per_gpu", "max_cpu_memory", "offload_folder", "peft", "delta", "autogptq",
                    "gptqmodel", "gguf_file", "pretrained", "tokenizer"}  # fmt: skip
    USED = sorted(HFLM_ARGS - LOADING_ARGS - {"dtype"})

    @register_model("dsg")
    class DSGLM(HFLM):
        """lm-eval's HF model with guardrails: each context judged alone, its decision held for its continuations."""

        def __init__(
            self, pretrained: str = "smollm2-135m", guardrail: str | None = None, allow_model_mismatch: bool = False,
            **kwargs,
        ):  # fmt: skip
            from ..guard.guardrail import dtype_for
            from ..lm.models import DTYPES, load_model

            ignored = sorted(k for k in kwargs if k in LOADING_ARGS or k not in HFLM_ARGS)
            if ignored:  # HFLM would drop them silently for a model object: a typo would run unguarded
                taken = ", ".join(["pretrained", "guardrail", "allow_model_mismatch", "dtype", *USED])
                raise DSGError(f"The dsg lm-eval model does not take {', '.join(ignored)} (its model_args: {taken}).")
            paths = [p.strip() for p in str(guardrail or "").split("|") if p.strip()]
            twice = given_twice(paths)
            if twice is not None:
                raise DSGError(f"guardrail {twice!r} is given twice; it would clamp twice.")
            self.guardrails = [Guardrail.load(p, allow_missing_model=allow_model_mismatch) for p in paths]
            # the model in the dtype the guardrails were fitted in (a cast model is another model to their check)
            dtype = dtype_for(self.guardrails)
            asked = kwargs.pop("dtype", None)
            if asked is not None and asked != "auto":
                name = str(asked).removeprefix("torch.")
                if name not in DTYPES:
                    raise DSGError(f"dtype must be one of {', '.join(DTYPES)} (or auto), got {asked!r}.")
                if self.guardrails and DTYPES[name] != dtype:
                    fitted = str(dtype).removeprefix("torch.")
                    raise DSGError(f"dtype={name} differs from the dtype the guardrails were fitted in ({fitted}): "
                                   "they check the model in that dtype.")  # fmt: skip
                dtype = DTYPES[name]
            model, tokenizer = load_model(str(pretrained), dtype=dtype)
            kwargs.setdefault("batch_size", 8)
            super().__init__(pretrained=model, tokenizer=tokenizer, **kwargs)
            if not allow_model_mismatch:
                for g in self.guardrails:
                    g.check_model(model)
            self._decisions: dict[tuple[int, ...], torch.Tensor] = {}
            self._masks: dict[tuple[int, ...], torch.Tensor] = {}  # [G, len] which context tokens were clamped
            self._rows: dict[tuple[int, ...], tuple[int, ...]] = {}  # the current pass's rows and their contexts
            self._rolling = False  # inside loglikelihood_rolling: every row is text read whole, as perplexity reads it

        def loglikelihood_rolling(self, requests, *args, **kwargs):
            """Perplexity of whole texts: each window HFLM cuts a text into is judged whole, every token as prompt,
            as dsg's perplexity judges its windows (a rolling request's context is only the token before the text,
            so holding the context's decision, as for questions, would leave every text unclamped)."""
            self._rolling = True
            try:
                return super().loglikelihood_rolling(requests, *args, **kwargs)
            finally:
                self._rolling = False

        @torch.inference_mode()
        def _judge(self, contexts: list[tuple[int, ...]]) -> None:
            """Each distinct context's decisions [G], judged alone (left-padded prompt batches, as dsg eval)."""
            todo = [c for c in dict.fromkeys(contexts) if c and c not in self._decisions]
            pad = pad_id_of(self.tokenizer, self.model)
            size = self.batch_size if isinstance(self.batch_size, int) else 8  # "auto" sizes: judge 8 at a time
            for start in range(0, len(todo), size):
                chunk = todo[start : start + size]
                ids, mask = pad_batch([list(c) for c in chunk], pad, side="left")
                ids, mask = ids.to(self.device), mask.to(self.device)
                with attach(self.model, *self.guardrails, verify=False) as session:
                    self.model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), use_cache=False)
                masks = session.clamp_mask().cpu()
                for row, (c, d) in enumerate(zip(chunk, session.decisions().cpu())):
                    self._decisions[c] = d
                    self._masks[c] = masks[row, :, ids.shape[1] - len(c) :]  # left padding removed

        def _cut(self, context_enc, continuation_enc) -> bool:
            """Whether HFLM cuts this request's row from the left to fit the model (losing the context's start)."""
            return len(context_enc) + len(continuation_enc) - 1 > self.max_length

        def _row(self, context_enc, continuation_enc) -> tuple[int, ...]:
            """The tokens HFLM feeds the model for one request (before padding): context and continuation, the
            last token dropped, cut from the left to the model's length."""
            return tuple((list(context_enc) + list(continuation_enc))[-(self.max_length + 1) :][:-1])

        def _loglikelihood_tokens(self, requests, *args, **kwargs):
            if not self.guardrails:
                return super()._loglikelihood_tokens(requests, *args, **kwargs)
            # only contexts whose rows keep them whole are judged (a cut one may run past the model's context)
            self._judge([tuple(c) for _, c, cont in requests if not self._rolling and not self._cut(c, cont)])
            # A batch row holds a request's context and continuation run together; its context is known from the
            # request, not from the row (("The capital", " of France is") and ("The capital of France", ...) make
            # rows that another request's context prefixes). Requests whose rows are the same tokens with
            # different contexts go to separate passes, so that each row names one context.
            # A row cut from the left loses the start of its context and is judged whole; such rows go to a pass
            # of their own, since `_held` holds decisions for a whole batch or for none of it.
            # HFLM pads rows on the right with zeros, and 0 is a token too ('!' in GPT-2, Llama 3 and Qwen2's
            # vocabularies): rows that differ only by trailing zeros ((C, "!") and C padded) go to separate passes,
            # so that `_held` finds each row's own context.
            # A request with an empty context (its context only the prefix token) is judged whole too: holding
            # that token's decision would leave every such continuation unclamped.
            passes: list[dict] = []
            whole: dict = {"rows": {}, "requests": []}
            for i, (strings, context_enc, continuation_enc) in enumerate(requests):
                # (a context of spaces only is one: lm-eval moves its spaces into the continuation)
                empty = (strings is not None and not strings[0].strip()) or not context_enc
                if self._rolling or empty or self._cut(context_enc, continuation_enc):
                    whole["requests"].append(i)
                    continue
                row, context = self._row(context_enc, continuation_enc), tuple(context_enc)
                bare = _without_trailing_zeros(row)
                home = next((p for p in passes if p["rows"].get(row, context) == context
                             and p["bare"].get(bare, row) == row), None)  # fmt: skip
                if home is None:
                    home = {"rows": {}, "bare": {}, "requests": []}
                    passes.append(home)
                home["rows"][row] = context
                home["bare"][bare] = row
                home["requests"].append(i)
            results: list = [None] * len(requests)
            for p in passes + ([whole] if whole["requests"] else []):
                self._rows = p["rows"]
                try:
                    out = super()._loglikelihood_tokens([requests[i] for i in p["requests"]], *args, **kwargs)
                finally:
                    self._rows = {}
                for i, r in zip(p["requests"], out):
                    results[i] = r
            return results

        def _held(self, inps: torch.Tensor) -> tuple:
            """For the rows (each a request's context and continuation, right-padded with zeros): their contexts'
            decisions [B, G], where their continuations begin [B, G], and which context tokens the context's own
            forward clamped [B, G, T]; (None, None, None) when some row's context is unknown (a context cut from
            the left to fit the model: the row is then judged whole). A row thus repeats its context's prefill
            token for token (a windowed gate that opened, or opened and closed, mid-context), and its continuation
            holds the context's decision, as in dsg eval."""
            rows = inps.tolist()
            T = inps.shape[1]
            lengths = sorted({len(r) for r in self._rows}, reverse=True)
            decisions, starts, masks = [], [], []
            for row in rows:
                key = next((tuple(row[:n]) for n in lengths
                            if tuple(row[:n]) in self._rows and not any(row[n:])), None)  # fmt: skip
                found = self._rows.get(key) if key is not None else None
                if found is None or found not in self._decisions or found != key[: len(found)]:
                    return None, None, None
                d, m = self._decisions[found], self._masks[found]
                decisions.append(d)
                starts.append(torch.full_like(d, len(found), dtype=torch.long))
                masks.append(torch.nn.functional.pad(m, (0, T - m.shape[1])))
            return torch.stack(decisions), torch.stack(starts), torch.stack(masks)

        def _model_call(self, inps, attn_mask=None, labels=None):
            if not self.guardrails:
                return super()._model_call(inps, attn_mask, labels)
            with attach(self.model, *self.guardrails, verify=False) as session:
                session.hold(*self._held(inps.cpu()))
                return super()._model_call(inps, attn_mask, labels)

        def _model_generate(self, context, max_length, stop, **generation_kwargs):
            if not self.guardrails:
                return super()._model_generate(context, max_length, stop, **generation_kwargs)
            with attach(self.model, *self.guardrails, verify=False):
                return super()._model_generate(context, max_length, stop, **generation_kwargs)


def _without_trailing_zeros(row: tuple[int, ...]) -> tuple[int, ...]:
    """A row as it reads once HFLM's zero right-padding is taken off (taking real trailing 0 tokens with it)."""
    end = len(row)
    while end and row[end - 1] == 0:
        end -= 1
    return row[:end]


def _model_argument(argv: list[str]) -> str | None:
    """The value of lm-eval's --model in a command line (`--model dsg` or `--model=dsg`)."""
    for i, a in enumerate(argv):
        if a == "--model" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--model="):
            return a.split("=", 1)[1]
    return None


def main() -> int:
    """lm-eval's command line with the `dsg` model registered. A dsg refusal (a guardrail folder that is not one,
    a model it was not fitted on) is one line and status 2, as from `dsg`; Ctrl-C is one line and status 130."""
    if HFLM is None:
        print("python -m dsg.runtime.lm_eval needs lm-eval: pip install lm-eval.", file=sys.stderr)
        return 2
    from lm_eval.__main__ import cli_evaluate

    from ..parallel import launched
    from ..tables import printable

    if launched() and _model_argument(sys.argv[1:]) == "dsg":  # lm-eval takes the dsg model as one process's:
        # each process would run every request (HF's own model shards them)
        print("dsg lm_eval: error: the dsg model runs in one process; run lm-eval without torchrun or accelerate "
              "(every process would run every request).", file=sys.stderr)  # fmt: skip
        return 2

    try:
        cli_evaluate()
    except DSGError as e:
        print(f"dsg lm_eval: error: {' '.join(printable(str(e)).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dsg lm_eval: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
