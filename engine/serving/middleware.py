"""The ASGI middleware in front of the service (the plain FastAPI app and the LitServe adapter):

* `X-Request-ID`: taken from the request (printable, at most 128 characters) or made; returned
  in the answer, kept in `scope["state"]["request_id"]` for the handlers, and in the access log;
* a body size limit: a POST body over `max_body_bytes` is answered 413 before it is read in full
  (a Content-Length over the limit is refused without reading anything); a compressed body
  (Content-Encoding other than identity) is 415;
* API keys: with `api_keys`, every path under /v1/ needs `Authorization: Bearer <key>` (else 401);
  /health, /metrics and the OpenAPI document stay open (probes and scrapers; see docs/serving.md);
* cheap refusals: `refuse(scope)` (the app's: draining, not ready, the queue full) answers 503 /
  429 before the body is read or routed; a refusal is answered after `reject_delay` seconds (an
  asyncio sleep, no CPU), so clients that retry at once on 429 cannot turn the server into a
  loop of refusals that starves the sampling worker (see docs/serving.md, retry flood);
* every error answer in the OpenAI error shape, whatever produced it (a framework's 404 / 405,
  LitServe's {"detail": ...}, an unhandled exception: 500 with a short message, logged);
* one JSON line per request on the `engine.serving.access` logger: time, request id, method,
  path, status, duration, client, bytes sent."""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import time
import uuid

from .errors import ApiError, body_too_large, brief, compressed_body, normalized

access_log = logging.getLogger("engine.serving.access")
log = logging.getLogger("engine.serving")
DEFAULT_MAX_BODY = 1 << 20        # 1 MiB: a request body is a few hundred bytes (a prompt up to 32 KB)
REQUEST_ID = re.compile(r"[\x21-\x7e]{1,128}")


class ServingMiddleware:
    def __init__(self, app, max_body_bytes: int = DEFAULT_MAX_BODY, api_keys=(), on_response=None,
                 open_paths=("/health", "/metrics", "/openapi.json", "/docs", "/redoc"), refuse=None,
                 reject_delay: float = 0.0):
        self.app = app
        self.refuse, self.reject_delay = refuse, float(reject_delay)
        self.max_body_bytes = int(max_body_bytes)
        self.api_keys = [k.encode() for k in api_keys]
        self.on_response = on_response
        self.open_paths = tuple(open_paths)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", ())}
        given = headers.get("x-request-id", "")
        request_id = given if REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        sent = {"status": 0, "bytes": 0}
        id_header = (b"x-request-id", request_id.encode())

        async def send_shaped(message):
            """Adds X-Request-ID; an error answer not in the OpenAI shape is rewritten."""
            if message["type"] == "http.response.start":
                sent["status"] = message["status"]
                message = {**message, "headers": [*message.get("headers", []), id_header]}
                if message["status"] >= 400:
                    sent["held"] = message        # the body decides whether it is rewritten
                    sent["body"] = b""
                    return
            elif message["type"] == "http.response.body" and "held" in sent:
                sent["body"] += message.get("body", b"")
                if message.get("more_body"):
                    return
                start_message, body = sent.pop("held"), sent.pop("body")
                fixed = normalized(start_message["status"], body)
                if fixed is not None:
                    body = fixed
                    kept = [(k, v) for k, v in start_message["headers"]
                            if k.lower() not in (b"content-length", b"content-type")]
                    start_message = {**start_message, "headers": kept + [
                        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]}
                    if start_message["status"] in (429, 503) and not any(k.lower() == b"retry-after" for k, _ in kept):
                        start_message["headers"].append((b"retry-after", b"1"))
                await send(start_message)
                message = {"type": "http.response.body", "body": body}
            if message["type"] == "http.response.body":
                sent["bytes"] += len(message.get("body", b""))
            await send(message)

        try:
            refusal = self._unauthorized(scope, headers)
            if refusal is None and self.refuse is not None:
                refusal = self.refuse(scope)
                if refusal is not None and self.reject_delay > 0:
                    await asyncio.sleep(self.reject_delay)
            if refusal is None:
                refusal = self._too_large(headers)
            if refusal is None and scope["method"] in ("POST", "PUT", "PATCH"):
                refusal = compressed_body(headers.get("content-encoding"))
                if refusal is None:
                    receive, refusal = await self._buffer(receive, headers)
            if refusal is not None:
                await _answer(send_shaped, refusal)
            else:
                await self.app(scope, receive, send_shaped)
        except Exception as err:   # noqa: BLE001 - a 500 in the OpenAI shape, never a stack trace
            log.error("request %s %s %s failed: %s: %s", request_id, scope["method"], scope["path"],
                      type(err).__name__, brief(err, 300), exc_info=err)
            if not sent["status"]:
                await _answer(send_shaped, ApiError(500, f"internal error ({type(err).__name__}); "
                                                    f"request id {request_id}"))
        finally:
            if self.on_response is not None and sent["status"]:
                self.on_response(sent["status"])
            if access_log.isEnabledFor(logging.INFO):
                self._log(scope, request_id, sent, start)

    @staticmethod
    def _log(scope, request_id, sent, start) -> None:
        client = scope.get("client") or ("", 0)
        access_log.info(json.dumps({
            "time": round(time.time(), 3), "request_id": request_id, "method": scope["method"],
            "path": brief(scope["path"], 200), "status": sent["status"],
            "duration_ms": round(1000 * (time.perf_counter() - start), 2),
            "client": f"{client[0]}:{client[1]}", "bytes": sent["bytes"]}))

    def _unauthorized(self, scope, headers) -> ApiError | None:
        if self.api_keys and scope["path"].startswith("/v1/") and not scope["path"].startswith(self.open_paths):
            auth = headers.get("authorization", "")
            if not auth:
                return ApiError(401, "no API key given: send the header 'Authorization: Bearer <key>'",
                                headers={"WWW-Authenticate": "Bearer"})
            scheme, _, key = auth.partition(" ")
            key = key.strip().encode("latin-1", "replace")
            if scheme.lower() != "bearer" or not any(hmac.compare_digest(key, k) for k in self.api_keys):
                return ApiError(401, "incorrect API key", headers={"WWW-Authenticate": "Bearer"})
        return None

    def _too_large(self, headers) -> ApiError | None:
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
            if length.isdigit():
                return body_too_large(self.max_body_bytes)
            return ApiError(400, "the Content-Length header is not a number")
        return None

    async def _buffer(self, receive, headers):
        """The whole body (at most max_body_bytes), then a receive that replays it and passes
        on what follows (the client's disconnect)."""
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return _replay(b"".join(chunks), receive, disconnected=True), None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return receive, body_too_large(self.max_body_bytes, {"Connection": "close"})
            chunks.append(chunk)
            if not message.get("more_body"):
                return _replay(b"".join(chunks), receive), None


def _replay(body: bytes, receive, disconnected: bool = False):
    done = False

    async def replay():
        nonlocal done
        if not done:
            done = True
            return {"type": "http.request", "body": body, "more_body": False}
        if disconnected:
            return {"type": "http.disconnect"}
        return await receive()
    return replay


async def _answer(send, error: ApiError) -> None:
    body = json.dumps(error.payload).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), str(v).encode()) for k, v in error.headers.items()]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
