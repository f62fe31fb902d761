"""Errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}` with an HTTP status."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class APIError(Exception):
    """A request the server answers with `status` and OpenAI's error body; raised by the request handlers."""

    status: int
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None

    def __str__(self) -> str:
        return self.message

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, "invalid_request_error", param, code)


def unauthorized(message: str) -> APIError:
    return APIError(401, message, "invalid_request_error", None, "invalid_api_key")


def queue_full(limit: int) -> APIError:
    message = f"the server is busy: {limit} requests are already queued or decoding; retry later"
    return APIError(503, message, "server_error", None, "queue_full")


def server_error(message: str) -> APIError:
    return APIError(500, message, "server_error", None, None)
