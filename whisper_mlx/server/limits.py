"""A cap on request bodies, enforced before and while they are read (uploads never fill the disk)."""

from __future__ import annotations

import json

from .errors import bad_request

# the multipart envelope and the small text fields around the file
FORM_OVERHEAD_BYTES = 1024 * 1024
# a body over the limit is read and dropped up to this much, so the client gets the 400 rather than a reset
DRAIN_LIMIT_BYTES = 256 * 1024 * 1024


class UploadLimitMiddleware:
    """Answers 400 to a body declared larger than the upload limit, and stops one that grows past it."""

    def __init__(self, app, max_body_bytes: int):
        self.app = app
        self.max_file_bytes = max_body_bytes
        self.max_body_bytes = max_body_bytes + FORM_OVERHEAD_BYTES

    def too_large(self):
        return bad_request(f"file is larger than the limit of {self.max_file_bytes} bytes", param="file")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT"):
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            await drain(receive, int(declared))
            await send_error(send, self.too_large())
            return
        received = 0

        async def counted_receive():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_body_bytes:
                raise self.too_large()
            return message

        await self.app(scope, counted_receive, send)


async def drain(receive, declared: int) -> None:
    """Read and drop the body (up to DRAIN_LIMIT_BYTES) so the client finishes sending before the answer."""
    dropped = 0
    while dropped < min(declared, DRAIN_LIMIT_BYTES):
        message = await receive()
        if message["type"] != "http.request":
            return
        dropped += len(message.get("body", b""))
        if not message.get("more_body", False):
            return


async def send_error(send, error) -> None:
    body = json.dumps(error.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
