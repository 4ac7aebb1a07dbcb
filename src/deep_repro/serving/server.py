"""`deep-repro serve`: MLflow's own scoring app (what `mlflow models serve` runs) behind an ASGI
middleware that bounds what one request may cost and what an error may say.

Why not plain `mlflow models serve`: MLflow 3.17's scoring server reads the whole body before the
model runs (100,000 images: ~10 GB), and rewrites a model's error as "Failed to predict data
'<the input>'" plus, for unexpected errors, a stack trace. Nothing inside the pyfunc model can
prevent either. So, in front of the unchanged app:

- a body over `max_body` bytes is refused with 413 from its Content-Length, before any of it is
  read; without one (chunked), reading stops at the limit;
- a batch of more than `max_batch` images is refused with 413, before MLflow parses the body
  (images = pixel values / 784, however the values are laid out: a 784 x 60-column row is 60);
- a Parquet body is refused with 415: how far one unpacks cannot be known before decoding it
  (dictionary pages repeat a value per row, codecs expand; a 700-byte body decodes to 100 MB,
  and neither footer sizes nor row counts bind the reader), and MLflow's app decodes it whole;
- every error body becomes one JSON line `{"error_code": ..., "message": ...}` whose message is
  either the model's own input check (which names the problem, never the values) or a fixed
  sentence: no input, no stack trace, no internals (serving/refusals.py).

The payloads are MLflow's: `/invocations` (`inputs`, `instances`, `dataframe_split`,
`dataframe_records`, CSV), `/ping`, `/health`, `/version`; plus `application/x-npy`, uint8
images as `np.save` writes them (serving/wire.py), the compact form that replaces Parquet.

Fast paths (benchmarks/serving.py measured why): a JSON body of `{"inputs": [...]}` or
`{"instances": [...]}` is parsed once, here, and the same pyfunc model answers it with MLflow's
own conversion (`np.array` of the list, as its parser does for a model without an input schema)
and MLflow's response text (`wire.records_json`). MLflow's path parses the body again,
deep-copies the nested list (~25 ms for 64 images) and runs FastAPI's middleware stack: at a
batch of 64 about as long again as the model itself (benchmarks/README.md, `serving.py
--breakdown`). Anything else, and any request the fast path cannot answer (the model refuses the
input, a conversion fails), goes to MLflow's app unchanged, so errors read exactly as before.
A `.npy` body is all fast path: its pixels are a view of the body, answered the same way.
"""

from __future__ import annotations

import asyncio
import io
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from deep_repro.serving import refusals, wire
from deep_repro.serving.refusals import Message, Send

log = logging.getLogger("deep_repro")

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]

DEFAULT_MAX_BODY = 16 * 1024 * 1024  # ~5,000 images as JSON integers
DEFAULT_MAX_BATCH = 1024  # images per request: bounds the model's memory and one call's time
PARQUET = "application/vnd.apache.parquet"  # MLflow 3's name for it (mlflow.pyfunc.scoring_server)
INLINE_BATCH = 8  # images up to which the fast path predicts on the event loop
TOO_DEEP = "the JSON body nests too deeply"
PARSE_INLINE = 256 * 1024  # body bytes up to which counting its images runs on the event loop


class Guard:
    """The ASGI middleware described in the module docstring."""

    def __init__(self, app: App, max_body: int, max_batch: int, model: Any = None) -> None:
        self.app, self.max_body, self.max_batch = app, max_body, max_batch
        # The fast path needs what MLflow's parser would do to be `np.array(list)`: a model
        # without an input schema or a type-hint signature (ours: see serving/pyfunc.py).
        metadata = getattr(model, "metadata", None)
        self.model = (
            model
            if metadata is not None
            and metadata.get_input_schema() is None
            and not getattr(metadata, "_is_signature_from_type_hint", lambda: False)()
            else None
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        raw_send, send = send, refusals.CleanErrors(send)  # our own refusals are clean already
        if scope["path"] != "/invocations" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if sum(k.lower() == b"content-type" for k, _ in scope["headers"]) > 1:
            # this dict keeps the last, Starlette (MLflow's app) reads the first: one only
            await refusals.send(
                raw_send, *refusals.error(400, "BAD_REQUEST", "more than one Content-Type header")
            )
            return
        length = headers.get("content-length", "")
        if length and (not (length.isascii() and length.isdigit()) or int(length) > self.max_body):
            await refusals.send(raw_send, *self._too_large())
            return
        body = bytearray()
        while True:  # streamed: a body without Content-Length stops counting at the limit
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if len(body) > self.max_body:
                await refusals.send(raw_send, *self._too_large())
                return
            if not message.get("more_body", False):
                break
        content_type, data = headers.get("content-type", ""), bytes(body)
        try:
            mime, images, payload, tensor = await self._admit(data, content_type)
            if tensor is not None:  # .npy: no MLflow form to fall back on
                if self.model is None:
                    refusal = f"{wire.NPY} needs a model without an input schema; send JSON"
                    raise refusals.Refused(*refusals.error(415, "UNSUPPORTED_MEDIA_TYPE", refusal))
                if (error := await self._answer(tensor, images, raw_send)) is not None:
                    raise refusals.Refused(
                        *refusals.model_refusal(error)
                    )  # the model's word is final
                return
            if self.model is not None and _plain(content_type):
                tensor = _tensor_payload(payload)
            if tensor is not None and await self._answer(tensor, images, raw_send) is None:
                return
            if mime == "application/json" and payload is not None:
                await _off_loop(len(data), wire.check_depth, payload)  # MLflow's app: ~990
        except wire.TooDeep:
            await refusals.send(raw_send, *refusals.error(400, "BAD_REQUEST", TOO_DEEP))
            return
        except refusals.Refused as refused:
            await refusals.send(raw_send, refused.status, refused.body)
            return
        payload = tensor = None  # MLflow's app parses the body again: hold one copy, not two
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:  # MLflow's app asks only once; anything more waits for a disconnect
                return await receive()
            replayed = True
            return {"type": "http.request", "body": data, "more_body": False}

        await self.app(scope, replay, send)

    async def _admit(self, data: bytes, content_type: str) -> tuple[str, int | None, Any, Any]:
        """(mime type, images, parsed JSON or None, a .npy body's pixels or None), or raise
        `refusals.Refused` / `wire.TooDeep` for what the limits of the module docstring refuse."""
        mime = content_type.split(";")[0].strip().lower()
        if not mime:  # MLflow's app would fail on it with a 500 and a traceback in the log
            raise refusals.Refused(*refusals.clean_error(415, b""))
        if mime == PARQUET:
            raise refusals.Refused(
                *refusals.error(
                    415,
                    "UNSUPPORTED_MEDIA_TYPE",
                    "Parquet bodies are refused: how far one unpacks is unknown until it is "
                    f"decoded; send {wire.NPY} (np.save of uint8 images) or JSON",
                )
            )
        json_body = mime == "application/json"
        values = wire.json_values(data) if json_body else 0
        self._check_values(values, 2)  # before parsing: bounds our own parse
        tensor, payload = None, None
        try:
            if mime == wire.NPY:
                tensor = wire.npy_images(data)
                images: int | None = len(tensor)
            else:  # up to 16 MiB of JSON or CSV: ~0.1-1 s, off the event loop when large
                images, payload = await _off_loop(len(data), wire.parse, data, mime)
        except wire.BadBody as exc:
            raise refusals.Refused(*refusals.error(400, "BAD_REQUEST", str(exc))) from None
        if images is not None and images > self.max_batch:
            raise refusals.Refused(
                *refusals.error(
                    413,
                    "BATCH_TOO_LARGE",
                    f"batch of {images} images exceeds the limit of {self.max_batch} per "
                    "request; split it",
                )
            )
        # MLflow's app copies every value; a ragged tensor's image count sees only the first
        self._check_values(values, 1)
        return mime, images, payload, tensor

    def _check_values(self, values: int, times: int) -> None:
        """`Refused` (413) if a JSON body's `values` (wire.json_values) exceed `times` x what
        `max_batch` images take."""
        limit = times * (self.max_batch * wire.VALUES_PER_IMAGE + 4096)
        if values > limit:
            message = (
                f"the JSON body holds up to {values} values, more than {self.max_batch} images "
                f"take ({limit // times}); split it"
            )
            raise refusals.Refused(*refusals.error(413, "BATCH_TOO_LARGE", message))

    async def _answer(self, values: Any, images: int | None, send: Send) -> Exception | None:
        """Answer a tensor request with the model, as MLflow's app would; or return why not
        (the model refused the input, or the conversion failed), for the app to answer."""
        from mlflow.environment_variables import MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT

        try:
            if images is not None and images <= INLINE_BATCH:
                # A few images take a few ms: handing them to a thread costs more than that
                # (the hop and the GIL hand-back: py-spy, benchmarks/serving.py).
                body = self._predict(values)
            else:  # off the event loop, under MLflow's own time limit (as its app runs one)
                body = await asyncio.wait_for(
                    asyncio.to_thread(self._predict, values),
                    timeout=MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT.get(),
                )
        except TimeoutError:
            await refusals.send(send, *refusals.clean_error(504, b""))
            return None
        except Exception as exc:  # MLflow's app answers it, with its own error
            return exc
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
        return None

    def _predict(self, values: Any) -> bytes:
        import numpy as np
        import pandas as pd
        from mlflow.pyfunc.scoring_server import predictions_to_json

        # a list: MLflow's parse_tf_serving_input, no input schema; an array: a .npy body's
        data = values if isinstance(values, np.ndarray) else np.array(values)
        if data.dtype == object:
            raise ValueError("ragged input: MLflow's app refuses it")
        assert self.model is not None
        raw = self.model.predict(data, params=None)
        if isinstance(raw, pd.DataFrame) and (text := wire.records_json(raw)) is not None:
            return text.encode()
        # What records_json leaves (NaN, bools, nullable columns...): MLflow's own encoder
        out = io.StringIO()
        predictions_to_json(raw, out)
        return out.getvalue().encode()

    def _too_large(self) -> tuple[int, bytes]:
        return refusals.error(
            413,
            "REQUEST_TOO_LARGE",
            f"request body exceeds the limit of {self.max_body} bytes; send fewer images per "
            "request",
        )


async def _off_loop(size: int, function: Callable[..., Any], *args: Any) -> Any:
    """`function(*args)` here for a body of up to `PARSE_INLINE` bytes, else in a thread."""
    if size <= PARSE_INLINE:
        return function(*args)
    return await asyncio.to_thread(function, *args)


def _plain(content_type: str) -> bool:
    """`application/json`, with no parameter but `charset=utf-8`, spelt as MLflow's app reads
    it (case-sensitive type and name; anything else is that app's to judge)."""
    mime, *params = [p.strip() for p in content_type.split(";")]
    return mime == "application/json" and all(
        name == "charset" and value.lower() == "utf-8"
        for name, _, value in (p.partition("=") for p in params)
    )


def _tensor_payload(payload: Any) -> list[Any] | None:
    """The list of a `{"inputs": [...]}` / `{"instances": [...]}` JSON body (no other keys, not
    a list of records), else None: MLflow's app handles the rest."""
    if not isinstance(payload, dict) or len(payload) != 1:
        return None
    key, value = next(iter(payload.items()))
    if key not in ("inputs", "instances") or not isinstance(value, list) or not value:
        return None
    return None if isinstance(value[0], dict) else value


def build_app(
    model: Any, max_body: int = DEFAULT_MAX_BODY, max_batch: int = DEFAULT_MAX_BATCH
) -> App:
    """MLflow's scoring app for a loaded pyfunc model, behind `Guard`."""
    from mlflow.pyfunc import scoring_server

    app: App = scoring_server.init(model)
    return Guard(app, max_body, max_batch, model)


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
