"""API keys (`serve --api-key`, or AFDSERVE_API_KEY): every /v1 route needs one, as in vLLM,
and so does every /admin route (draining attention workers).

A request to a path under /v1 or /admin must carry `Authorization: Bearer KEY` with one of the keys,
else it is answered 401 in OpenAI's error shape before any route runs. Everything else stays
open, as vLLM leaves it: /health, /ping, /metrics, /version and the tokenizer routes, which
load balancers, Prometheus and evaluation harnesses call without a key. CORS preflights
(OPTIONS) pass too. Keys are compared as SHA-256 digests in constant time, so the time an
answer takes says nothing about how much of a key was right.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import Sequence

from starlette.types import ASGIApp, Receive, Scope, Send

from afdserve.server.errors import Unauthorized

PROTECTED_PREFIXES = ("/v1", "/admin")
"""The OpenAI routes (as vLLM) and the operator's (draining attention workers)."""


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


class APIKeyMiddleware:
    def __init__(self, app: ASGIApp, api_keys: Sequence[str]) -> None:
        if not api_keys or not all(api_keys):
            raise ValueError("APIKeyMiddleware needs non-empty keys")
        self.app = app
        self._digests = [_digest(k) for k in api_keys]

    def authorized(self, header: str | None) -> bool:
        if not header:
            return False
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer":
            return False
        given = _digest(key.strip())
        ok = False
        for d in self._digests:  # no early exit: every key costs the same
            ok |= secrets.compare_digest(given, d)
        return ok

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] == "OPTIONS":
            await self.app(scope, receive, send)
            return
        path = scope["path"].removeprefix(scope.get("root_path", "") or "")
        if not any(path == p or path.startswith(p + "/") for p in PROTECTED_PREFIXES):
            await self.app(scope, receive, send)
            return
        header = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                header = value.decode("latin-1")
                break
        if self.authorized(header):
            await self.app(scope, receive, send)
            return
        err = Unauthorized(
            "a valid API key is required: send `Authorization: Bearer <key>`"
            if header is None
            else "the API key is not valid"
        )
        body = json.dumps(err.body()).encode()
        await send(
            {
                "type": "http.response.start",
                "status": err.status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"www-authenticate", b"Bearer"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
