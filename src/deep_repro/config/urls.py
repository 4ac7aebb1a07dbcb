"""URL-valued config keys: one schema type, checked one way.

A value in the config ends up in params.yaml, dvc.lock, the `dvc exp` git refs and MLflow
params/artifacts, so a URL there must never carry a credential. Every URL-valued key is
annotated with a `UrlRule` (`Annotated[str, AfterValidator(UrlRule(...))]`): pydantic calls the
rule, so a new URL key gets the same refusal by declaring the type, and
tests/test_config.py fails for a URL-looking key declared without it.

Refused: any userinfo (`u:pw@`, and a bare user part, which is how tokens are passed:
`https://ghp_...@github.com`) and query keys that carry secrets (`password`, `token`, `sig`,
`X-Amz-Signature`, ...). One exception: a user name alone in a database URL
(`postgresql://alice@db/optuna`) names a role, not a credential; libpq takes its password from
PGPASSWORD or ~/.pgpass, never from the URL (a password there is refused as everywhere).
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote_plus, urlsplit

import yaml

from deep_repro.config.typecheck import RuleError
from deep_repro.errors import ConfigError, scrub
from deep_repro.files import atomic_path

# Query keys that carry a secret, lower-cased: exact names, and fragments any key containing
# them is refused for (`X-Amz-Signature`, `client_secret`, `access_token`, `sslpassword`).
# Names are compared decoded (`pass%77ord` is `password`), lower-cased, `-` read as `_`; any key
# ending in `key` (`api-key`, `x-api-key`, `access_key`, `key`) is refused too.
_SECRET_QUERY_KEYS = frozenset(
    {"sig", "pwd", "passwd", "pass", "auth", "jwt", "session", "sessionid", "code"}
)
_SECRET_QUERY_PARTS = ("password", "secret", "token", "signature", "credential", "api_key")
# `user:password@host/...` written without a scheme: still a credential, never echoed.
_BARE_USERINFO = re.compile(r"^[^/@\s:]+:[^/@\s]*@")
# Schemes whose user name is a database role (the password comes from the environment).
_DATABASE_SCHEMES = ("postgresql", "postgres", "mysql", "mssql", "oracle")


def secret_query_key(name: str) -> bool:
    key = unquote_plus(name).lower().replace("-", "_")
    return (
        key in _SECRET_QUERY_KEYS
        or key.endswith("key")
        or any(part in key for part in _SECRET_QUERY_PARTS)
    )


def _scheme(url: str) -> str:
    """`postgresql+psycopg2://...` -> `postgresql` (a database scheme may name its driver)."""
    return url.split("://", 1)[0].split("+", 1)[0].lower()


def credential_in(url: str) -> str | None:
    """What in `url` is a credential (`"a user name or password"`, `"a token= query"`), or None.

    Works on anything containing `://` (unparsable ports included: the userinfo is still
    found), so params.yaml can be searched for secrets in keys that are not URL-typed."""
    if "://" not in url:
        return "a user name and password" if _BARE_USERINFO.match(url) else None
    rest = url.split("://", 1)[1]
    netloc = rest.split("/", 1)[0].split("?", 1)[0].split("#", 1)[0]
    if "@" in netloc:
        userinfo = netloc.rsplit("@", 1)[0]
        if ":" in userinfo or _scheme(url) not in _DATABASE_SCHEMES:
            return "a password" if ":" in userinfo else "a user name (how tokens are passed)"
    query = rest.split("?", 1)[1].split("#", 1)[0] if "?" in rest else ""
    for name, _ in parse_qsl(query, keep_blank_values=True):
        if secret_query_key(name):
            return f"the query key {name}"
    return None


def redact(url: str) -> str:
    """`url` with its userinfo and every secret query value replaced by `***`."""
    text = _BARE_USERINFO.sub("***@", url) if "://" not in url else scrub(url)
    if "?" not in text:
        return text
    head, _, query = text.partition("?")
    query, hash_, fragment = query.partition("#")
    parts = []
    for item in query.split("&"):
        name, eq, _ = item.partition("=")
        parts.append(f"{name}{eq}***" if eq and secret_query_key(name) else item)
    return f"{head}?{'&'.join(parts)}{hash_}{fragment}"


@dataclass(frozen=True)
class UrlRule:
    """What one URL-valued key accepts; `check` is the one way every URL value is checked."""

    what: str  # "a base URL of the four .gz files", in "expected ..."
    schemes: tuple[str, ...] | None  # None: any scheme (Optuna names many RDB dialects)
    credentials: str  # where credentials go instead, appended to a refusal
    needs_host: tuple[str, ...] = ("http", "https", "postgresql", "mysql", "mssql")
    needs_path: tuple[str, ...] = ("sqlite", "file")
    bare: tuple[str, ...] = ()  # whole values accepted as they are (`databricks`)
    paths_ok: bool = False  # a value without `://` is a file path, not a URL

    def __call__(self, url: str) -> str:
        """`url` if this key accepts it; else raise `RuleError`, which shows the URL with any
        secret redacted (pydantic's validator protocol: `AfterValidator(rule)`)."""
        if url in self.bare or ("://" not in url and self.paths_ok):
            return url
        shown = redact(url)
        found = credential_in(url)
        if found is not None:
            raise RuleError(
                shown,
                f"a URL without credentials ({found} would be stored in params.yaml, dvc.lock, "
                f"git and MLflow): {self.credentials}",
            )
        try:
            parts = urlsplit(url)
            parts.port  # noqa: B018  (raises ValueError for a non-numeric port)
        except ValueError:
            raise RuleError(shown, self.what) from None
        scheme = _scheme(url)
        if "://" not in url or (self.schemes is not None and scheme not in self.schemes):
            raise RuleError(shown, self.what)
        if scheme in self.needs_host and not parts.hostname:
            raise RuleError(shown, f"a host after {scheme}://")
        if scheme in self.needs_path and not parts.path.strip("/"):
            raise RuleError(shown, f"a path after {scheme}:///")
        return url


def _fail(key: str, shown: str, expected: str) -> ConfigError:
    return ConfigError(f"config error: {key} = {shown!r}: expected {expected}")


def strings(raw: Any, prefix: str = "") -> Iterator[tuple[str, str]]:
    """Every string in a parsed params.yaml with its key (`data.mirrors[0]`)."""
    if isinstance(raw, dict):
        for k, v in raw.items():
            yield from strings(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(raw, list):
        for i, v in enumerate(raw):
            yield from strings(v, f"{prefix}[{i}]")
    elif isinstance(raw, str):
        yield prefix, raw


# --------------------------------------------------------------------------- params.yaml
# `dvc exp run -S key=value` writes the override into the workspace params.yaml BEFORE any stage
# runs; a refused credential would stay there, ready for the next `git commit -a`. The validate
# stage therefore puts the committed value back (HEAD:params.yaml; a key HEAD lacks is removed,
# `***` where there is no commit) and only then reports the refusal.
_ABSENT = object()  # the key is not in the committed file: drop it
_NO_COMMIT = object()  # no committed file at all: redact in place


def _has_credential(value: Any) -> bool:
    return any(credential_in(v) for _, v in strings(value))


def redacted(value: Any) -> Any:
    """A parsed params mapping (or any part of it) with every URL's secrets replaced by `***`."""
    if isinstance(value, dict):
        return {k: redacted(v) for k, v in value.items()}
    if isinstance(value, list):
        return [redacted(v) for v in value]
    return redact(value) if isinstance(value, str) else value


def _clean(value: Any, committed: Any) -> Any:
    """`value` with every node holding a credential replaced by its committed counterpart."""
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if committed is _NO_COMMIT:
                c = _NO_COMMIT
            else:
                c = committed.get(k, _ABSENT) if isinstance(committed, dict) else _ABSENT
            cleaned = _clean(v, c)
            if cleaned is not _ABSENT:
                out[k] = cleaned
        return out
    if not _has_credential(value):
        return value
    if committed is _NO_COMMIT or _has_credential(committed):
        return redacted(value)
    return committed


def _committed_text(path: Path) -> str | None:
    proc = subprocess.run(
        ["git", "show", f"HEAD:./{path.name}"],
        cwd=path.parent,
        capture_output=True,
        text=True,
        check=False,
    )
    return proc.stdout if proc.returncode == 0 else None


def remove_credentials(path: Path) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """Rewrite `path` (params.yaml) without any credential in a URL (atomically: temp file, then
    rename). Returns the mapping as it was, to validate, and the `(key, url)` pairs found."""
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return {}, []  # load_config reports a missing or unparsable file in its own words
    found = [(k, v) for k, v in strings(raw) if credential_in(v)]
    if not found or not isinstance(raw, dict):
        return raw if isinstance(raw, dict) else {}, found
    head = _committed_text(path)
    committed = yaml.safe_load(head) if head is not None else _NO_COMMIT
    cleaned = _clean(raw, committed)
    # Byte for byte the committed file when only the refused keys differed (a clean git status).
    text = head if head is not None and cleaned == committed else None
    with atomic_path(path) as tmp:
        tmp.write_text(text or yaml.safe_dump(cleaned, sort_keys=False))
    return raw, found


MIRROR = UrlRule(
    what="a URL starting with http://, https:// or file://",
    schemes=("http", "https", "file"),
    credentials="give a private mirror's login in ~/.netrc (or the file $NETRC names)",
)
TRACKING = UrlRule(
    what="a tracking URI with a scheme among http, https, file, sqlite, postgresql, mysql, "
    "mssql, databricks, databricks-uc, uc (e.g. http://host:5000, sqlite:///path/mlflow.db), "
    "or null",
    schemes=(
        "http",
        "https",
        "file",
        "sqlite",
        "postgresql",
        "mysql",
        "mssql",
        "databricks",
        "databricks-uc",
        "uc",
    ),
    credentials="set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or "
    "MLFLOW_TRACKING_TOKEN) instead",
    bare=("databricks", "databricks-uc"),
)
STORAGE = UrlRule(
    what="an Optuna storage URL (sqlite:///..., postgresql://...) or a journal file path",
    schemes=None,
    credentials="for PostgreSQL set PGPASSWORD or use ~/.pgpass (libpq/psycopg read both)",
    paths_ok=True,
)
