"""The request body of POST /v1/images/generations (the OpenAI Images fields + the engine's), its
checks, and the OpenAPI document the service publishes (bounds, required fields, every error
response, /metrics as Prometheus text)."""
from __future__ import annotations

import json
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, StrictInt, StrictStr

from ..core.fast import BATCHABLE
from .errors import ApiError, brief
from .scheduler import MAX_PARTIAL_IMAGES, MAX_PRIORITY, MAX_SEED

MAX_PROMPT = 32000           # characters (the OpenAI API's bound)
MAX_JSON_DEPTH = 16          # default nesting limit of a body (the request itself is flat)
Short = Field(default=None, max_length=256)


def _integral(value):
    """JSON Schema's integers include 2.0: a float with an integral value is that integer."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2 ** 63:
        return int(value)
    return value


Int = Annotated[StrictInt, BeforeValidator(_integral)]


class ImageGenerationRequest(BaseModel):
    """The body of POST /v1/images/generations (OpenAI Images shape + engine extensions)."""
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    prompt: Optional[StrictStr] = Field(default=None, max_length=MAX_PROMPT)
    class_label: Optional[Int] = None
    n: Int = 1
    response_format: Literal["b64_json"] = "b64_json"
    output_format: Optional[Literal["png", "jpeg", "webp"]] = None
    background: Optional[Literal["auto", "opaque"]] = None
    size: Optional[StrictStr] = Short
    model: Optional[StrictStr] = Short
    user: Optional[StrictStr] = Short
    safety_identifier: Optional[StrictStr] = Short
    quality: Optional[StrictStr] = Short
    style: Optional[StrictStr] = Short
    moderation: Optional[StrictStr] = Short
    output_compression: Optional[Int] = Field(default=None, ge=0, le=100)
    stream: Optional[StrictBool] = None
    partial_images: Optional[Int] = Field(default=None, ge=0, le=MAX_PARTIAL_IMAGES)
    seed: Optional[Int] = None
    num_iter: Optional[Int] = None
    cfg: Optional[float] = Field(default=None, strict=True)
    cfg_schedule: Optional[StrictStr] = Short
    temperature: Optional[float] = Field(default=None, strict=True)
    top_k: Optional[Int] = None      # models with categorical tokens (their settings say which)
    top_p: Optional[float] = Field(default=None, strict=True)
    # fast= modes (docs/fast.md): "exact", "disa", "disa+lazy", or {"disa": {"lower": 5}}
    fast: Optional[Union[StrictStr, dict[str, Optional[dict[str, Any]]]]] = None
    timeout: Optional[float] = Field(default=None, strict=True)
    priority: Optional[Int] = Field(default=None, ge=-MAX_PRIORITY, le=MAX_PRIORITY)


def parse_json(raw, max_depth: int = MAX_JSON_DEPTH):
    """A body's JSON value; ApiError 400 for bytes that are not JSON or nest deeper than
    `max_depth`."""
    if isinstance(raw, (bytes, bytearray, str)):
        try:
            raw = json.loads(raw)
        except RecursionError:
            raise ApiError(400, f"the body nests deeper than {max_depth} levels") from None
        except (ValueError, UnicodeDecodeError) as err:
            raise ApiError(400, f"the body must be a JSON object: {brief(err, 200)}") from None
    if depth(raw, max_depth) > max_depth:
        raise ApiError(400, f"the body nests deeper than {max_depth} levels")
    return raw


def depth(value, limit: int) -> int:
    """Nesting depth of a JSON value (counted up to limit + 1, without recursion)."""
    level, frontier = 0, [value]
    while frontier and level <= limit:
        children = []
        for v in frontier:
            if isinstance(v, dict):
                children += v.values()
            elif isinstance(v, list):
                children += v
        if children or any(isinstance(v, (dict, list)) for v in frontier):
            level += 1
        frontier = children
    return level


def parse_body(raw, max_depth: int = MAX_JSON_DEPTH) -> ImageGenerationRequest:
    """A request body (JSON bytes / str, or an already decoded dict) checked field by field;
    raises ApiError 400 with `param` naming the first bad field."""
    from pydantic import ValidationError

    raw = parse_json(raw, max_depth)
    if not isinstance(raw, dict):
        raise ApiError(400, f"the body must be a JSON object, got {type(raw).__name__}")
    try:
        return ImageGenerationRequest.model_validate(raw)
    except ValidationError as err:
        first = err.errors(include_url=False, include_input=False)[0]
        loc = first.get("loc", ())
        field = str(loc[0]) if loc else None   # the top-level field (a union's member names are not fields)
        message = first.get("msg", "invalid value")
        code = "invalid_value"
        if first.get("type") == "extra_forbidden":
            message, code = "unknown field (see docs/serving.md for the accepted ones)", "unknown_parameter"
        raise ApiError(400, f"{brief(field, 100)}: {message}" if field else message, field, code) from None


# OpenAPI ----------------------------------------------------------------------------------------
ERROR_SCHEMA = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["message", "type", "param", "code"],
    "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                   "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}}}
ERROR_TEXT = {400: "invalid request (param names the field)", 401: "missing or wrong API key",
              404: "not found", 405: "method not allowed", 413: "body larger than --max-body-bytes",
              415: "a compressed body (Content-Encoding)",
              429: "the queue is full (Retry-After)", 500: "sampling failed", 503: "loading or draining (Retry-After)",
              504: "past the request's deadline"}


def _errors(*codes) -> dict:
    return {str(c): {"description": ERROR_TEXT[c], "content": {"application/json": {
        "schema": {"$ref": "#/components/schemas/Error"}}}} for c in codes}


def openapi(app_schema: dict, *, max_images: int, classes: int | None, text_model: bool, auth: bool,
            max_num_iter: int, size: str | None = None, settings: set | None = None,
            fast_modes: tuple | None = None) -> dict:
    """FastAPI's document with what the routes take raw filled in. Where the server's own bound
    depends on more than one field (cfg and temperature overflow float32 with some schedules
    and weights), the document states a range the server always accepts."""
    body = _json_schema_keywords(ImageGenerationRequest.model_json_schema())
    props = body["properties"]
    props["n"].update(minimum=1, maximum=max_images)
    props["seed"] = {"anyOf": [{"type": "integer", "minimum": 0, "maximum": MAX_SEED}, {"type": "null"}]}
    props["num_iter"] = {"anyOf": [{"type": "integer", "minimum": 1, "maximum": max_num_iter}, {"type": "null"}]}
    props["temperature"] = {"anyOf": [{"type": "number", "exclusiveMinimum": 0, "maximum": 100},
                                      {"type": "null"}]}
    props["cfg"] = {"anyOf": [{"type": "number", "minimum": -1e4, "maximum": 1e4}, {"type": "null"}]}
    props["timeout"] = {"anyOf": [{"type": "number", "minimum": 1, "maximum": 1e6}, {"type": "null"}],
                        "description": "seconds (any value > 0; past it the answer is 504)"}
    if size is not None:
        props["size"] = {"anyOf": [{"enum": [size, "auto"]}, {"type": "null"}]}
    props["cfg_schedule"] = {"anyOf": [{"enum": ["linear", "constant"]}, {"type": "null"}]}
    props["top_k"] = {"anyOf": [{"type": "integer", "minimum": 1, "maximum": 1 << 30}, {"type": "null"}]}
    props["top_p"] = {"anyOf": [{"type": "number", "exclusiveMinimum": 0, "maximum": 1}, {"type": "null"}]}
    batchable = ["exact"] + [m for m in (fast_modes or ()) if m in BATCHABLE]
    props["fast"] = {"anyOf": [{"enum": batchable}, {"type": "null"}],
                     "description": "opt-in approximate sampling (docs/fast.md): the modes of this model that "
                                    "share a batch; the object form {method: {parameter: value}} is accepted too"}
    for name in ("top_k", "top_p", "fast"):   # only the settings the served model takes (`settings`)
        if settings is not None and name not in settings:
            props.pop(name)
    if text_model:
        body["required"] = ["prompt"]
        props["prompt"] = {"type": "string", "minLength": 1, "maxLength": MAX_PROMPT, "pattern": r"\S"}
        props.pop("class_label")
    elif classes is not None:
        props["class_label"] = {"anyOf": [{"type": "integer", "minimum": 0, "maximum": classes - 1}, {"type": "null"}]}
        props["prompt"] = {"anyOf": [{"type": "string", "maxLength": MAX_PROMPT}, {"type": "null"}],
                           "description": "a class number (\"7\"); read when class_label is missing"}
        numbers = "|".join(str(k) for k in range(classes)) if classes <= 1000 else "[0-9]{1,3}"
        body["anyOf"] = [{"required": ["class_label"], "properties": {"class_label": {"type": "integer"}}},
                         {"required": ["prompt"], "properties": {"prompt": {
                             "type": "string", "pattern": f"^0*({numbers})$"}}}]
    doc = dict(app_schema)
    doc.setdefault("components", {}).setdefault("schemas", {})
    doc["components"]["schemas"].update(Error=ERROR_SCHEMA, ImageGenerationRequest=body)
    auth_errors = (401,) if auth else ()
    image = {"type": "object", "required": ["b64_json"], "properties": {
        "b64_json": {"type": "string"}, "seed": {"type": "integer"}}}
    images = {"type": "object", "required": ["created", "data"], "properties": {
        "created": {"type": "integer"}, "data": {"type": "array", "items": image},
        "background": {"const": "opaque"}, "output_format": {"enum": ["png", "jpeg", "webp"]},
        "quality": {"const": "auto"}, "size": {"type": "string"},
        "seed": {"type": "integer"}, "settings": {"type": "object"}}}
    model = {"type": "object", "required": ["id", "object", "created", "owned_by"], "properties": {
        "id": {"type": "string"}, "object": {"const": "model"}, "created": {"type": "integer"},
        "owned_by": {"type": "string"}}}
    paths = doc.setdefault("paths", {})
    paths["/v1/images/generations"] = {"post": {
        "summary": "Generate images (OpenAI Images API)", "operationId": "createImage",
        "requestBody": {"required": True, "content": {"application/json": {
            "schema": {"$ref": "#/components/schemas/ImageGenerationRequest"}}}},
        "responses": {"200": {"description": "the images; with stream=true server-sent events "
                              "(image_generation.partial_image, then image_generation.completed)",
                              "content": {"application/json": {"schema": images},
                                          "text/event-stream": {"schema": {"type": "string"}}}},
                      **_errors(400, *auth_errors, 413, 415, 429, 500, 503, 504)}}}
    paths["/v1/models"] = {"get": {"summary": "The served model", "operationId": "listModels", "responses": {
        "200": {"description": "a list of one model", "content": {"application/json": {"schema": {
            "type": "object", "required": ["object", "data"], "properties": {
                "object": {"const": "list"}, "data": {"type": "array", "items": model}}}}}},
        **_errors(*auth_errors)}}}
    paths["/v1/models/{model_id}"] = {"get": {
        "summary": "One model", "operationId": "retrieveModel",
        "parameters": [{"name": "model_id", "in": "path", "required": True, "schema": {"type": "string"}}],
        "responses": {"200": {"description": "the model", "content": {"application/json": {"schema": model}}},
                      **_errors(*auth_errors, 404)}}}
    paths["/health"] = {"get": {"summary": "Readiness", "operationId": "health", "responses": {
        "200": {"description": "serving", "content": {"application/json": {"schema": {"type": "object"}}}},
        "503": {"description": "loading, failed or draining (Retry-After)",
                "content": {"application/json": {"schema": {"type": "object"}}}}}}}
    paths["/metrics"] = {"get": {"summary": "Prometheus metrics", "operationId": "metrics", "responses": {
        "200": {"description": "Prometheus text exposition format",
                "content": {"text/plain": {"schema": {"type": "string"}}}}}}}
    if auth:
        doc["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        for path in ("/v1/images/generations", "/v1/models", "/v1/models/{model_id}"):
            for op in paths[path].values():
                op["security"] = [{"bearer": []}]
    return doc


def _json_schema_keywords(schema):
    """pydantic writes the bounds of an Annotated integer as ge / le: JSON Schema's minimum / maximum."""
    if isinstance(schema, dict):
        names = {"ge": "minimum", "le": "maximum", "gt": "exclusiveMinimum", "lt": "exclusiveMaximum"}
        return {names.get(k, k) if not isinstance(v, (dict, list)) else k: _json_schema_keywords(v)
                for k, v in schema.items()}
    if isinstance(schema, list):
        return [_json_schema_keywords(v) for v in schema]
    return schema
