"""A local copy of registered models' programs, so `deep-repro predict` starts like torch does.

Loading `models:/<name>@champion` through MLflow costs seconds before the first pixel is read
(importing mlflow, opening the store with SQLAlchemy, copying the model, the pyfunc wrapper).
What `predict` needs is the model version the alias points at *now* and that version's
`inference.pt2`. So:

* the alias is resolved with one light query: a read-only sqlite3 query of MLflow's registry
  tables (`registered_model_aliases`, `model_versions`; schema of MLflow 3.x) for a local store,
  or the REST endpoint `registered-models/alias` with urllib for an http(s) server;
* the program is kept under `<store>/.cache/models/<name>/<version>/inference.pt2`, next to a
  `version.json` naming the model version it came from (run id, creation time). A moved alias
  resolves to another version, hence another directory; a re-created store with a reused version
  number no longer matches `version.json`; either way the copy is refreshed;
* the copy is still loaded only through `inference.load_inference_model` (the safe-archive check).

Anything this module cannot answer cheaply (another store type, an unexpected schema) returns
None and the caller loads the model through MLflow as before.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sqlite3
import ssl
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

from deep_repro.errors import TrackingError, scrub
from deep_repro.paths import store_root

PROGRAM = "inference.pt2"
META = "version.json"


@dataclass(frozen=True)
class ModelVersion:
    name: str
    version: str
    run_id: str
    created: int  # registry creation time, ms: tells a re-created store's "version 1" apart
    storage_location: str  # where the logged model's files are (a file:// URI for local stores)


def parse_models_uri(ref: str) -> tuple[str, str | None, str | None] | None:
    """`models:/name@alias` -> (name, alias, None); `models:/name/3` -> (name, None, "3")."""
    if not ref.startswith("models:/"):
        return None
    body = ref.removeprefix("models:/")
    if "@" in body:
        name, alias = body.rsplit("@", 1)
        return (name, alias, None) if name and alias else None
    name, _, number = body.rpartition("/")
    return (name, None, number) if name and number.isdigit() else None


def missing_alias_message(name: str, alias: str, uri: str) -> str:
    """What to do when no version carries the alias (one line, for `predict` and `lineage`)."""
    how = (
        (
            "a version becomes @champion when `uv run dvc repro` registers it and its evaluate "
            "stage passes the validation gate (validation accuracy above evaluate.baseline and "
            "significantly above the current champion's)"
        )
        if alias == "champion"
        else f"set it with MlflowClient().set_registered_model_alias({name!r}, {alias!r}, VERSION)"
    )
    return (
        f"no version of registered model {name!r} has the alias @{alias} (tracking store "
        f"{scrub(uri)}): use a model file instead, e.g. `--model models/inference.pt2`, or "
        f"{how}"
    )


# --------------------------------------------------------------------------- resolve
def _sqlite_lookup(
    db: Path, name: str, alias: str | None, number: str | None
) -> ModelVersion | None:
    if not db.exists():  # no store yet: nothing is registered, let alone aliased
        raise LookupError
    conn = sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True, timeout=10)
    try:
        if alias is not None:
            rows = conn.execute(
                "SELECT version FROM registered_model_aliases WHERE name = ? AND alias = ?",
                (name, alias),
            ).fetchall()
            if not rows:
                raise LookupError
            if len(rows) > 1:  # several MLflow workspaces: let MLflow pick
                return None
            number = str(rows[0][0])
        rows = conn.execute(
            "SELECT version, run_id, creation_time, storage_location "
            "FROM model_versions WHERE name = ? AND version = ?",
            (name, int(number or 0)),
        ).fetchall()
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc) and alias is not None:
            raise LookupError from None  # a store nobody registered a model in yet
        return None
    finally:
        conn.close()
    if len(rows) != 1 or not rows[0][3]:
        return None
    version, run_id, created, location = rows[0]
    return ModelVersion(name, str(version), run_id or "", int(created or 0), location)


def tls_context() -> ssl.SSLContext:
    """Certificate checks as MLflow's own client makes them: a class server with its own CA
    is trusted through MLFLOW_TRACKING_SERVER_CERT_PATH (MLFLOW_TRACKING_INSECURE_TLS=true
    turns the check off, as it does for MLflow)."""
    if os.environ.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() == "true":
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    return ssl.create_default_context(cafile=os.environ.get("MLFLOW_TRACKING_SERVER_CERT_PATH"))


def _rest_lookup(uri: str, name: str, alias: str | None, number: str | None) -> ModelVersion | None:
    base = uri.rstrip("/") + "/api/2.0/mlflow/"
    if alias is not None:
        url = (
            base
            + "registered-models/alias?"
            + urllib.parse.urlencode({"name": name, "alias": alias})
        )
    else:
        url = (
            base + "model-versions/get?" + urllib.parse.urlencode({"name": name, "version": number})
        )
    request = urllib.request.Request(url)
    token = os.environ.get("MLFLOW_TRACKING_TOKEN")
    user, password = (
        os.environ.get("MLFLOW_TRACKING_USERNAME"),
        os.environ.get("MLFLOW_TRACKING_PASSWORD"),
    )
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    elif user and password:
        import base64

        basic = base64.b64encode(f"{user}:{password}".encode()).decode()
        request.add_header("Authorization", f"Basic {basic}")
    try:
        with urllib.request.urlopen(request, timeout=10, context=tls_context()) as response:
            body = json.load(response)
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            raise LookupError from None
        return None  # auth, server errors: MLflow reports them in its own words
    except (urllib.error.URLError, OSError, ValueError):
        return None
    mv = body.get("model_version") or {}
    if not mv.get("version") or not mv.get("source"):
        return None
    return ModelVersion(
        name,
        str(mv["version"]),
        mv.get("run_id") or "",
        int(mv.get("creation_timestamp") or 0),
        mv.get("storage_location") or "",
    )


def resolve(uri: str, ref: str) -> ModelVersion | None:
    """The model version `ref` (`models:/name@alias` or `models:/name/N`) denotes in the store
    at `uri` now, or None where only MLflow can tell. Raises TrackingError (what to do) when the
    alias or version does not exist."""
    parsed = parse_models_uri(ref)
    if parsed is None:
        return None
    name, alias, number = parsed
    try:
        if uri.startswith("sqlite:///"):
            return _sqlite_lookup(Path(uri.removeprefix("sqlite:///")), name, alias, number)
        if uri.startswith(("http://", "https://")):
            return _rest_lookup(uri, name, alias, number)
    except LookupError:
        if alias is not None:
            raise TrackingError(missing_alias_message(name, alias, uri)) from None
        raise TrackingError(
            f"registered model {name!r} has no version {number} (tracking store {scrub(uri)})"
        ) from None
    return None


# --------------------------------------------------------------------------- the cache
def cache_dir(uri: str) -> Path:
    """Where copies of this store's programs live: next to a local sqlite store, else under the
    project's store root, one directory per server."""
    if uri.startswith("sqlite:///"):
        return Path(uri.removeprefix("sqlite:///")).parent / ".cache" / "models"
    key = hashlib.sha256(uri.encode()).hexdigest()[:12]
    return store_root() / ".cache" / "models" / key


MAX_MLMODEL_BYTES = 1 << 20  # an MLmodel file is a few hundred bytes of YAML


def program_path(mlmodel_text: str, where: str) -> str:
    """The program's path inside a logged model, from its MLmodel file: relative, inside the
    model directory. The file is written by whoever logged the model (on a class server: a
    student); an absolute path or `..` would make this machine read any of its own files
    (another student's cached program, the teacher's model, /dev/zero) as the program."""
    import posixpath

    import yaml

    try:
        rel = yaml.safe_load(mlmodel_text)["flavors"]["python_function"]["artifacts"]["program"][
            "path"
        ]
    except (yaml.YAMLError, KeyError, TypeError):
        raise TrackingError(
            f"{where}: MLmodel names no program (flavors.python_function)"
        ) from None
    if (
        not isinstance(rel, str)
        or not rel
        or "\\" in rel
        or posixpath.isabs(rel)
        or ".." in rel.split("/")
    ):
        raise TrackingError(
            f"{where}: MLmodel's program path {rel!r} is not a relative path inside the model"
        )
    return rel


def fetch_program(mv: ModelVersion, dest: Path, uri: str) -> None:
    """Copy the version's logged program to `dest`: straight from a local artifact directory,
    else through MLflow (only the MLmodel file and the program, once per version)."""
    import stat

    where = f"models:/{mv.name}/{mv.version}"
    location = mv.storage_location
    if location.startswith("file://"):
        model_dir = Path(urllib.parse.unquote(urllib.parse.urlparse(location).path)).resolve()
        with open(model_dir / "MLmodel", "rb") as fh:
            text = fh.read(MAX_MLMODEL_BYTES).decode("utf-8", "replace")
        source = (model_dir / program_path(text, where)).resolve()
        if not source.is_relative_to(model_dir) or not stat.S_ISREG(source.stat().st_mode):
            raise TrackingError(f"{where}: the program is not a file inside the logged model")
        shutil.copyfile(source, dest)
        return
    import mlflow.artifacts
    from mlflow import MlflowClient

    if not location:  # the REST lookup does not say: ask the registry where the files are
        location = MlflowClient(tracking_uri=uri, registry_uri=uri).get_model_version_download_uri(
            mv.name, mv.version
        )
    with tempfile.TemporaryDirectory() as tmp:
        mlmodel = Path(
            mlflow.artifacts.download_artifacts(
                artifact_uri=f"{location.rstrip('/')}/MLmodel", dst_path=tmp, tracking_uri=uri
            )
        )
        if mlmodel.stat().st_size > MAX_MLMODEL_BYTES:
            raise TrackingError(f"{where}: MLmodel is not a model description")
        rel = program_path(mlmodel.read_text(errors="replace"), where)
        program = Path(
            mlflow.artifacts.download_artifacts(
                artifact_uri=f"{location.rstrip('/')}/{rel}",
                dst_path=str(Path(tmp) / "program"),
                tracking_uri=uri,
            )
        )
        if not stat.S_ISREG(program.lstat().st_mode):
            raise TrackingError(f"{where}: the program is not a file inside the logged model")
        shutil.copyfile(program, dest)


def cached_program(uri: str, mv: ModelVersion) -> tuple[Path, str]:
    """Path and md5 of a local copy of `mv`'s program, fetched on first use (or when the copy
    belongs to another store's version of the same number)."""
    from deep_repro.files import file_digest

    target = cache_dir(uri) / mv.name / mv.version
    meta = asdict(mv)
    with contextlib.suppress(OSError, ValueError):
        saved = json.loads((target / META).read_text())
        if (target / PROGRAM).is_file() and {k: saved.get(k) for k in meta} == meta:
            return target / PROGRAM, str(saved["md5"])
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build the copy in a sibling temp dir and rename it into place: a concurrent or
    # interrupted predict never sees half a program.
    tmp = Path(tempfile.mkdtemp(prefix=f".{mv.version}-", dir=target.parent))
    try:
        fetch_program(mv, tmp / PROGRAM, uri)
        md5 = file_digest(tmp / PROGRAM)
        (tmp / META).write_text(json.dumps({**meta, "md5": md5}, indent=1) + "\n")
        if target.exists():
            shutil.rmtree(target, ignore_errors=True)
        try:
            tmp.rename(target)
        except OSError:  # another process won the race: its copy is the same version
            if not (target / META).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target / PROGRAM, md5
