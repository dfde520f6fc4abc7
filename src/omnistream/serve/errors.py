"""Errors in the OpenAI shape: ``{"error": {"message", "type", "param", "code"}}``."""

from __future__ import annotations

from fastapi.responses import JSONResponse
from pydantic import BaseModel

_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    408: "timeout_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
}


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorBody(BaseModel):
    """OpenAI's error shape (the OpenAPI schema of every 4xx/5xx answer)."""

    error: ErrorDetail


class APIError(Exception):
    """An error answered as JSON in the OpenAI shape."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, type: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _TYPES.get(status, "invalid_request_error" if status < 500
                                       else "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def error_body(status: int, message: str, param: str | None = None,
               code: str | None = None) -> dict:
    return APIError(status, message, param, code).body()


def _param(loc: tuple) -> str:
    """``("body", "messages", 0, "content")`` -> ``"messages[0].content"``.

    Pydantic puts union members in the location (``"str"``, ``"list[...]"``, a tagged union's tag,
    which is the part's own field name for media parts); only request field names and indexes are
    kept."""
    from .inputs import FIELD_NAMES

    out = ""
    last: object = None
    for x in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(x, int):
            out += f"[{x}]"
        elif x in FIELD_NAMES and x != last:
            out += f".{x}" if out else x
        else:
            continue
        last = x
    return out


def _code(kind: str) -> str:
    if kind == "missing":
        return "missing_required_parameter"
    if kind.endswith("_type"):
        return "invalid_type"
    return "invalid_value"


def validation_error(errors: list[dict]) -> APIError:
    """FastAPI's request validation errors -> one 400 naming the offending field.

    A union reports one error per member; the deepest location is the likeliest culprit, and the
    members' messages at it are joined ("a valid string, or a valid list")."""
    if not errors:
        return APIError(400, "invalid request", code="invalid_request")
    for e in errors:
        if e.get("type") == "json_invalid":
            why = (e.get("ctx") or {}).get("error", e.get("msg", ""))
            return APIError(400, f"We could not parse the JSON body of your request: {why}",
                            code="invalid_json")
    located = []
    for e in errors:
        p = _param(tuple(e.get("loc", ())))
        if e.get("type") in ("union_tag_invalid", "union_tag_not_found"):  # name the tag field
            tag = str((e.get("ctx") or {}).get("discriminator", "")).strip("'")
            p = f"{p}.{tag}" if p and tag else p
        located.append((p, e))
    depth = max(p.count(".") + p.count("[") + bool(p) for p, _ in located)
    param, first = next((p, e) for p, e in located
                        if p.count(".") + p.count("[") + bool(p) == depth)
    msgs: list[str] = []
    for p, e in located:
        m = str(e.get("msg", "")).removeprefix("Value error, ")
        if p == param and m not in msgs:
            msgs.append(m)
    kind = str(first.get("type", ""))
    if not param and kind == "missing":
        return APIError(400, "the request body is missing (send a JSON object)",
                        code="missing_required_parameter")
    where = param or "the request body"
    return APIError(400, f"{where}: {', or '.join(msgs)}", param=param or None, code=_code(kind))
