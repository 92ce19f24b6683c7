"""The API-server half of the vLLM plugin: each completion response says whether a guardrail gated it.

Entry point `vllm.endpoint_plugins: dsg_http` (loaded when `VLLM_PLUGINS` names it, as `dsg serve` does). Every
`/v1/completions` and `/v1/chat/completions` request gets an `X-Request-Id` (the client's, or a fresh one), which
vLLM turns into the engine's request id; the engine side (runtime/vllm.py) appends each gate decision to the audit
log under that id, and this plugin answers from the log:

  * response headers `x-dsg-gated` (true when any guardrail gated the request, on its prompt or latched while
    decoding) and `x-dsg-rho` (each guardrail's rho, comma-separated); a streamed response carries its prompt's
    decision (sent with the first chunk);
  * `GET /v1/dsg/decisions/{request_id}`: every audit record of a request.
"""

from __future__ import annotations

import asyncio
import json
import threading
import uuid
from pathlib import Path

GUARDED_PATHS = ("/v1/completions", "/v1/chat/completions")
PREFIXES = ("chatcmpl-", "cmpl-")


class AuditIndex:
    """The audit log, read incrementally: records by the client-facing request id."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.offset = 0
        self.partial = b""
        self.by_id: dict[str, list[dict]] = {}
        self.lock = threading.Lock()

    @staticmethod
    def base_id(engine_request_id: str) -> str:
        """`chatcmpl-<id>-<8 hex>` (or `cmpl-<id>-<i>-<8 hex>`) -> `<id>`."""
        rid = engine_request_id
        for prefix in PREFIXES:
            if rid.startswith(prefix):
                rid = rid[len(prefix) :]
                break
        rid = rid.rsplit("-", 1)[0]  # vLLM's random suffix
        return rid

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
                rid = str(record.get("request_id", ""))
                base = self.base_id(rid)
                self.by_id.setdefault(base, []).append(record)
                if rid.startswith("cmpl-") and "-" in base:  # completions: `cmpl-<id>-<prompt index>-<suffix>`
                    self.by_id.setdefault(base.rsplit("-", 1)[0], []).append(record)

    def records(self, request_id: str) -> list[dict]:
        self.refresh()
        return list(self.by_id.get(request_id, []))


def summary(records: list[dict]) -> dict[str, str]:
    """The response headers for a request's audit records."""
    latest: dict[str, dict] = {}
    gated = False
    for r in records:
        latest.setdefault(r.get("guardrail", "?"), r)
        if r.get("event") == "prompt":
            latest[r.get("guardrail", "?")] = r
        gated = gated or bool(r.get("gated"))
    return {
        "x-dsg-gated": "true" if gated else "false",
        "x-dsg-rho": ",".join(f"{v.get('rho', 0):.6g}" for v in latest.values()),
    }


class DSGEndpoint:
    """vLLM endpoint plugin: the decision headers and the decisions route."""

    name = "dsg_http"
    required_tasks = ("generate",)

    def __init__(self):
        self.index: AuditIndex | None = None

    async def _records(self, request_id: str, wait: float) -> list[dict]:
        deadline = asyncio.get_running_loop().time() + wait
        while True:
            found = self.index.records(request_id) if self.index is not None else []
            if found or asyncio.get_running_loop().time() >= deadline:
                return found
            await asyncio.sleep(0.01)

    def attach_router(self, app) -> None:
        from fastapi.responses import JSONResponse
        from starlette.responses import StreamingResponse

        plugin = self

        @app.get("/v1/dsg/decisions/{request_id}")
        async def decisions(request_id: str):
            return JSONResponse({"request_id": request_id, "records": await plugin._records(request_id, 0.0)})

        @app.middleware("http")
        async def gate_headers(request, call_next):
            if plugin.index is None or request.url.path not in GUARDED_PATHS or request.method != "POST":
                return await call_next(request)
            rid = request.headers.get("x-request-id")
            if not rid:
                rid = uuid.uuid4().hex
                request.scope["headers"] = [*request.scope["headers"], (b"x-request-id", rid.encode())]
            response = await call_next(request)
            if response.status_code != 200:
                return response
            body = response.body_iterator
            first = None
            async for chunk in body:  # the first chunk comes once the prompt has been through the engine
                first = chunk
                break
            headers = dict(response.headers) | {"x-request-id": rid}
            records = await plugin._records(rid, 5.0)
            if records:
                headers |= summary(records)

            async def rest():
                if first is not None:
                    yield first
                async for chunk in body:
                    yield chunk

            return StreamingResponse(rest(), status_code=response.status_code, headers=headers,
                                     media_type=response.media_type)  # fmt: skip

    async def init_state(self, engine_client, state, args) -> None:
        extra = getattr(args, "additional_config", None) or {}
        if isinstance(extra, str):
            extra = json.loads(extra)
        config = extra.get("dsg") if isinstance(extra, dict) else None
        if isinstance(config, dict) and config.get("audit_log"):
            self.index = AuditIndex(config["audit_log"])
