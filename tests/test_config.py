"""The config contract: params.yaml == composition of conf/, and one clear line per bad value."""

from __future__ import annotations

import re
import subprocess
import sys
import types
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from deep_repro import config
from deep_repro.config import stage_view as stage_config
from deep_repro.config import urls
from deep_repro.errors import ConfigError
from deep_repro.models.registry import MODELS

REPO = Path(__file__).resolve().parents[1]


def test_params_yaml_is_the_composition_of_conf() -> None:
    # `dvc repro` does not recompose conf/: a stale params.yaml would silently train the old
    # config. Fix a failure with `uv run python scripts/compose_params.py`.
    # The committed composition, not the working file: `dvc exp run -S ...` rewrites params.yaml
    # in the workspace, and a user's experiment must not fail the test suite.
    shown = subprocess.run(
        ["git", "show", "HEAD:params.yaml"], cwd=REPO, capture_output=True, text=True, check=False
    )
    text = shown.stdout if shown.returncode == 0 else (REPO / "params.yaml").read_text()
    committed = yaml.safe_load(text)
    assert committed == config.compose([], REPO / "conf")


def conf_values(conf: Path) -> dict[str, Any]:
    """What conf/ says the default config is, read from its YAML files without Hydra or the
    schema: config.yaml's own keys plus the chosen file of each group in its defaults list."""
    root = yaml.safe_load((conf / "config.yaml").read_text())
    values = {k: v for k, v in root.items() if k != "defaults"}
    for entry in root["defaults"]:
        if entry != "_self_":
            ((group, choice),) = entry.items()
            values[group] = yaml.safe_load((conf / group / f"{choice}.yaml").read_text())
    return values


def test_default_config_validates() -> None:
    # The validated default config is exactly what conf/ says, key for key: the schema adds
    # no value of its own (and `dvc exp run -S model.lr=0.01` works since model.lr exists).
    cfg = config.validate(config.compose([], REPO / "conf"))
    assert config.to_dict(cfg) == conf_values(REPO / "conf")
    assert cfg.model.name == "cnn" and cfg.model.lr == 0.005
    assert cfg.data.subset is None and cfg.tracking.uri is None


def _schemas() -> set[type]:
    """Every dataclass the config is validated against: Config, its parts, every option of a
    tagged union and every registered architecture."""
    found: set[type] = set()
    todo: list[Any] = [config.Config, *(spec.schema for spec in MODELS.values())]
    while todo:
        tp = todo.pop()
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            if tp not in found:
                found.add(tp)
                todo += typing.get_type_hints(tp).values()
        else:
            todo += typing.get_args(tp)
    return found


def test_schemas_hold_no_default_values() -> None:
    # conf/ is the one source of values: a default in the schema would be a second one that
    # silently disagrees (it once said train.epochs 12 and label_smoothing 0.0; conf/ 15, 0.05).
    schemas = _schemas()
    assert {"Config", "TrainConfig", "SGDConfig", "CNNConfig", "MobileNetConfig"} <= {
        s.__name__ for s in schemas
    }
    defaults = [
        f"{s.__name__}.{name}"
        for s in schemas
        for name, info in s.model_fields.items()
        if not info.is_required()
    ]
    assert defaults == []


def test_missing_key_is_an_error_not_a_default() -> None:
    raw = config.compose([], REPO / "conf")
    del raw["train"]["label_smoothing"]
    with pytest.raises(ConfigError, match=r"^config error: missing key train\.label_smoothing$"):
        config.validate(raw)


def test_every_model_in_conf_is_registered_with_a_search_space() -> None:
    # Adding an architecture = conf/model/<name>.yaml + its entries in config/architectures.py
    # and models/registry.py + conf/search/<name>.yaml; nothing else names it.
    conf_models = {p.stem for p in (REPO / "conf/model").glob("*.yaml")}
    assert conf_models == set(MODELS)
    assert conf_models == {p.stem for p in (REPO / "conf/search").glob("*.yaml")}


def test_validation_imports_no_torch(tmp_path: Path) -> None:
    # Every stage and CLI command validates its config first: that must stay cheap, and so must
    # the validate stage's checks of this machine (preflight) for a CPU config.
    # The composition of conf/, not the workspace params.yaml: after a user's
    # `dvc exp run -S model=logreg` that file holds another model (and once failed this test).
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(config.compose([], REPO / "conf")))
    code = (
        "import sys; from pathlib import Path; from deep_repro import config, models, preflight; "
        f"cfg = config.load_config(Path({str(params)!r})); assert cfg.is_torch_model; "
        f"preflight.check(cfg, Path({str(tmp_path)!r})); "
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert proc.stdout.strip() == "[]"


def test_a_stage_that_reads_no_model_param_validates_all_but_model_without_model_code(
    tmp_path: Path,
) -> None:
    # Issue 21: the data stages must not depend on model code (adding an architecture would
    # rerun the download), so they check every section but `model`, and import no model module.
    raw = config.compose([], REPO / "conf")
    raw["model"] = {"name": "not-a-model-yet", "lr": -1}  # only `validate` and train see it
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(raw))
    code = (
        "import sys; from pathlib import Path; "
        "from deep_repro.config.stage_view import load_stage_config, unrestricted; "
        f"cfg = load_stage_config('split', Path({str(params)!r})); "
        "print(cfg.split.val_size, unrestricted(cfg).model.name, "
        "sorted(m for m in sys.modules if m.startswith('deep_repro.models')))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [str(raw["split"]["val_size"]), "not-a-model-yet", "[]"]
    # The same file fails every stage that reads the model, and the whole-config check.
    with pytest.raises(ConfigError, match=r"model\.name = 'not-a-model-yet': expected one of"):
        stage_config.load_stage_config("train", params)
    with pytest.raises(ConfigError, match=r"model\.name = 'not-a-model-yet'"):
        config.load_config(params)
    # Every other section is still checked in full by a data stage.
    raw["model"] = config.compose([], REPO / "conf")["model"]
    raw["split"]["val_size"] = 1.5
    params.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=r"split.val_size = 1.5: expected a value < 1.0"):
        stage_config.load_stage_config("download", params)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_model_group_composes(name: str) -> None:
    cfg = config.validate(config.compose([f"model={name}"], REPO / "conf"))
    assert cfg.model.name == name
    assert isinstance(cfg.model, MODELS[name].schema)
    assert cfg.is_torch_model == (MODELS[name].trainer == "torch")


@pytest.mark.parametrize(
    "group,choice",
    [("optimizer", "sgd"), ("scheduler", "cosine"), ("scheduler", "none"), ("augment", "none")],
)
def test_every_training_group_composes(group: str, choice: str) -> None:
    cfg = config.validate(config.compose([f"{group}={choice}"], REPO / "conf"))
    assert getattr(cfg, group).name == choice


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["model.lr=-0.1"], "model.lr = -0.1: expected a value > 0"),
        (["model.lr=0"], "model.lr = 0.0: expected a value > 0"),
        (["train.epochs=0"], "train.epochs = 0: expected a value >= 1"),
        (["split.val_size=1.5"], "split.val_size = 1.5: expected a value < 1"),
        (["split.val_size=0"], "split.val_size = 0.0: expected a value > 0"),
        (["train.batch_size=abc"], "train.batch_size = 'abc': expected an integer"),
        (["+train.epochz=3"], "unknown key train.epochz"),
        (["+colour=blue"], "unknown key colour"),
        (["model.name=transformer"], "model.name = 'transformer': expected one of"),
        (["optimizer.name=rmsprop"], "optimizer.name = 'rmsprop': expected one of 'adamw', 'sgd'"),
        (["scheduler.name=step"], "scheduler.name = 'step'"),
        (["train.device=tpu"], "train.device = 'tpu'"),
        (["train.num_threads=0"], "train.num_threads = 0: expected a value >= 1"),
        (
            ["train.num_threads=fast"],
            "train.num_threads = 'fast': expected an integer or one of 'auto'",
        ),
        (["data.subset=-5"], "data.subset = -5: expected a value >= 20"),
        (["data.mirrors=[ftp://x]"], "data.mirrors[0] = 'ftp://x'"),
        (["data.sha256.train-images-idx3-ubyte=abc"], "data.sha256.train-images-idx3-ubyte"),
        (["tune.n_trials=0"], "tune.n_trials = 0: expected a value >= 1"),
        (["tune.sampler=annealing"], "tune.sampler = 'annealing'"),
        (["model.dropout=1.0"], "model.dropout = 1.0: expected a value < 1"),
        (["model.lr=inf"], "model.lr = inf: expected a finite number"),
        (["model.lr=nan"], "model.lr = nan: expected a finite number"),
        (
            ["optimizer.weight_decay=-inf"],
            "optimizer.weight_decay = -inf: expected a finite number",
        ),
        (["evaluate.fail_below=nan"], "evaluate.fail_below = nan: expected a finite number"),
        (
            ["analyze.near_duplicate_threshold=40"],
            "analyze.near_duplicate_threshold = 40.0: expected a value <= 32",
        ),
        (["analyze.duplicate_examples=-1"], "analyze.duplicate_examples = -1: expected a value >="),
        (["model.channels=[]"], "model.channels = []: expected a non-empty list of integers >= 1"),
        (["model.channels=[8,8,8,8]"], "model.channels = [8, 8, 8, 8]: expected at most 3 conv"),
        (["model.convs_per_block=0"], "model.convs_per_block = 0: expected a value >= 1"),
        (["model.pool_before_bn=maybe"], "model.pool_before_bn = 'maybe': expected"),
        (["postprocess.tta=vflip"], "postprocess.tta = 'vflip': expected one of"),
        (["optimizer.betas=[0.9,1.5]"], "optimizer.betas = [0.9, 1.5]: expected two numbers"),
        (["+optimizer.momentun=0.9"], "unknown key optimizer.momentun"),
        (["+model.channels=[8]", "model=mlp"], "unknown key model.channels"),
        # numpy's seeding takes 0..2**32-1: out of it, train failed with a traceback.
        (["seed=-1"], "seed = -1: expected a value >= 0"),
        # A plain union fails once per branch: the range error of the branch of the right type
        # is the one that says something; a value of no branch's type names them all.
        (["train.num_threads=0"], "train.num_threads = 0: expected a value >= 1"),
        (["train.num_threads=many"], "train.num_threads = 'many': expected an integer or one of"),
        (["train.epochs=true"], "train.epochs = True: expected an integer"),
        (["data.subset=10"], "data.subset = 10: expected a value >= 20"),
        ([f"seed={2**70}"], f"seed = {2**70}: expected a value <= 4294967295"),
        (["split.seed=-1"], "split.seed = -1: expected a value >= 0"),
        ([f"tune.seed={2**32}"], f"tune.seed = {2**32}: expected a value <= 4294967295"),
    ],
)
def test_bad_values_name_the_key(overrides: list[str], message: str) -> None:
    raw = config.compose(overrides, REPO / "conf")
    with pytest.raises(ConfigError) as info:
        config.validate(raw)
    text = str(info.value)
    assert message in text
    assert "\n" not in text


@pytest.mark.parametrize("value", ["auto", "1", "3"])
def test_num_threads_is_auto_or_a_positive_int(value: str) -> None:
    cfg = config.validate(config.compose([f"train.num_threads={value}"], REPO / "conf"))
    assert cfg.train.num_threads == (value if value == "auto" else int(value))


@pytest.mark.parametrize("path", sorted((REPO / "conf/experiment").glob("*.yaml")), ids=str)
def test_every_committed_experiment_validates(path: Path) -> None:
    """`dvc exp run -S +experiment=<name>` must not fail on a config error after a conf/ change
    (tuned_cnn pins the architecture it was tuned with when the cnn defaults moved on)."""
    cfg = config.validate(config.compose([f"+experiment={path.stem}"], REPO / "conf"))
    assert cfg.model.name in MODELS


def test_a_key_of_another_option_of_the_group_is_ignored() -> None:
    # Search spaces set `optimizer.momentum` while the sampled optimizer may be adamw.
    cfg = config.validate(config.compose(["+optimizer.momentum=0.5"], REPO / "conf"))
    assert config.to_dict(cfg.optimizer) == {
        "name": "adamw",
        "weight_decay": 0.0005,
        "betas": [0.9, 0.999],
    }


def test_unknown_model_group_is_rejected_by_hydra() -> None:
    with pytest.raises(
        ConfigError,
        match=r"^config error: cannot compose conf/ with overrides "
        r"model=transformer: .*Could not find 'model/transformer'$",
    ):
        config.compose(["model=transformer"], REPO / "conf")


def test_stage_exits_nonzero_with_one_line_before_any_work(tmp_path: Path) -> None:
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    raw = config.compose(["train.epochs=0"], REPO / "conf")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    proc = subprocess.run(
        [sys.executable, str(REPO / "stages/train.py")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: config error: train.epochs = 0: expected a value >= 1"
    )
    assert not (tmp_path / "models").exists() and not (tmp_path / "mlflow.db").exists()


def test_missing_params_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"params.yaml not found"):
        config.load_config(tmp_path / "params.yaml")


def test_flatten() -> None:
    assert config.flatten({"a": {"b": 1, "c": {"d": [1, 2]}}, "e": None}) == {
        "a.b": 1,
        "a.c.d": [1, 2],
        "e": None,
    }


# --------------------------------------------------------------------------- URL-valued keys
# Every URL-valued key, by schema path (`[]`: each item of a list). A new one must be declared
# with a URL type of deep_repro.config (checked by deep_repro.config.urls) and added here.
URL_KEYS = {"data.mirrors[]": "MIRROR", "tracking.uri": "TRACKING", "tune.storage": "STORAGE"}
URL_LIKE_NAME = re.compile(r"ur[il]|mirror|storage|endpoint|host|server|dsn|remote", re.I)


def _leaves(tp: Any, key: str) -> list[tuple[str, Any]]:
    """(schema path, annotation) of every non-dataclass field under `tp`, with Annotated kept."""
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        hints = typing.get_type_hints(tp, include_extras=True)
        return [leaf for name in tp.model_fields for leaf in _leaves(hints[name], _at(key, name))]
    origin = typing.get_origin(tp)
    if origin is list:
        return _leaves(typing.get_args(tp)[0], f"{key}[]")
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return [leaf for a in args for leaf in _leaves(a, key)]
    return [(key, tp)]


def _at(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _all_leaves() -> list[tuple[str, Any]]:
    found = _leaves(config.Config, "")
    for spec in MODELS.values():
        found += _leaves(spec.schema, "model")
    return found


def _url_rule(tp: Any) -> urls.UrlRule | None:
    if typing.get_origin(tp) is typing.Annotated:
        rules = [getattr(m, "func", None) for m in typing.get_args(tp)[1:]]  # AfterValidator(rule)
        return next((r for r in rules if isinstance(r, urls.UrlRule)), None)
    return None


def test_every_url_valued_key_has_the_url_type() -> None:
    typed = {key: rule for key, tp in _all_leaves() if (rule := _url_rule(tp)) is not None}
    assert {k: r for k, r in typed.items()} == {k: getattr(urls, v) for k, v in URL_KEYS.items()}
    # A string key that looks like a URL (by name, or a `://` value anywhere in conf/) but was
    # declared as a plain `str` would escape the credential check: list it with its type.
    values: dict[str, list[str]] = {}
    for path in (REPO / "conf").rglob("*.yaml"):
        group = path.parent.name if path.parent != REPO / "conf" else ""
        for key, value in urls.strings(yaml.safe_load(path.read_text()) or {}, group):
            values.setdefault(re.sub(r"\[\d+\]", "[]", key), []).append(value)
    untyped = [
        key
        for key, tp in _all_leaves()
        if key not in typed
        and str in {tp, *typing.get_args(tp)}
        and (
            URL_LIKE_NAME.search(key.rsplit(".", 1)[-1])
            or any("://" in v for v in values.get(key, []))
        )
    ]
    assert untyped == []


SECRET = "-".join(("S3CRET", "x9"))  # joined at run time: test projects copy this file into git


@pytest.mark.parametrize(
    ("override", "key"),
    [
        (f"data.mirrors=[http://u:{SECRET}@mirror.example/fmnist]", "data.mirrors[0]"),
        (f"data.mirrors=[file:///x,https://ghp_{SECRET}@github.example/f]", "data.mirrors[1]"),
        (f"data.mirrors=['https://b.example/f?X-Amz-Signature={SECRET}']", "data.mirrors[0]"),
        (f"data.mirrors=['https://b.example/f?a=1&X-Amz-Credential={SECRET}']", "data.mirrors[0]"),
        (f"data.mirrors=['https://b.example/f?sv=1&sig={SECRET}']", "data.mirrors[0]"),
        (f"tracking.uri=https://{SECRET}@mlflow.example", "tracking.uri"),
        (f"tracking.uri='https://mlflow.example/?access_token={SECRET}'", "tracking.uri"),
        (f"tune.storage=postgresql://alice:{SECRET}@db.example/optuna", "tune.storage"),
        (
            f"tune.storage='postgresql://alice@db.example/optuna?sslpassword={SECRET}'",
            "tune.storage",
        ),
        (f"tune.storage='mysql://db.example/optuna?Password={SECRET}'", "tune.storage"),
        # review findings: encoded names, `*key` names, JWTs, a login with no scheme
        (f"tracking.uri='https://mlflow.example/?pass%77ord={SECRET}'", "tracking.uri"),
        (f"data.mirrors=['https://b.example/f?x-api-key={SECRET}']", "data.mirrors[0]"),
        (f"data.mirrors=['https://b.example/f?jwt={SECRET}']", "data.mirrors[0]"),
        (f"data.mirrors=['u:{SECRET}@b.example/f']", "data.mirrors[0]"),
    ],
)
def test_a_credential_in_any_url_key_is_refused_in_one_line(override: str, key: str) -> None:
    raw = config.compose([override], REPO / "conf")
    with pytest.raises(ConfigError) as info:
        config.validate(raw)
    message = str(info.value)
    assert message.startswith(f"config error: {key} = '") and "***" in message
    assert "expected a URL without credentials" in message
    assert SECRET not in message and "\n" not in message


def test_a_database_role_name_is_not_a_credential() -> None:
    # libpq takes the role from the URL and its password from PGPASSWORD / ~/.pgpass.
    cfg = config.validate(
        config.compose(["tune.storage=postgresql://alice@db.example/optuna"], REPO / "conf")
    )
    assert cfg.tune.storage == "postgresql://alice@db.example/optuna"
