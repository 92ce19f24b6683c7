"""The API-server half of the vLLM plugin: each completion response says whether a guardrail gated it.

Entry point `vllm.endpoint_plugins: dsg_http` (loaded when `VLLM_PLUGINS` names it, as `dsg serve` does). Every
`/v1/completions` and `/v1/chat/completions` request gets an `X-Request-Id` (the client's, or a fresh one), which
vLLM turns into the engine's request id; the engine side (runtime/vllm.py) appends each gate decision to the audit
log under that id, and this plugin answers from the log:

  * an extra `dsg` field in the response body: `{"gated": true, "prompt_clamped": 12, "guardrails": [{guardrail,
    event, rho, threshold, gated, prompt_clamped}]}`, the final decision (gated when any guardrail gated the
    request, on its prompt or latched while decoding) and how many prompt tokens were clamped (a gate held open
    clamps near a forget stretch of a prompt and may be shut again at its end: `gated` false, `prompt_clamped`
    not 0); a streamed response sends it as one more event (`"object": "dsg.decision"`, no choices) before
    `[DONE]`;
  * response headers `x-dsg-gated`, `x-dsg-prompt-clamped` (clamped prompt tokens, all guardrails) and
    `x-dsg-rho` (each guardrail's rho, comma-separated): the final decision, or for a streamed response the
    prompt's (headers leave with the first chunk);
  * `GET /v1/dsg/decisions/{id}`: every audit record of a request (of every request sent with that id), found by
    its `x-request-id`, the response's `id` (`chatcmpl-...`, `cmpl-...`) or the audit log's engine request id.

A JSON request that holds one of the tokenizer's special tokens as text ("<|im_end|>", "<|im_start|>assistant")
is refused with 400 before it reaches the engine, at every endpoint but those that take text as written
(`AS_WRITTEN`: completions, tokenizing): vLLM renders chat templates (chat completions, responses, messages, ...)
and tokenizes the result with special tokens parsed, so such text would close its turn and open another, a
conversation its sender forged inside one message (`dsg generate` refuses the same prompts). Every key and string
of the body counts (a string holding JSON, such as a tool call's arguments, is read too), but for the fields
where special tokens are settings rather than text (`NOT_TEXT`: the model's name, stop strings, a chat template).
A prompt meant to carry special tokens goes to `/v1/completions`.

A request sent with an id that an earlier one used (a retry, a tracing proxy's id) is answered from the records of
its own engine request only. Two requests in flight at once under one id cannot be told apart: each then reports
gated when either was. Records are found by endpoint and client id (`parse_id`), so a chat request `abc-0` is not
a completions request `abc`'s first prompt; a response of several sequences (n > 1 samples, a list of prompts)
gets one decision per choice under `choices`.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import re
import sys
import threading
import time
import uuid
from pathlib import Path

from ..lm.text import special_token_in, special_token_strings

GUARDED_PATHS = {"/v1/completions": "completions", "/v1/chat/completions": "chat"}
AS_WRITTEN = {"/v1/completions", "/v1/completions/render", "/tokenize", "/detokenize"}  # no template: not checked
NOT_TEXT = {"model", "stop", "chat_template"}  # a request's top-level fields that hold settings, not text
PREFIXES = {"chatcmpl-": "chat", "cmpl-": "completions"}  # engine request ids' prefix, by endpoint
_CHILD = re.compile(r"(\d+)_(.*)", re.S)  # the i-th of n samples: `<i>_<parent engine id>`
_BEAM = re.compile(r"-[0-9a-f]{32}-beam-\d+")  # a beam-search step's request: `<engine id>-<uuid>-beam-<i>`


def parse_id(engine_request_id: str) -> tuple[str | None, str, int | None, int | None]:
    """(endpoint, client id, prompt index, sample index) of an engine request id: `chatcmpl-<id>-<8 hex>` (chat),
    `cmpl-<id>-<prompt index>-<8 hex>` (completions, one per prompt of a list), either behind `<i>_` for the i-th
    of n samples (`n > 1`). The endpoint tells a chat request sent as `abc-0` from the first prompt of a
    completions request sent as `abc`. An id of no known shape is its own client id."""
    rid, sample = _BEAM.sub("", engine_request_id, count=1), None  # each step of a beam search is its request's
    child = _CHILD.fullmatch(rid)
    if child and child.group(2).startswith(tuple(PREFIXES)):
        sample, rid = int(child.group(1)), child.group(2)
    prefix = next((p for p in PREFIXES if rid.startswith(p)), None)
    if prefix is None:
        return None, engine_request_id, None, None
    endpoint, rid = PREFIXES[prefix], rid[len(prefix) :].rsplit("-", 1)[0]  # less vLLM's random suffix
    prompt = None
    if endpoint == "completions":
        head, _, tail = rid.rpartition("-")
        if head and tail.isdigit():
            rid, prompt = head, int(tail)
    return endpoint, rid, prompt, sample


class AuditIndex:
    """The audit log, read incrementally: records by the client-facing request id and the endpoint it came to."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.offset = 0
        self.partial = b""
        self.by_id: dict[str, list[tuple[str | None, dict]]] = {}
        self.lock = threading.Lock()

    def refresh(self) -> None:
        with self.lock:
            if not self.path.exists():
                return
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
            self.offset += len(data)
            lines = (self.partial + data).split(b"\n")
            self.partial = lines.pop()
            for line in lines:
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                endpoint, client_id, _, _ = parse_id(str(record.get("request_id", "")))
                self.by_id.setdefault(client_id, []).append((endpoint, record))

    def records(self, request_id: str, excluding: frozenset[str] = frozenset(), endpoint: str | None = None
                ) -> list[dict]:  # fmt: skip
        """The records logged under a client-facing id (sent to `endpoint`, "chat" or "completions"; None: to
        either), less those of the engine requests in `excluding`."""
        self.refresh()
        return [r for e, r in self.by_id.get(request_id, [])
                if (endpoint is None or e == endpoint) and str(r.get("request_id", "")) not in excluding]  # fmt: skip

    def lookup(self, any_id: str) -> list[dict]:
        """The records a user's id names, whichever of the ids a request shows they hold: the client id (the
        `x-request-id` header, sent or given), the response body's `id` (`chatcmpl-<client id>`, `cmpl-<client
        id>`), or one engine request's id as the audit log writes it (that request's records only)."""
        endpoint, client_id, _, _ = parse_id(any_id)
        found = self.records(any_id)  # a client id (which may itself look like a response id)
        found += [r for r in self.records(client_id, endpoint=endpoint) if str(r.get("request_id", "")) == any_id]
        prefix = next((p for p in PREFIXES if any_id.startswith(p)), None)
        if prefix:  # a response id: its request's client id, at its endpoint
            found += self.records(any_id[len(prefix) :], endpoint=PREFIXES[prefix])
        unique = {id(r): r for r in found}  # one record found two ways is listed once
        return list(unique.values())

    def engine_ids(self, request_id: str, endpoint: str | None = None) -> frozenset[str]:
        """The engine request ids logged so far under a client-facing id. A client may send an id again (a retry, a
        tracing proxy's id); vLLM gives each request its own engine id, so a request reads only the records of
        engine ids that were not there when it arrived."""
        return frozenset(str(r.get("request_id", "")) for r in self.records(request_id, endpoint=endpoint))


def _sequence_decision(records: list[dict]) -> dict:
    """One sequence's decision (one prompt, one sample): gated by any guardrail, on its prompt or latched while
    decoding, and each guardrail's latest record (told apart by its place in the engine's list: two guardrails may
    share a name)."""
    latest: dict = {}
    for r in records:
        latest[r.get("guardrail_index", r.get("guardrail", "?"))] = r
    return {
        "gated": any(bool(r.get("gated")) for r in records),
        "prompt_clamped": sum(int(r.get("prompt_clamped") or 0) for r in latest.values()),
        "guardrails": [{k: r.get(k) for k in ("guardrail", "event", "rho", "threshold", "gated", "prompt_clamped")}
                       for r in latest.values()],
    }  # fmt: skip


def decision(records: list[dict]) -> dict:
    """A request's decision from its audit records. One sequence (one prompt, one sample): gated, prompt_clamped and
    each guardrail's latest record. Several (a completions request with a list of prompts, or n > 1 samples):
    gated when any is, prompt_clamped summed over the prompts, each guardrail's record with the highest rho, and
    `choices`, one decision per choice of the response, in its order (prompt by prompt, sample by sample)."""
    sequences: dict[tuple[int, int], list[dict]] = {}
    for r in records:
        _, _, prompt, sample = parse_id(str(r.get("request_id", "")))
        sequences.setdefault((prompt or 0, sample or 0), []).append(r)
    if len(sequences) <= 1:
        return _sequence_decision(records)
    samples = max(s for _, s in sequences) + 1
    choices = [{"index": p * samples + s, "prompt": p, "sample": s, **_sequence_decision(rs)}
               for (p, s), rs in sorted(sequences.items())]  # fmt: skip
    strongest: dict[int, dict] = {}  # by place in the engine's list of guardrails, the same in every sequence
    for c in choices:
        for j, g in enumerate(c["guardrails"]):
            if j not in strongest or (g.get("rho") or 0) > (strongest[j].get("rho") or 0):
                strongest[j] = g
    per_prompt: dict[int, int] = {}
    for c in choices:  # the samples of one prompt share it: count its clamped tokens once
        per_prompt[c["prompt"]] = max(per_prompt.get(c["prompt"], 0), c["prompt_clamped"])
    return {
        "gated": any(c["gated"] for c in choices),
        "prompt_clamped": sum(per_prompt.values()),
        "guardrails": list(strongest.values()),
        "choices": choices,
    }


def _texts(payload: dict):
    """(where, string) for every key and string inside a request's JSON body, but its NOT_TEXT fields; a string that
    holds JSON (a tool call's arguments) is read as well. Iterative: a deeply nested body cannot exhaust the stack."""
    stack = [(k, v) for k, v in reversed(payload.items()) if k not in NOT_TEXT]  # JSON keys are strings
    while stack:
        where, value = stack.pop()
        if isinstance(value, str):
            yield where, value
            if value.lstrip()[:1] in ("{", "["):
                with contextlib.suppress(ValueError, RecursionError):  # not JSON after all: read as text above
                    stack.append((f"{where} (as JSON)", json.loads(value)))
        elif isinstance(value, dict):
            for k, v in reversed(list(value.items())):
                stack += [(f"{where}.{k}", v), (f"{where} (a key)", str(k))]
        elif isinstance(value, list):
            stack += [(f"{where}[{i}]", v) for i, v in reversed(list(enumerate(value)))]


def forged_turn(body: bytes, specials: list[str]) -> str | None:
    """Why a request's JSON body is refused (it holds a special token of the tokenizer as text), or None. A body
    that is not a JSON object is left to vLLM to answer."""
    if not specials:
        return None
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError):
        return None
    if not isinstance(payload, dict):
        return None
    for where, text in _texts(payload):
        found = special_token_in(text, specials)
        if found is not None:
            return (
                f"{where} holds the tokenizer's special token {found!r}, which the chat template would read as "
                "its own (a turn the text forged). Remove it, or send the text as written to /v1/completions."
            )
    return None


def headers_for(records: list[dict]) -> dict[str, str]:
    d = decision(records)
    return {
        "x-dsg-gated": "true" if d["gated"] else "false",
        "x-dsg-prompt-clamped": str(d["prompt_clamped"]),
        "x-dsg-rho": ",".join(f"{g['rho']:.6g}" for g in d["guardrails"]),
    }


RECORD_WAIT = 5.0  # seconds a response waits for its audit records after its first chunk
UNJUDGED = ("The engine logged no guardrail decision for this request, so its dsg plugin is not guarding it (see "
            "the server's log: the plugin may have failed to load in the engine); the answer is withheld.")  # fmt: skip


def _is_error(chunk: bytes) -> bool:
    """Whether a response's first chunk is an error (a JSON body, or a server-sent event, whose top level holds
    `error`), which carries no model text and passes as it is."""
    text = chunk.decode("utf-8", "replace").strip()
    if text.startswith("data:"):  # the first event of a stream
        text = text[len("data:") :].split("\n\n", 1)[0]
    try:
        payload = json.loads(text)
    except ValueError:
        return False
    return isinstance(payload, dict) and "error" in payload and "choices" not in payload


def _sequences(body: bytes, endpoint: str) -> int:
    """How many sequences (prompts x samples) a request's body asks for: the records a response waits for."""
    try:
        request = json.loads(body)
    except ValueError:
        return 1
    if not isinstance(request, dict):
        return 1
    n = request.get("n")
    samples = n if isinstance(n, int) and not isinstance(n, bool) and 0 < n <= 1024 else 1
    if request.get("use_beam_search"):  # its beams are steps of the one sequence, not samples of their own
        samples = 1
    prompt = request.get("prompt") if endpoint == "completions" else None
    prompts = len(prompt) if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int) else 1
    return max(1, min(prompts, 4096)) * samples


class DSGEndpoint:
    """vLLM endpoint plugin: the decision headers and the decisions route."""

    name = "dsg_http"
    required_tasks = ("generate",)

    def __init__(self):
        self.index: AuditIndex | None = None
        self.specials: list[str] = []  # the tokenizer's special tokens, refused in a request's text (forged_turn)

    async def _records(self, request_id: str, wait: float, excluding: frozenset[str] = frozenset(),
                       endpoint: str | None = None, sequences: int = 1) -> list[dict]:  # fmt: skip
        """The request's records once `sequences` (prompts x samples) have one each, or what is there after
        `wait` seconds."""
        deadline = asyncio.get_running_loop().time() + wait
        while True:
            found = self.index.records(request_id, excluding, endpoint) if self.index is not None else []
            seen = {parse_id(str(r.get("request_id", "")))[2:] for r in found}
            if len(seen) >= sequences or asyncio.get_running_loop().time() >= deadline:
                return found
            await asyncio.sleep(0.01)

    def attach_router(self, app) -> None:
        from fastapi.responses import JSONResponse
        from starlette.responses import Response, StreamingResponse

        plugin = self

        @app.get("/v1/dsg/decisions/{request_id:path}")  # an id may hold "/"
        async def decisions(request_id: str):
            records = plugin.index.lookup(request_id) if plugin.index is not None else []
            return JSONResponse({"request_id": request_id, "records": records})

        @app.middleware("http")
        async def gate_headers(request, call_next):
            if request.method != "POST":
                return await call_next(request)
            json_body = request.headers.get("content-type", "").split(";")[0].strip().lower() == "application/json"
            if plugin.specials and json_body and request.url.path not in AS_WRITTEN:
                why = forged_turn(await request.body(), plugin.specials)  # the body is kept for vLLM to read
                if why is not None:
                    where = why.split(" holds ", 1)[0]  # the field forged_turn names first
                    error = {"message": why, "type": "BadRequestError", "param": where, "code": 400}
                    return JSONResponse({"error": error}, status_code=400)
            if plugin.index is None or request.url.path not in GUARDED_PATHS:
                return await call_next(request)
            rid = (request.headers.get("x-request-id") or "").strip()
            if not rid:  # none, or an empty one (which vLLM would read first and replace with an id of its own)
                rid = uuid.uuid4().hex
                kept = [(k, v) for k, v in request.scope["headers"] if k.lower() != b"x-request-id"]
                request.scope["headers"] = [*kept, (b"x-request-id", rid.encode())]
            endpoint = GUARDED_PATHS[request.url.path]
            earlier = plugin.index.engine_ids(rid, endpoint)  # earlier requests with the same id: not this one's
            sequences = _sequences(await request.body(), endpoint) if json_body else 1
            response = await call_next(request)
            if response.status_code != 200:
                return response
            body = response.body_iterator
            first = b""
            async for chunk in body:  # the first chunk comes once the prompt has been through the engine
                first = chunk if isinstance(chunk, bytes) else chunk.encode()
                break
            records = await plugin._records(rid, RECORD_WAIT, earlier, endpoint, sequences)
            if not records and not _is_error(first):  # fail closed: an engine that judged nothing answered unguarded
                with contextlib.suppress(Exception):
                    await body.aclose()
                error = {"message": UNJUDGED, "type": "ServiceUnavailableError", "param": None, "code": 503}
                return JSONResponse({"error": error}, status_code=503, headers={"x-request-id": rid})
            headers = {k: v for k, v in response.headers.items() if k.lower() != "content-length"}
            headers |= {"x-request-id": rid} | headers_for(records)
            if not response.headers.get("content-type", "").startswith("text/event-stream"):
                data = first + b"".join([c if isinstance(c, bytes) else c.encode() async for c in body])
                try:  # the final decision (a gate may latch while decoding) as an extra field of the body
                    payload = json.loads(data)
                    final = plugin.index.records(rid, earlier, endpoint)
                    payload["dsg"] = decision(final)
                    data = json.dumps(payload).encode()
                    headers |= headers_for(final)
                except ValueError:
                    pass
                return Response(data, status_code=response.status_code, headers=headers)

            async def stream():  # the final decision as one more event before [DONE]
                pending = first
                async for chunk in body:
                    yield pending
                    pending = chunk if isinstance(chunk, bytes) else chunk.encode()
                if b"data: [DONE]" in pending:
                    event = {"id": rid, "object": "dsg.decision", "created": int(time.time()), "model": "",
                             "choices": [], "dsg": decision(plugin.index.records(rid, earlier, endpoint))}  # fmt: skip
                    pending = pending.replace(
                        b"data: [DONE]", b"data: " + json.dumps(event).encode() + b"\n\ndata: [DONE]"
                    )
                yield pending

            return StreamingResponse(stream(), status_code=response.status_code, headers=headers)

    async def init_state(self, engine_client, state, args) -> None:
        extra = getattr(args, "additional_config", None) or {}
        if isinstance(extra, str):
            extra = json.loads(extra)
        config = extra.get("dsg") if isinstance(extra, dict) else None
        if isinstance(config, dict) and config.get("audit_log"):
            self.index = AuditIndex(config["audit_log"])
        self.specials = await _special_tokens(engine_client, args)


async def _special_tokens(engine_client, args) -> list[str]:
    """The special tokens of the tokenizer the engine renders with (special_token_strings), or where the engine does
    not give it, of the one in the served folder; none, with a warning, where neither can be had (requests are then
    not checked for forged turns)."""
    get = getattr(engine_client, "get_tokenizer", None)
    if get is not None:
        try:
            tokenizer = get()
            tokenizer = await tokenizer if inspect.isawaitable(tokenizer) else tokenizer
            if tokenizer is not None:
                return special_token_strings(tokenizer)
        except Exception:  # noqa: BLE001, S110 (an engine without a tokenizer: read the folder's below)
            pass
    name = getattr(args, "tokenizer", None) or getattr(args, "model", None)
    try:
        from transformers import AutoTokenizer

        remote = bool(getattr(args, "trust_remote_code", False))
        revision = getattr(args, "tokenizer_revision", None)
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=remote, revision=revision)
    except Exception as e:  # noqa: BLE001 (any loader error: serve on, and say what is not checked)
        print(f"dsg: could not load the tokenizer of {name!r} ({e}); requests are not checked for the tokenizer's "
              "special tokens (forged turns).", file=sys.stderr)  # fmt: skip
        return []
    return special_token_strings(tokenizer)
