"""The bytes of `deep-repro serve`: how many images a request body holds (before anything
else reads it), the compact body (`.npy` uint8 images) in, MLflow's `{"predictions": [...]}` text
out, the last two without per-number Python work.

Why (benchmarks/serving.py `--breakdown`, batch 64, 2-core AMD EPYC): once the model got 2.5x
faster, the fixed work around it was 40 % of its time: parsing a JSON body of 50,176 integers
(orjson 1.2 ms), `np.array` of the nested list (2.4 ms), and building one dict per answer row for
`json.dumps` (1-2.6 ms). Here:

- **in**: `application/x-npy`, the NumPy file format (`np.save`) of uint8 images shaped
  `[N, 28, 28]`, `[N, 1, 28, 28]` or `[N, 784]`: a 128-byte header, then the pixels as they lie
  in memory; 50 KB for 64 images (JSON: 180 KB), read in microseconds. Only the header is parsed
  (NumPy's own reader, header capped at 10,000 bytes; never `allow_pickle`), and the body must
  be exactly header + N x 784 bytes, so a request costs what it weighs: no decompression, no
  object dtype, nothing to unpack. MLflow's scoring server has no such type; its compact type,
  Parquet, cannot be bounded before decoding (see server.py), which is why this one exists.
- **out**: the same characters `json.dump` writes for the answer's records, assembled from
  per-column strings (`float.__repr__` is what json writes for a finite float, `int.__repr__`
  for an int, `encode_basestring_ascii` for a string or key). A value json would treat any
  other way (NaN, infinity, a bool, a missing value, a non-string name) returns None: json's
  own path.
"""

from __future__ import annotations

import io
import json
import math
import operator
from json.encoder import encode_basestring_ascii
from typing import Any

import numpy as np
import orjson

NPY = "application/x-npy"
PIXELS = 784
KEYS = ("inputs", "instances", "dataframe_split", "dataframe_records")  # MLflow's JSON forms
MAX_DEPTH = 32  # `{"inputs": [N, 1, 28, 28]}` is 5 levels deep
# 784 pixels + a list per pixel: [N, 28, 28, 1] (channels-last, Keras' layout) takes 1,597
VALUES_PER_IMAGE = 1600
SHAPES = "[N, 28, 28], [N, 1, 28, 28] or [N, 784]"


class TooDeep(ValueError):
    """A JSON body nested deeper than Python's parser goes."""


def parse(body: bytes, mime: str) -> tuple[int | None, Any]:
    """(images in the request or None, the parsed JSON payload or None); `mime`: the
    Content-Type's media type, lower case.

    Images count as cells / 784 of what MLflow's app would build (the model reshapes whatever it
    gets to [-1, 28, 28]). What the count cannot bound is refused (`BadBody`) before MLflow's
    app sees it: strings in a tensor (`np.array` pads every one to the longest: 280 KB became
    16 GB), tensors as dicts, DataFrames wider than one image (pandas pays ~1.3 KB per column:
    a header-only CSV of 100,000 columns took 8 s), broadcast or multi-level indexes (one row
    repeated over an index of 4 M entries), quoted CSV."""
    if mime == "text/csv":
        return _images(_csv_values(body)), None
    if mime != "application/json":
        return None, None
    try:
        # orjson: a quarter of the stdlib's time for 64 images of integers (benchmarks/
        # serving.py); what it refuses (NaN literals, deep nesting, huge integers) the stdlib
        # judges, as MLflow's app will.
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        try:
            payload = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None, None  # MLflow's app says "not valid JSON"
        except ValueError:  # past int()'s 4,300 digits: a bare 500 in MLflow's app
            raise BadBody("the JSON body holds a number too long to read") from None
        except RecursionError:  # [[[[...]]]]: would escape MLflow's handler as a bare 500
            raise TooDeep from None
    return _count(payload, body), payload


def json_values(body: bytes) -> int:
    """An upper bound on the values in a JSON body, from its bytes: every value but the first
    of a container follows a comma, every container opens with a bracket (inside strings they
    only add). MLflow's app copies each one as a Python object (a `deepcopy` of the lists), so
    this bounds its cost whatever the nesting: 16 MiB of `[[],[],...]` counted as one image by
    shape, and cost 1.5 GB and 7 s."""
    return body.count(b",") + body.count(b"[") + body.count(b"{") + 1  # memchr speed


def check_depth(payload: Any) -> None:
    """`TooDeep` past `MAX_DEPTH` levels: orjson reads 1,024, MLflow's app (and pandas' repr of
    a refused frame) fails past ~990 with a bare 500. Iterative; run only on the way to
    MLflow's app, where the body's value count already bounds the walk."""
    stack = [(payload, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise TooDeep
        if isinstance(value, dict):
            stack.extend((v, depth + 1) for v in value.values())
        elif isinstance(value, list):
            stack.extend((v, depth + 1) for v in value if isinstance(v, list | dict))


def _strings(value: Any) -> int:
    """Strings and keys in a (small) JSON value: each is two quote characters of the body."""
    count, stack = 0, [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            count += 1
        elif isinstance(item, dict):
            count += len(item)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return count


def _images(values: int) -> int | None:
    return math.ceil(values / PIXELS) if values else None


def _csv_values(body: bytes) -> int:
    """Cells of the frame pandas reads from a CSV body: max(lines - 1, 1) x the most fields on
    any line (pandas skips blank lines, pads short rows, and builds every column of a header
    alone), counted with NumPy: a 16 MB body of empty lines would be millions of `bytes`."""
    if b'"' in body:  # a quoted field may hold line ends and commas: lines no longer bound it
        raise BadBody("CSV bodies with quotes are refused: pixel values need none")
    data = np.frombuffer(body, np.uint8)
    if not len(data):
        return 0
    # pandas ends a row at \n, \r\n or a lone \r; the last line ends one past the body
    lone_cr = (data == 13) & (np.append(data[1:], 0) != 10)
    ends = np.append(np.flatnonzero((data == 10) | lone_cr), len(data))
    starts = np.concatenate(([0], ends[:-1] + 1))
    commas = np.flatnonzero(data == 44)
    fields = np.searchsorted(commas, ends) - np.searchsorted(commas, starts) + 1
    width = int(fields.max())
    if width > PIXELS:
        raise BadBody(WIDE)
    lines = int(np.count_nonzero(ends > starts))  # not blank (a \r\n's \r counts as blank)
    return max(lines - 1, 1) * width


WIDE = f"a DataFrame row holds at most one image: {PIXELS} columns"


def _count(payload: Any, body: bytes) -> int | None:
    if not isinstance(payload, dict) or not any(key in payload for key in KEYS):
        # MLflow's app would take `input`, `prompt`, `messages` as an LLM request and put the
        # whole of it into its error message (4x the body)
        raise BadBody(f"a JSON body must be an object holding one of {', '.join(KEYS)}")
    if "dataframe_split" in payload:
        return _split_values(payload["dataframe_split"])
    if "dataframe_records" in payload:
        return _records_values(payload["dataframe_records"])
    key = "inputs" if "inputs" in payload else "instances"
    value = payload[key]
    if not isinstance(value, list) or (value and isinstance(value[0], dict)):
        raise BadBody("inputs and instances must hold pixel values as (nested) lists")
    # The quotes of the keys and of whatever else the object holds (`params`): none left for
    # a string in the tensor
    rest = {k: v for k, v in payload.items() if k != key}
    if body.count(b'"') != 2 * (1 + _strings(rest)):
        raise BadBody("pixel values must be numbers: strings are refused")
    # The shape from the first element at each depth: [N,28,28], [N,1,28,28], [N,784] or a flat
    # list of N*784 values all come out as N (a ragged array is MLflow's to refuse; an empty
    # list counts as one value, so [[], [], ...] is not free).
    total = 1
    while isinstance(value, list):
        total *= max(len(value), 1)
        if not value:
            break
        value = value[0]
    return _images(total)


def _flat(values: Any) -> bool:
    return isinstance(values, list) and not any(isinstance(v, list | dict) for v in values)


def _split_values(split: Any) -> int | None:
    """Cells of `pd.DataFrame(data=, index=, columns=)`, for a list of rows with flat, matching
    labels only: pandas broadcasts a scalar or empty `data` over index x columns, and repeats a
    row over a multi-level index (a 20 KB body could ask for gigabytes)."""
    if not isinstance(split, dict):
        return None  # MLflow's app refuses it
    rows, index, columns = split.get("data"), split.get("index"), split.get("columns")
    if (
        not isinstance(rows, list)
        or not all(isinstance(row, list) for row in rows)
        or not (index is None or (_flat(index) and len(index) == len(rows)))
        or not (columns is None or _flat(columns))
    ):
        raise BadBody(
            "dataframe_split must hold data as a list of rows (lists), and index (one label "
            "per row) and columns as flat lists if given"
        )
    width = max(max(map(len, rows), default=0), len(columns or ()), 1)
    if width > PIXELS:
        raise BadBody(WIDE)
    return _images(max(len(rows), 1) * width)


def _records_values(records: Any) -> int | None:
    """Cells of a frame of len(records) rows x the union of their keys (or list lengths)."""
    if not isinstance(records, list):
        return None  # MLflow's app refuses it
    keys = set().union(*(r for r in records if isinstance(r, dict)))
    width = max(len(keys), max((len(r) for r in records if isinstance(r, list)), default=1))
    if width > PIXELS:
        raise BadBody(WIDE)
    return _images(max(len(records), 1) * width)


class BadBody(ValueError):
    """A body the guard refuses (400): the message says what was expected, never the input's
    values."""


def npy_images(body: bytes) -> np.ndarray:
    """uint8 `[N, 784]` of an `application/x-npy` body (read-only: a view of `body`)."""
    from numpy.lib import format as npy

    stream = io.BytesIO(body)
    try:
        version = npy.read_magic(stream)
        if version not in ((1, 0), (2, 0)):
            raise ValueError(f"version {version}")
        read = npy.read_array_header_1_0 if version == (1, 0) else npy.read_array_header_2_0
        shape, fortran, dtype = read(stream)
    except Exception as exc:  # a header is Python-literal text: any of its parser's errors
        raise BadBody(f"the body is not a .npy array (np.save): {type(exc).__name__}") from None
    if dtype != np.uint8:
        # the dtype's code only: a structured dtype's field names are the client's text
        code = dtype.str if dtype.names is None else "a structured dtype"
        raise BadBody(f"expected uint8 pixels in the .npy body, got {code}")
    if fortran or not _image_shape(shape):
        small = len(shape) <= 8 and all(0 <= n < 10**9 for n in shape)
        got = str(tuple(shape)) if small else "a shape of that size"
        order = " in Fortran order" if fortran else ""
        raise BadBody(f"expected a .npy array shaped {SHAPES} in C order, got {got}{order}")
    images = math.prod(shape) // PIXELS  # Python ints: no wrap-around
    pixels = len(body) - stream.tell()
    if pixels != images * PIXELS:
        raise BadBody(f"the .npy body holds {pixels} bytes of pixels, not what its header says")
    return np.frombuffer(body, np.uint8, pixels, stream.tell()).reshape(-1, PIXELS)


def _image_shape(shape: tuple[int, ...]) -> bool:
    tail = tuple(shape[1:])
    return len(shape) >= 2 and shape[0] >= 0 and tail in ((28, 28), (1, 28, 28), (PIXELS,))


def records_json(frame: Any) -> str | None:
    """`json.dumps({"predictions": frame.to_dict("records")})`'s text, or None (see above)."""
    names = list(frame.columns)
    if not names or not all(isinstance(n, str) for n in names) or not frame.columns.is_unique:
        return None
    texts = []
    for name in names:
        column = frame[name]
        kind = column.dtype.kind
        if kind in "fiu" and not isinstance(column.dtype, np.dtype):
            return None  # nullable extension dtypes: a missing value is pd.NA
        if kind == "f":
            if not np.isfinite(column.to_numpy()).all():
                return None
            texts.append(map(float.__repr__, column.tolist()))
        elif kind in "iu":
            texts.append(map(int.__repr__, column.tolist()))
        elif kind == "O":
            values = column.tolist()
            if not all(type(v) is str for v in values):
                return None
            texts.append(map(encode_basestring_ascii, values))
        else:
            return None
    keys = [encode_basestring_ascii(n) + ": " for n in names]
    rows = ("{" + ", ".join(map(operator.add, keys, row)) + "}" for row in zip(*texts, strict=True))
    return '{"predictions": [' + ", ".join(rows) + "]}"
