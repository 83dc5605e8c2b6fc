"""One error shape for every API error: {"error": {"code", "message", "details"}}."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from streamd import jsonsafe


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, details: Any = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details
        self.headers = headers or {}


def error_response(status: int, code: str, message: str, details: Any = None,
                   headers: dict[str, str] | None = None) -> web.Response:
    body = {"error": {"code": code, "message": message, "details": details}}
    return json_response(body, status=status, headers=headers)


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    """Every API body: JSON without NaN or Infinity (a stray one is written as null)."""
    return web.json_response(body, status=status, headers=headers, dumps=jsonsafe.dumps)


def validation_details(exc: Any) -> list[dict[str, Any]]:
    """pydantic errors as [{"path": "reconnect.max_s", "message": ...}]."""
    return [{"path": ".".join(str(p) for p in e["loc"]) or "<body>", "message": e["msg"], "type": e["type"]}
            for e in exc.errors()]
