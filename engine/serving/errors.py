"""Errors of the HTTP service in the OpenAI error shape, one place for every status code:

    {"error": {"message": "...", "type": "...", "param": "field" | null, "code": "..." | null}}

Messages never echo unbounded input: `brief` cuts any text to MAX_MESSAGE characters."""
from __future__ import annotations

import json

MAX_MESSAGE = 500          # characters of a message (a longer one is cut, saying how much)
MAX_PARAM = 100            # characters of a param (a field name)

# status -> (type, code) of the OpenAI API's answers.
KINDS = {
    400: ("invalid_request_error", "invalid_value"),
    401: ("invalid_request_error", "invalid_api_key"),
    404: ("invalid_request_error", "not_found"),
    405: ("invalid_request_error", "method_not_allowed"),
    413: ("invalid_request_error", "request_too_large"),
    415: ("invalid_request_error", "unsupported_media_type"),
    429: ("rate_limit_error", "rate_limit_exceeded"),
    500: ("server_error", "server_error"),
    503: ("server_error", "service_unavailable"),
    504: ("timeout_error", "timeout"),
}


def brief(text, limit: int = MAX_MESSAGE) -> str:
    text = str(text)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text) - limit} more characters)"


def body_too_large(limit: int, headers: dict | None = None) -> "ApiError":
    return ApiError(413, f"the body is larger than {limit} bytes (--max-body-bytes)", headers=headers)


def compressed_body(content_encoding: str | None) -> "ApiError | None":
    """A compressed body (Content-Encoding gzip, br, ...) is refused by name: 415, not a JSON error
    about its bytes (and never inflated past the body limit)."""
    encoding = (content_encoding or "").strip().lower()
    if encoding and encoding != "identity":
        return ApiError(415, f"Content-Encoding {encoding[:40]!r} is not supported; send the JSON body "
                             "uncompressed", code="unsupported_media_type")
    return None


class ApiError(Exception):
    """An answer other than 200: its status, the error object and headers."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict | None = None, kind: str | None = None):
        super().__init__(message)
        self.status, self.param, self.headers = status, param, dict(headers or {})
        default_kind, default_code = KINDS.get(status, ("server_error" if status >= 500 else
                                                        "invalid_request_error", None))
        self.kind, self.code = kind or default_kind, code or default_code

    @property
    def payload(self) -> dict:
        return error_body(str(self), self.param, self.kind, self.code)


def error_body(message: str, param: str | None = None, kind: str = "invalid_request_error",
               code: str | None = None) -> dict:
    return {"error": {"message": brief(message), "type": kind,
                      "param": None if param is None else brief(param, MAX_PARAM), "code": code}}


def normalized(status: int, body: bytes) -> bytes | None:
    """The OpenAI-shaped body of an error answer that is not in that shape yet (a framework's
    404 / 405 / 500, LitServe's {"detail": ...}); None when it already is."""
    try:
        data = json.loads(body) if body else None
    except (ValueError, RecursionError):
        data = None
    if isinstance(data, dict) and isinstance(data.get("error"), dict) and "message" in data["error"]:
        return None
    detail = data.get("detail") if isinstance(data, dict) else None
    if isinstance(detail, dict) and isinstance(detail.get("error"), dict):
        payload = {"error": {"message": "", "type": None, "param": None, "code": None, **detail["error"]}}
        return json.dumps(payload).encode()
    if isinstance(detail, dict) and "message" in detail:      # {"detail": {"message", "type", "param"}}
        error = ApiError(status, detail["message"], detail.get("param"))
        return json.dumps(error.payload).encode()
    if detail is None:
        message = body.decode("utf-8", "replace").strip() if body and data is None else ""
    else:
        message = detail if isinstance(detail, str) else json.dumps(detail)
    return json.dumps(ApiError(status, message or DEFAULT_MESSAGES.get(status, f"HTTP {status}")).payload).encode()


DEFAULT_MESSAGES = {404: "Not Found", 405: "Method Not Allowed", 500: "Internal Server Error"}
