"""Config loading: every impossible value is refused before any work, naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from components.config import (
    ConfigError,
    DuetConfig,
    dump_config,
    durable_work_dir,
    load_config,
    parse_cli,
)

CONFIGS = Path(__file__).resolve().parents[1] / "pipelines" / "configs"


@pytest.mark.parametrize("name", ["demo.yaml", "llava-1.5-7b.yaml", "unifood.yaml"])
def test_shipped_configs_load(name: str) -> None:
    cfg = load_config(CONFIGS / name)
    # The paper's q/v targets, except the demo: its tiny LM, warmed up on text only, needs every linear.
    expected = ["q_proj", "v_proj"] if name != "demo.yaml" else [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert cfg.adapter.target_modules == expected


def test_paper_settings_in_7b_config() -> None:
    cfg = load_config(CONFIGS / "llava-1.5-7b.yaml")
    assert (cfg.adapter.type, cfg.adapter.r, cfg.adapter.alpha, cfg.adapter.dropout) == ("dual_lora", 128, 256, 0.05)
    assert (cfg.stage1.lr, cfg.stage1.global_batch, cfg.stage1.weight_decay) == (1e-3, 256, 0.0)
    assert (cfg.stage2.adapter_lr, cfg.stage2.lr, cfg.stage2.global_batch) == (2e-4, 2e-5, 128)
    assert [cfg.vce.anchor_layer, *cfg.vce.reference_layers] == [-2, -8, -14, -20]
    assert load_config(CONFIGS / "unifood.yaml").adapter.r == 64


def test_overrides_apply_with_yaml_types() -> None:
    cfg = load_config(
        CONFIGS / "demo.yaml",
        ["adapter.r=8", "stage2.adapter_lr=3e-4", "vce.enabled=false", "adapter.target_modules=[q_proj]"],
    )
    assert cfg.adapter.r == 8 and cfg.stage2.adapter_lr == 3e-4
    assert cfg.vce.enabled is False and cfg.adapter.target_modules == ["q_proj"]


def test_defaults_are_valid_and_roundtrip_through_yaml(tmp_path: Path) -> None:
    cfg = DuetConfig()
    path = tmp_path / "c.yaml"
    path.write_text(dump_config(cfg))
    assert load_config(path) == cfg
    assert load_config(path).hash() == cfg.hash()


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("adapter.r=0", "adapter.r"),
        ("adapter.r=-4", "adapter.r"),
        ("adapter.alpha=0", "adapter.alpha"),
        ("stage1.lr=0", "stage1.lr"),
        ("stage2.adapter_lr=-1e-4", "stage2.adapter_lr"),
        ("adapter.dropout=1.0", "adapter.dropout"),
        ("adapter.dropout=-0.1", "adapter.dropout"),
        ("vce.anchor_layer=-30", "vce.anchor_layer = -30 is outside the vision tower (24 layers)"),
        ("vce.reference_layers=[-8, 25]", "vce.reference_layers[1] = 25"),
        ("adapter.target_modules=[]", "adapter.target_modules"),
        ("adapter.top_k=5", "adapter.top_k (5) must be <= adapter.num_experts (4)"),
        ("adapter.type=lorax", "adapter.type"),
        ("adapter.rank=8", "adapter.rank: unknown key"),
        ("adapter.r=eight", "adapter.r"),
        ("deepspeed.zero_stage=4", "deepspeed.zero_stage"),
    ],
)
def test_bad_values_are_refused_with_the_key(override: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(CONFIGS / "llava-1.5-7b.yaml", [override])
    assert fragment in str(err.value)


def test_allowed_values_are_listed_for_choices() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, ["adapter.type=lorax"])
    assert "dual_lora" in str(err.value) and "moe_lora_topk" in str(err.value)


def test_layer_bounds_follow_the_tiny_tower() -> None:
    with pytest.raises(ConfigError, match="6 layers"):
        load_config(None, ["model.tiny.vision_layers=6"])
    cfg = load_config(None, ["model.tiny.vision_layers=6", "vce.reference_layers=[-3, -5]"])
    assert cfg.vce.reference_layers == [-3, -5]


def test_unknown_section_and_file_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"adaptor": {"r": 4}}))
    with pytest.raises(ConfigError, match="adaptor: unknown key"):
        load_config(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(bad)
    with pytest.raises(ConfigError, match="expected dotted.key=value"):
        load_config(None, ["adapter.r"])


def test_parse_cli_exits_with_message(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse_cli("test", ["--set", "adapter.r=0"])
    assert exit_info.value.code == 2
    assert "[duet] error: invalid config:\n  adapter.r:" in capsys.readouterr().err
    cfg, _ = parse_cli("test", ["--config", str(CONFIGS / "demo.yaml"), "--set", "adapter.r=4"])
    assert cfg.adapter.r == 4


def test_a_misspelt_key_gets_a_suggestion() -> None:
    with pytest.raises(ConfigError, match=r"adapter\.rr: unknown key \(did you mean adapter\.r\?\)"):
        load_config(None, ["adapter.rr=3"])
    with pytest.raises(ConfigError, match=r"stage2\.global_bach: unknown key \(did you mean stage2\.global_batch\?\)"):
        load_config(None, ["stage2.global_bach=8"])
    with pytest.raises(ConfigError, match=r"adaptor: unknown key \(did you mean adapter\?\)"):
        load_config(None, ["adaptor.r=3"])
    with pytest.raises(ConfigError, match=r"zzz: unknown key \(check the spelling"):
        load_config(None, ["zzz=1"])


def test_an_empty_section_means_its_defaults(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("tune:\nmodel:\n  tiny:\nadapter:\n  r: 8\n")
    cfg = load_config(path, ["tune.num_samples=3"])
    assert cfg.tune.num_samples == 3 and cfg.model.tiny == load_config(None).model.tiny and cfg.adapter.r == 8


def test_a_global_batch_the_workers_cannot_share_is_refused_up_front() -> None:
    with pytest.raises(ConfigError, match=r"stage2\.global_batch \(7\) is not divisible by scaling\.num_workers \(2\)"):
        load_config(None, ["stage2.global_batch=7", "scaling.num_workers=2"])
    assert load_config(None, ["stage2.global_batch=8", "scaling.num_workers=2"]).stage2.global_batch == 8


def test_offload_needs_a_zero_stage() -> None:
    with pytest.raises(ConfigError, match="offload_optimizer needs deepspeed.zero_stage 1, 2 or 3"):
        load_config(None, ["deepspeed.offload_optimizer=true", "deepspeed.zero_stage=0"])


def test_relative_paths_follow_the_work_dir_and_inputs_the_current_directory(tmp_path: Path) -> None:
    cfg = load_config(CONFIGS / "demo.yaml", ["run.work_dir=w", "data.input=in.json", "data.source=llava",
                                              "scaling.storage_path=ray"])
    resolved = cfg.with_absolute_paths(cwd=str(tmp_path))
    assert resolved.run.work_dir == str(tmp_path / "w")
    assert resolved.data.root == str(tmp_path / "w" / "datasets")
    assert resolved.model.checkpoint == str(tmp_path / "w" / "base" / "tiny"), "the tiny base is built there"
    assert resolved.scaling.storage_path == str(tmp_path / "w" / "ray")
    assert resolved.data.input == str(tmp_path / "in.json"), "an input is where the user typed it"
    assert resolved.with_absolute_paths(cwd="/elsewhere") == resolved, "idempotent"
    given = load_config(None, ["model.arch=checkpoint", "model.checkpoint=ckpt/llava", "run.work_dir=w"])
    assert given.with_absolute_paths(cwd=str(tmp_path)).model.checkpoint == str(tmp_path / "ckpt" / "llava")


def test_a_relative_work_dir_inside_a_ray_job_package_goes_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    package = tmp_path / "session_1" / "runtime_resources" / "working_dir_files" / "_ray_pkg_abc"
    assert durable_work_dir(".duet", str(package)) == str(tmp_path / "home" / ".duet")
    assert durable_work_dir("/data/duet", str(package)) == "/data/duet"
    assert durable_work_dir(".duet", str(tmp_path)) == str(tmp_path / ".duet")
