"""OpenAI-style errors: every failure answers `{"error": {"message", "type", "param", "code"}}`.

Bad input is always a 4xx that names the offending field; only a failure inside the cluster (a replica that died
while serving) is a 5xx, and then a 503 a client may retry.
"""
from __future__ import annotations

import json

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
         404: "not_found_error", 405: "invalid_request_error", 409: "invalid_request_error",
         413: "invalid_request_error", 415: "invalid_request_error", 422: "invalid_request_error",
         429: "rate_limit_error", 503: "service_unavailable"}


UNION_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or TYPES.get(status, "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)

    def sse(self) -> str:
        """The error as one server-sent event (a stream that has already started cannot change its status)."""
        return f"data: {json.dumps(self.body())}\n\n"


def _field_path(error: dict) -> str | None:
    """The field path, without FastAPI's "body" or "query" root and pydantic's union-member tags ("str",
    "list[...]")."""
    parts = [str(p) for p in error.get("loc", ())
             if p not in ("body", "query") and p not in UNION_TAGS and "[" not in str(p) and "-" not in str(p)]
    return ".".join(parts) or None


def validation_error(exc: RequestValidationError) -> APIError:
    """The first problem as one readable message; `param` is its field path. For a union (e.g. `stop`: a string
    or a list), the member that matches the input's type explains best, so a type-mismatch error goes last."""
    errors = exc.errors()
    if not errors:
        return APIError(400, "invalid request", code="invalid_request")
    first = next((e for e in errors if not e.get("type", "").endswith("_type")), errors[0])
    param = _field_path(first)
    kind = first.get("type", "invalid")
    if kind == "json_invalid":
        return APIError(400, f"request body is not valid JSON: {first.get('msg', '')}".rstrip(": "),
                        code="invalid_json")
    if kind == "extra_forbidden":
        message = f"unknown field {param!r} (see docs/serving.md for the supported fields)"
    elif kind == "missing":
        message = f"missing required field {param!r}"
    else:
        message = f"{param or 'body'}: {first.get('msg', 'invalid value')}"
    others = {_field_path(e) for e in errors} - {param}
    more = f" (and problems with {', '.join(sorted(str(o) for o in others))})" if others else ""
    return APIError(400, message + more, param=param, code=kind)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        return validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code in (404, 405) and message in ("Not Found", "Method Not Allowed"):
            message = f"no route {request.method} {request.url.path} (see /docs)"
        code = {404: "unknown_route", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return APIError(exc.status_code, message, code=code).response()
