"""`deep-repro serve`: MLflow's own scoring app (what `mlflow models serve` runs) behind an ASGI
middleware that bounds what one request may cost and what an error may say.

Why not plain `mlflow models serve`: MLflow 3.17's scoring server reads the whole body before the
model runs (100,000 images: ~10 GB), and rewrites a model's error as "Failed to predict data
'<the input>'" plus, for unexpected errors, a stack trace. Nothing inside the pyfunc model can
prevent either. So, in front of the unchanged app:

- a body over `max_body` bytes is refused with 413 from its Content-Length, before any of it is
  read; without one (chunked), reading stops at the limit;
- a batch of more than `max_batch` images is refused with 413, before MLflow parses the body;
- every error body becomes one JSON line `{"error_code": ..., "message": ...}` whose message is
  either the model's own input check (which names the problem, never the values) or a fixed
  sentence: no input, no stack trace, no internals.

The payloads are MLflow's: `/invocations` (`inputs`, `instances`, `dataframe_split`,
`dataframe_records`, CSV), `/ping`, `/health`, `/version`.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

log = logging.getLogger("deep_repro")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]

DEFAULT_MAX_BODY = 16 * 1024 * 1024  # ~5,000 images as JSON integers
DEFAULT_MAX_BATCH = 1024  # images per request: bounds the model's memory and one call's time
PIXELS = 784
# The model's own refusals (serving.to_pixels): they describe the input, never repeat it.
MODEL_MESSAGES = ("pixel values must", "expected images of 28x28")
MLFLOW_KEYS = ("inputs", "instances", "dataframe_split", "dataframe_records")


def _error(status: int, code: str, message: str) -> tuple[int, bytes]:
    return status, json.dumps({"error_code": code, "message": message}).encode() + b"\n"


class TooDeep(ValueError):
    """A JSON body nested deeper than Python's parser goes."""


def _batch_size(body: bytes, content_type: str) -> int | None:
    """Images in a request, from its structure (None: unknown, MLflow will judge the body)."""
    mime = content_type.split(";")[0].strip().lower()
    if mime == "text/csv":
        # splitlines: pandas takes \r, \r\n and \n as row ends alike, so must the count
        return max(len(body.splitlines()) - 1, 0)  # one header line
    if mime != "application/json":
        return None  # parquet: the body limit alone bounds it
    try:
        payload = json.loads(body)
    except ValueError:
        return None
    except RecursionError:  # [[[[...]]]]: would escape MLflow's handler as a bare 500
        raise TooDeep from None
    if not isinstance(payload, dict):
        return None
    if isinstance(payload.get("dataframe_split"), dict):
        rows = payload["dataframe_split"].get("data")
        return len(rows) if isinstance(rows, list) else None
    if isinstance(payload.get("dataframe_records"), list):
        return len(payload["dataframe_records"])
    value = payload.get("inputs", payload.get("instances"))
    # The shape from the first element at each depth: [N,28,28], [N,1,28,28], [N,784] or a flat
    # list of N*784 values all come out as N (a ragged array is MLflow's to refuse).
    total = 1
    while isinstance(value, list):
        total *= len(value)
        if not value:
            break
        value = value[0]
    return math.ceil(total / PIXELS) if total else None


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
        return _error(400, "INVALID_PARAMETER_VALUE", first)
    if status == 404:
        return _error(404, "ENDPOINT_NOT_FOUND", "no such endpoint")
    if status == 405:
        return _error(405, "METHOD_NOT_ALLOWED", "method not allowed")
    if status == 415:
        return _error(
            415,
            "UNSUPPORTED_MEDIA_TYPE",
            "Content-Type must be application/json, text/csv or application/x-parquet (UTF-8)",
        )
    if status == 504:
        return _error(504, "TIMEOUT", "the request took longer than the server's time limit")
    if status >= 500:
        return _error(500, "INTERNAL_ERROR", "internal server error (see the server log)")
    if "valid JSON formatted string" in message:
        return _error(400, "BAD_REQUEST", "the body is not valid JSON")
    return _error(
        400,
        "BAD_REQUEST",
        "the request does not hold images the model accepts: a JSON object with one of "
        f"{', '.join(MLFLOW_KEYS)} holding pixel values 0..255 shaped [N, 28, 28], "
        "[N, 1, 28, 28] or [N, 784]",
    )


class Guard:
    """The ASGI middleware described in the module docstring."""

    def __init__(self, app: App, max_body: int, max_batch: int) -> None:
        self.app, self.max_body, self.max_batch = app, max_body, max_batch

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        raw_send, send = send, _CleanErrors(send)  # our own refusals are clean already
        if scope["path"] != "/invocations" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        length = headers.get("content-length", "")
        if length and (not length.isdigit() or int(length) > self.max_body):
            await self._refuse(raw_send, *self._too_large())
            return
        body = bytearray()
        while True:  # streamed: a body without Content-Length stops counting at the limit
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if len(body) > self.max_body:
                await self._refuse(raw_send, *self._too_large())
                return
            if not message.get("more_body", False):
                break
        try:
            images = _batch_size(bytes(body), headers.get("content-type", ""))
        except TooDeep:
            await self._refuse(
                raw_send, *_error(400, "BAD_REQUEST", "the JSON body nests too deeply")
            )
            return
        if images is not None and images > self.max_batch:
            await self._refuse(
                raw_send,
                *_error(
                    413,
                    "BATCH_TOO_LARGE",
                    f"batch of {images} images exceeds the limit of {self.max_batch} per "
                    "request; split it",
                ),
            )
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:  # MLflow's app asks only once; anything more waits for a disconnect
                return await receive()
            replayed = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        await self.app(scope, replay, send)

    def _too_large(self) -> tuple[int, bytes]:
        return _error(
            413,
            "REQUEST_TOO_LARGE",
            f"request body exceeds the limit of {self.max_body} bytes; send fewer images per "
            "request",
        )

    @staticmethod
    async def _refuse(send: Send, status: int, body: bytes) -> None:
        log.info("request refused: HTTP %d %s", status, json.loads(body)["error_code"])
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


class _CleanErrors:
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
        if len(self.body) < DEFAULT_MAX_BODY:  # an echo of the input can be as large as it
            self.body += message.get("body", b"")
        if message.get("more_body", False):
            return
        status, body = clean_error(self.status, bytes(self.body))
        log.info("request refused: HTTP %d %s", status, json.loads(body)["error_code"])
        await self.send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await self.send({"type": "http.response.body", "body": body})


def build_app(
    model: Any, max_body: int = DEFAULT_MAX_BODY, max_batch: int = DEFAULT_MAX_BATCH
) -> App:
    """MLflow's scoring app for a loaded pyfunc model, behind `Guard`."""
    from mlflow.pyfunc import scoring_server

    app: App = scoring_server.init(model)
    return Guard(app, max_body, max_batch)


def serve(model_ref: str, host: str, port: int, max_body: int, max_batch: int) -> None:
    """Load `model_ref` (any MLflow model URI or local path) and serve it until SIGINT/SIGTERM."""
    import mlflow.pyfunc
    import uvicorn
    from mlflow.exceptions import MlflowException

    from deep_repro.errors import DeepReproError, TrackingError
    from deep_repro.serving.predict import model_error

    if max_body < 1 or max_batch < 1:
        raise DeepReproError("--max-body-bytes and --max-batch must be positive")
    try:
        model = mlflow.pyfunc.load_model(model_ref)
    except (MlflowException, OSError, ValueError) as exc:
        raise TrackingError(model_error(model_ref, exc)) from None
    log.info(
        "serving %s on http://%s:%d (at most %d bytes and %d images per request)",
        model_ref,
        host,
        port,
        max_body,
        max_batch,
    )
    # uvicorn handles SIGINT and SIGTERM itself: in-flight requests finish, then it exits.
    uvicorn.run(build_app(model, max_body, max_batch), host=host, port=port, log_level="warning")
