"""Hostile config input: whatever the YAML file or `--set` holds, loading ends in a config or a ConfigError
that names the key, quickly and with a bounded message; never another exception.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from adversarial import json_like, nasty_text, nested_list
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from components.config import ConfigError, DuetConfig, config_from_dict, dump_config, load_config
from components.tracking.redact import flatten

DEFAULTS = DuetConfig().model_dump(mode="json")
LEAVES = flatten(DEFAULTS)  # dotted key -> default (JSON text for non-strings)
SECTIONS = sorted(DEFAULTS)
MAX_MESSAGE = 16_000
# Keys whose bad value is reported under a related key (a cross-field rule names the rule's other side).
RELATED = {
    "model.tiny.vision_layers": ["vce.anchor_layer", "vce.reference_layers"],
    "model.arch": ["model.checkpoint"],
    "adapter.num_experts": ["adapter.top_k"],
    "data.source": ["data.input"],
    "data.val_fraction": ["data.test_fraction"],
}
pytestmark = pytest.mark.timeout(300)  # a hang (exponential echo, runaway recursion) fails instead of blocking
# Derandomized: CI runs the same examples every time, so a red run is reproducible.
FAST = settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


def _as_set_value(value: Any, ascii_only: bool) -> str:
    """How a user would type a value after `key=`: its JSON text (a YAML flow value)."""
    return json.dumps(value, ensure_ascii=ascii_only)


def _load(overrides: list[str] | None = None, path: Path | None = None) -> DuetConfig | ConfigError:
    started = time.monotonic()
    try:
        result: DuetConfig | ConfigError = load_config(path, overrides or [])
    except ConfigError as err:
        result = err
    # Generous for a loaded machine; an exponential echo or a runaway recursion takes minutes.
    assert time.monotonic() - started < 30, "loading a config must stay fast whatever it holds"
    if isinstance(result, ConfigError):
        message = str(result)
        assert len(message) <= MAX_MESSAGE, f"unbounded message ({len(message)} chars)"
        message.encode("utf-8")  # printable to any terminal or log, no lone surrogates
    else:  # whatever was accepted survives the trip through the resolved YAML every run logs
        assert config_from_dict(yaml.safe_load(dump_config(result))) == result
    return result


def _prefixes(key: str) -> list[str]:
    parts = [p for p in key.strip().split(".") if p]
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def _names_key(message: str, key: str) -> bool:
    candidates = [key] + _prefixes(key) + RELATED.get(key, [])
    return any(c[:100] in message or repr(c)[:100] in message for c in candidates)


# ---------------------------------------------------------------- --set


@FAST
@given(key=st.sampled_from(sorted(LEAVES)), value=st.one_of(json_like(), nasty_text), ascii_only=st.booleans(),
       raw=st.booleans())
def test_any_value_for_a_known_key_loads_or_names_the_key(key: str, value: Any, ascii_only: bool, raw: bool) -> None:
    text = value if raw and isinstance(value, str) else _as_set_value(value, ascii_only)
    result = _load([f"{key}={text}"])
    if isinstance(result, ConfigError):
        assert _names_key(str(result), key), f"{key!r} not named in: {result}"


@FAST
@given(
    key=st.one_of(
        nasty_text,
        st.builds(lambda s, tail: f"{s}.{tail}", st.sampled_from(SECTIONS), nasty_text),
        st.builds(lambda k, tail: f"{k}.{tail}", st.sampled_from(sorted(LEAVES)), nasty_text),
    ).filter(lambda k: "=" not in k),
    value=json_like(),
)
def test_unknown_or_malformed_keys_are_named(key: str, value: Any) -> None:
    result = _load([f"{key}={_as_set_value(value, True)}"])
    if not _prefixes(key):
        assert isinstance(result, ConfigError) and "empty key" in str(result)
    elif isinstance(result, ConfigError):
        assert _names_key(str(result), key), f"{key!r} not named in: {result}"
    else:  # accepted: the key must have been a real one after all
        assert _prefixes(key)[-1] in LEAVES or _prefixes(key)[-1] in SECTIONS


@pytest.mark.parametrize("key", sorted(LEAVES))
def test_every_key_accepts_its_own_default_through_set(key: str) -> None:
    """`--set k=<default>` on the bare defaults is a no-op for every key (partial sections keep defaults)."""
    section, _, rest = key.partition(".")
    default: Any = DEFAULTS[section]
    for part in rest.split("."):
        default = default[part]
    result = _load([f"{key}={json.dumps(default)}"])
    assert result == DuetConfig(), result




@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("run.seed=-1", "run.seed"), (f"run.seed={2**32}", "run.seed"), ("data.seed=1e100", "data.seed"),
        (f"tune.seed={10**40}", "tune.seed"), ("stage1.lr=.inf", "stage1.lr"), ("stage2.lr=.nan", "stage2.lr"),
        ("adapter.alpha=.inf", "adapter.alpha"), ("registry.min_margin=.inf", "registry.min_margin"),
        ("data.num_records=" + "9" * 5000, "data.num_records"), ("run.name=" + "[" * 3000 + "]" * 3000, "run.name"),
        ("adapter.target_modules=" + json.dumps(nested_list(500)), "adapter.target_modules"),
        ("run.work_dir={a: {b: {c: {d: {e: 1}}}}}", "run.work_dir"),
        ("data.image_size=16", "data.image_size"), ("run.name.deeper=x", "run.name"), ("run=3", "run"), ("stage1=[1, 2]", "stage1"),
    ],
)
def test_numeric_edges_and_deep_values_name_the_key(override: str, key: str) -> None:
    result = _load([override])
    assert isinstance(result, ConfigError), f"{override[:60]} was accepted"
    assert key in str(result)


def test_one_key_of_a_stage_keeps_that_stages_defaults() -> None:
    cfg = load_config(None, ["stage1.lr=3e-4", "stage2.max_steps=7"])
    assert (cfg.stage1.name, cfg.stage1.lr, cfg.stage1.global_batch) == ("stage1", 3e-4, 256)
    assert (cfg.stage2.name, cfg.stage2.adapter_lr, cfg.stage2.max_steps) == ("stage2", 2e-4, 7)


# ---------------------------------------------------------------- YAML files


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One folder for the generated files (hypothesis runs many examples per test)."""
    return tmp_path_factory.mktemp("configs")


@FAST
@given(
    tree=st.dictionaries(
        st.one_of(st.sampled_from(SECTIONS), nasty_text),
        st.one_of(
            json_like(),
            st.dictionaries(st.sampled_from([k.split(".", 1)[1] for k in LEAVES]), json_like(6), max_size=4),
        ),
        max_size=5,
    )
)
def test_random_yaml_files_load_or_raise_config_error(scratch: Path, tree: dict) -> None:
    try:
        text = yaml.safe_dump(tree, allow_unicode=True)
    except yaml.YAMLError:  # not representable (lone surrogates): write the JSON text, also YAML
        text = json.dumps(tree)
    path = scratch / "tree.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    _load(path=path)


@FAST
@given(data=st.binary(max_size=300))
def test_random_bytes_as_a_config_file(scratch: Path, data: bytes) -> None:
    path = scratch / "bytes.yaml"
    path.write_bytes(data)
    _load(path=path)


BILLION_LAUGHS = "\n".join(
    ["a: &a [x, x, x, x, x, x, x, x, x]"]
    + [f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 9)}]" for i in range(8)]
    + ["adapter:", "  target_modules: *i", "run:", "  name: *i"]
)


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ("adapter:\n  r: " + "[" * 20000 + "]" * 20000, "not valid YAML"),
        (BILLION_LAUGHS, "unknown key"),
        ("run: !!python/object/apply:os.system ['touch MARKER']", "not valid YAML"),
        (b"run:\n  name: \xff\xfe\x00", "cannot be read"),
        ("run:\n  name: " + "x" * 2_000_000 + "\nadapter:\n  r: " + "9" * 100_000, "not valid YAML"),
        ("run:\n  name: " + "x" * 2_000_000 + "\nadapter:\n  r: '" + "9" * 100_000 + "'", "adapter.r"),
        ("- 1\n- 2", "must hold a mapping"),
        ("model:\n  arch: checkpoint\n  checkpoint: CKPT\n", "model.checkpoint"),
    ],
)
def test_adversarial_files(tmp_path: Path, content: str | bytes, fragment: str) -> None:
    marker, ckpt = tmp_path / "ran", tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("[1, 2, 3]")  # JSON, but not a model config object
    path = tmp_path / "c.yaml"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content.replace("MARKER", str(marker)).replace("CKPT", str(ckpt)))
    result = _load(path=path)
    assert isinstance(result, ConfigError) and fragment in str(result), result
    assert not marker.exists()


@pytest.mark.parametrize("kind", ["directory", "long", "nul", "missing"])
def test_unusable_config_paths(tmp_path: Path, kind: str) -> None:
    path = {"directory": tmp_path, "long": tmp_path / ("x" * 5000), "nul": tmp_path / "a\x00b.yaml",
            "missing": tmp_path / "missing.yaml"}[kind]
    result = _load(path=path)
    assert isinstance(result, ConfigError) and "config file" in str(result)


@pytest.mark.parametrize(
    "checkpoint_json", ["[1, 2]", "{not json", '{"vision_config": {"num_hidden_layers": "24"}}',
                        '{"vision_config": {"num_hidden_layers": -3}}', '{"vision_config": []}']
)
def test_a_checkpoint_config_json_that_is_garbage_is_named(tmp_path: Path, checkpoint_json: str) -> None:
    (tmp_path / "config.json").write_text(checkpoint_json)
    result = _load(["model.arch=checkpoint", f"model.checkpoint={tmp_path}"])
    assert isinstance(result, ConfigError) and "model.checkpoint" in str(result), result


def test_a_checkpoint_path_too_long_for_the_filesystem_is_named() -> None:
    result = _load(["model.arch=checkpoint", "model.checkpoint=" + "a" * 5000])
    assert isinstance(result, ConfigError) and "model.checkpoint" in str(result), result
