"""What `deep-repro serve` answers when it does not answer with predictions: one JSON line
`{"error_code": ..., "message": ...}` whose message is the model's own input check (which names
the problem, never the values) or a fixed sentence: no input, no stack trace, no internals.

`clean_error` rewrites MLflow's app's error responses so (`CleanErrors` holds them back to do
it); the guard's own refusals (serving/server.py) are raised as `Refused` and are clean already.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from deep_repro.serving import wire

log = logging.getLogger("deep_repro")

Message = MutableMapping[str, Any]
Send = Callable[[Message], Awaitable[None]]

HELD_BACK = 16 * 1024 * 1024  # bytes of an app's error body read: it may echo the whole input
# The model's own refusals (serving.to_pixels): they describe the input, never repeat it.
MODEL_MESSAGES = ("pixel values must", "expected images of 28x28")
TYPES = ("application/json", "text/csv", wire.NPY)  # what `deep-repro serve` takes


def error(status: int, code: str, message: str) -> tuple[int, bytes]:
    return status, json.dumps({"error_code": code, "message": message}).encode() + b"\n"


def clean_error(status: int, body: bytes) -> tuple[int, bytes]:
    """One JSON line for an error response of MLflow's app that holds no input or internals."""
    try:
        payload = json.loads(body)
        message = str(payload.get("message", "")) if isinstance(payload, dict) else ""
    except ValueError:
        message = body.decode("utf-8", "replace")
    # "Failed to predict data '<input>'. \nError: <the model's message>"
    reason = message.rsplit("Error: ", 1)[-1].strip()
    first = reason.splitlines()[0] if reason else ""
    if first.startswith(MODEL_MESSAGES) and "'" not in first:
        return error(400, "INVALID_PARAMETER_VALUE", first)
    if status == 404:
        return error(404, "ENDPOINT_NOT_FOUND", "no such endpoint")
    if status == 405:
        return error(405, "METHOD_NOT_ALLOWED", "method not allowed")
    if status == 415:
        return error(
            415,
            "UNSUPPORTED_MEDIA_TYPE",
            f"Content-Type must be {', '.join(TYPES[:-1])} or {TYPES[-1]} (UTF-8)",
        )
    if status == 504:
        return error(504, "TIMEOUT", "the request took longer than the server's time limit")
    if status >= 500:
        return error(500, "INTERNAL_ERROR", "internal server error (see the server log)")
    if "valid JSON formatted string" in message:
        return error(400, "BAD_REQUEST", "the body is not valid JSON")
    return error(
        400,
        "BAD_REQUEST",
        "the request does not hold images the model accepts: a JSON object with one of "
        f"{', '.join(wire.KEYS)} holding pixel values 0..255 shaped [N, 28, 28], "
        "[N, 1, 28, 28] or [N, 784]",
    )


class Refused(Exception):
    """A request the guard answers itself: `status` and the one-line JSON `body`."""

    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(status)
        self.status, self.body = status, body


def model_refusal(exc: Exception) -> tuple[int, bytes]:
    """What MLflow's app would say to the model's refusal (MlflowException), cleaned; anything
    else is a fault of the server's."""
    from mlflow.exceptions import MlflowException

    if isinstance(exc, MlflowException):
        return clean_error(400, json.dumps({"message": exc.message}).encode())
    log.error("the fast path failed", exc_info=exc)
    return clean_error(500, b"")


class CleanErrors:
    """Holds back an error response of the app and sends `clean_error`'s version instead."""

    def __init__(self, send: Send) -> None:
        self.send, self.status, self.body = send, 0, bytearray()

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = int(message["status"])
            if self.status < 400:
                await self.send(message)
            return
        if self.status < 400 or message["type"] != "http.response.body":
            await self.send(message)
            return
        if len(self.body) < HELD_BACK:
            self.body += message.get("body", b"")
        if message.get("more_body", False):
            return
        await send(self.send, *clean_error(self.status, bytes(self.body)), close=False)


async def send(to: Send, status: int, body: bytes, *, close: bool = True) -> None:
    """Answer with one of this module's error bodies; with `close` (the guard's own refusals)
    also end the connection, since what is left of a refused request's body is never read."""
    log.info("request refused: HTTP %d %s", status, json.loads(body)["error_code"])
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await to(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [*headers, (b"connection", b"close")] if close else headers,
        }
    )
    await to({"type": "http.response.body", "body": body})
