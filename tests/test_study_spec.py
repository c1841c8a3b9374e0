"""Method-study declarations: every shipped study resolves to valid trial configs, and every mistake in a
study is refused before any training with a message naming the study, the variant and the key."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from components.config import ConfigError, DuetConfig, config_from_dict, load_config
from components.study.spec import resolve_study, stage1_key, vce_groups

CONFIGS = Path(__file__).resolve().parents[1] / "pipelines" / "configs"
SHIPPED = ("demo.yaml", "llava-1.5-7b.yaml")
STUDIES = ("methods", "components", "dual_lora_design", "rank")
# The paper's MoE-LoRA and RoDE splits at its total rank 64 (section 4.2.1).
PAPER_RANK, PAPER_RODE_RANKS = 64, [32, 16, 8, 8]


def raw(name: str) -> dict[str, Any]:
    return yaml.safe_load((CONFIGS / name).read_text())


def demo_with_study(spec: dict[str, Any], **section: Any) -> DuetConfig:
    """The demo config with one study `s` (and any other study-section keys) instead of the shipped ones."""
    tree = raw("demo.yaml")
    tree["study"] = {"studies": {"s": spec}, **section}
    return config_from_dict(tree)


def spec(variants: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return {"seeds": 2, "reference": next(iter(variants), "v"), "variants": variants, **fields}


def refusal(cfg_or_spec: dict[str, Any] | DuetConfig) -> str:
    """The message of the ConfigError that loading or resolving the study `s` raises."""
    with pytest.raises(ConfigError) as err:
        cfg = cfg_or_spec if isinstance(cfg_or_spec, DuetConfig) else demo_with_study(cfg_or_spec)
        resolve_study(cfg, "s")
    return str(err.value)


@pytest.mark.parametrize("config", SHIPPED)
@pytest.mark.parametrize("study", STUDIES)
def test_every_shipped_study_resolves(config: str, study: str) -> None:
    cfg = load_config(CONFIGS / config)
    resolved = resolve_study(cfg, study)
    declared = cfg.study.studies[study]
    assert resolved.name == study and declared.seeds == 3
    assert list(resolved.variants) == list(declared.variants)  # declaration order
    assert resolved.reference in resolved.variants
    assert len(resolved.trials) == len(declared.variants) * 3
    assert resolved.seeds == (cfg.run.seed, cfg.run.seed + 1, cfg.run.seed + 2)
    assert [(t.variant, t.seed) for t in resolved.trials] == [
        (v, s) for v in declared.variants for s in resolved.seeds]
    for trial in resolved.trials:
        assert trial.config.run.seed == trial.seed
        assert trial.config.study.studies == {}  # a trial trains one variant, not the declarations
        # Everything but the seed is the variant's config.
        assert trial.config.model_copy(update={"run": cfg.run}) == resolved.variants[trial.variant].model_copy(
            update={"run": cfg.run})


@pytest.mark.parametrize("config", SHIPPED)
@pytest.mark.parametrize("study", STUDIES)
def test_variants_are_the_config_with_their_overrides_given_as_set(config: str, study: str) -> None:
    cfg = load_config(CONFIGS / config)
    spec = cfg.study.studies[study]
    for variant, overrides in spec.variants.items():
        # The study's trainable set is one more override of every variant.
        as_set = [f"{key}={json.dumps(value)}" for key, value in overrides.items()]
        as_set.append(f"stage2.trainable={spec.trainable}")
        expected = load_config(CONFIGS / config, as_set).model_dump(exclude={"study"})
        assert resolve_study(cfg, study).variants[variant].model_dump(exclude={"study"}) == expected


@pytest.mark.parametrize("config", SHIPPED)
def test_the_study_section_changes_nothing_else(config: str, tmp_path: Path) -> None:
    tree = raw(config)
    del tree["study"]
    path = tmp_path / config
    path.write_text(yaml.safe_dump(tree))
    assert load_config(CONFIGS / config).model_dump(exclude={"study"}) == load_config(path).model_dump(
        exclude={"study"})
    assert load_config(path).study.studies == {} and DuetConfig().study.studies == {}


def adapters(config: str, study: str) -> dict[str, Any]:
    resolved = resolve_study(load_config(CONFIGS / config), study)
    return {name: variant.adapter for name, variant in resolved.variants.items()}


def test_paper_scale_studies_match_the_paper_tables() -> None:
    cfg = load_config(CONFIGS / "llava-1.5-7b.yaml")
    methods = resolve_study(cfg, "methods")
    assert [v.adapter.type for v in methods.variants.values()] == [
        "lora", "moe_lora_topk", "moe_lora_softmax", "rode", "dual_lora", "dual_lora"]
    assert {v.adapter.r for v in methods.variants.values()} == {PAPER_RANK}
    assert [v.vce.enabled for v in methods.variants.values()] == [False] * 5 + [True]
    moe = methods.variants["moe_lora_topk"].adapter
    assert (moe.num_experts, moe.expert_rank, moe.top_k) == (4, 16, 2)
    assert methods.variants["rode"].adapter.rode_ranks == PAPER_RODE_RANKS
    assert methods.reference == "lora" and not methods.adapter_only

    components = resolve_study(cfg, "components")
    assert {(v.adapter.type, v.vce.enabled) for v in components.variants.values()} == {
        ("lora", False), ("lora", True), ("dual_lora", False), ("dual_lora", True)}
    assert components.variants[components.reference].adapter.type == "lora"
    assert not components.variants[components.reference].vce.enabled

    design = resolve_study(cfg, "dual_lora_design")
    assert {(v.adapter.skill_norm, v.adapter.task_activation) for v in design.variants.values()} == {
        (True, "relu"), (True, "none"), (False, "relu"), (False, "none")}
    reference = design.variants[design.reference].adapter
    assert (reference.skill_norm, reference.task_activation) == (False, "none")

    rank = resolve_study(cfg, "rank")
    assert sorted((v.adapter.type, v.adapter.r) for v in rank.variants.values()) == sorted(
        (t, r) for t in ("lora", "dual_lora") for r in (32, 64, 128))
    assert rank.adapter_only and rank.variants[rank.reference].adapter.r == 32


@pytest.mark.parametrize("study", STUDIES)
def test_demo_ranks_are_the_papers_over_eight_with_its_alpha_over_r(study: str) -> None:
    paper, demo = adapters("llava-1.5-7b.yaml", study), adapters("demo.yaml", study)
    assert len(paper) == len(demo)
    for (_, big), (_, small) in zip(paper.items(), demo.items(), strict=True):
        assert (small.type, small.skill_norm, small.task_activation) == (big.type, big.skill_norm, big.task_activation)
        assert small.r * 8 == big.r
        assert small.alpha / small.r == big.alpha / big.r == 2
        if small.type.startswith("moe_lora"):
            assert small.num_experts * small.expert_rank == small.r and small.top_k == big.top_k
        if small.type == "rode":
            assert small.rode_ranks == [p * small.r // PAPER_RANK for p in PAPER_RODE_RANKS]
    shipped = [load_config(CONFIGS / c).study.studies[study] for c in SHIPPED]
    assert shipped[0].trainable == shipped[1].trainable and shipped[0].seeds == shipped[1].seeds


@pytest.mark.parametrize("config", SHIPPED)
def test_stage1_groups_split_by_vce_and_share_across_adapters(config: str) -> None:
    cfg = load_config(CONFIGS / config)
    seeds = resolve_study(cfg, "rank").seeds

    def groups(study: str) -> list[tuple[int, set[str]]]:
        return sorted((t[0].seed, {trial.variant for trial in t}) for t in vce_groups(resolve_study(cfg, study)).values())

    components = groups("components")
    assert components == sorted((s, g) for s in seeds for g in ({"lora", "dual_lora"}, {"lora_vce", "dual_lora_vce"}))
    methods = groups("methods")
    assert [g for _, g in methods].count({"dual_lora_vce"}) == 3 and len(methods) == 6
    everything = set(cfg.study.studies["rank"].variants)
    assert groups("rank") == [(s, everything) for s in seeds]  # adapter-only variants: one stage 1 per seed
    assert len(vce_groups(resolve_study(cfg, "dual_lora_design"))) == 3
    for study in STUDIES:  # a group never mixes seeds
        for trials in vce_groups(resolve_study(cfg, study)).values():
            assert len({t.seed for t in trials}) == 1


def test_stage1_key_follows_what_stage1_depends_on() -> None:
    cfg = load_config(CONFIGS / "demo.yaml")
    key = stage1_key(cfg)
    assert stage1_key(load_config(CONFIGS / "demo.yaml", ["adapter.r=4", "stage2.lr=1e-4"])) == key
    for changed in ("vce.heads=2", "stage1.lr=1e-4", "data.num_records=100", "run.seed=1", "model.max_length=128"):
        assert stage1_key(load_config(CONFIGS / "demo.yaml", [changed])) != key, changed


# ---------------------------------------------------------------- refusals


def test_unknown_and_missing_studies_are_named() -> None:
    cfg = load_config(CONFIGS / "demo.yaml")
    assert resolve_study(cfg).name == "methods"  # study.name
    with pytest.raises(ConfigError, match=r"unknown study 'method'; declared in study.studies: methods, components"):
        resolve_study(cfg, "method")
    with pytest.raises(ConfigError, match="no studies declared: add one under study.studies"):
        resolve_study(DuetConfig())
    with pytest.raises(ConfigError, match=r"no study chosen: .*declared: s"):
        resolve_study(demo_with_study(spec({"v": {}})))
    with pytest.raises(ConfigError, match=r"study.name 'x' is not a declared study \(study.studies: s\)"):
        demo_with_study(spec({"v": {}}), name="x")
    with pytest.raises(ConfigError, match=r"study.name 'x' is not a declared study \(study.studies: none\)"):
        load_config(CONFIGS / "demo.yaml", ["study.studies={}", "study.name=x"])


@pytest.mark.parametrize(
    ("overrides", "fragments"),
    [
        ({"adapter.rr": 8}, ["adapter.rr: unknown key (did you mean adapter.r?)"]),
        ({"adaptor.r": 8}, ["adaptor: unknown key (did you mean adapter?)"]),
        ({"adapter.r": 0}, ["adapter.r: Input should be greater than 0 (got 0)"]),
        ({"adapter.type": "lorax"}, ["adapter.type: Input should be 'none', 'lora'"]),
        ({"adapter.top_k": 5}, ["adapter.top_k (5) must be <= adapter.num_experts (4)"]),
        ({"adapter.r.x": 1}, ["override adapter.r.x: r is a value, not a section"]),
        ({"vce.reference_layers": [-8, 30]}, ["vce.reference_layers[1] = 30 is outside the vision tower"]),
    ],
)
def test_a_variant_override_the_config_refuses_names_study_variant_and_key(
    overrides: dict[str, Any], fragments: list[str]
) -> None:
    message = refusal(spec({"ok": {}, "v": overrides}, reference="ok"))
    assert message.startswith("study 's', variant 'v': ")
    assert "study.studies.s.variants.v" in message  # where to fix it
    for fragment in fragments:
        assert fragment in message


def test_string_values_are_coerced_or_refused_as_set_does() -> None:
    coerced = resolve_study(demo_with_study(spec({"v": {"adapter.r": "8", "vce.enabled": "false"}})), "s")
    assert coerced.variants["v"].adapter.r == load_config(CONFIGS / "demo.yaml", ["adapter.r='8'"]).adapter.r == 8
    assert coerced.variants["v"].vce.enabled is False
    # A YAML string stays a string, as it does in the config file: not re-read as a number or a mapping.
    texts = resolve_study(demo_with_study(spec({"v": {"run.name": "2024", "tracking.experiment": "a: b"}})), "s")
    assert (texts.variants["v"].run.name, texts.variants["v"].tracking.experiment) == ("2024", "a: b")
    with pytest.raises(ConfigError) as by_set:
        load_config(CONFIGS / "demo.yaml", ["adapter.r=eight"])
    pydantic_line = str(by_set.value).removeprefix("invalid config:\n")
    assert pydantic_line.startswith("  adapter.r: Input should be a valid integer")
    assert pydantic_line in refusal(spec({"v": {"adapter.r": "eight"}}))


@pytest.mark.parametrize(
    ("study", "fragments"),
    [
        (spec({"v": {}}, seeds=0), ["study.studies.s.seeds: must be at least 1"]),
        (spec({"v": {}}, reference="lorax"), ["study.studies.s: reference 'lorax' is not one of the variants (v)"]),
        (spec({}, reference="v"), ["study.studies.s.variants: no variants"]),
        (spec({"v": {"run.seed": 3}}), ["variant 'v', key 'run.seed': seeds belong to the study"]),
        (spec({"v": {"run": {"seed": 3}}}), ["variant 'v', key 'run': seeds belong to the study"]),
        (spec({"v": {"study.name": "s"}}), ["variant 'v', key 'study.name': a variant cannot change the study"]),
        (spec({"v": {"adapter.r=8": 1}}), ["variant 'v', key 'adapter.r=8': an override key is a dotted config key"]),
        (spec({"a b": {}}), ["variant name 'a b' must be 1-64 letters"]),
        (spec({"v": {}}, trainable="adapter"), ["study.studies.s.trainable: Input should be 'all' or 'adapter_only'"]),
        (spec({"v": {}}, seed=3), ["study.studies.s.seed: unknown key"]),
    ],
)
def test_a_study_the_config_refuses_at_load(study: dict[str, Any], fragments: list[str]) -> None:
    with pytest.raises(ConfigError) as err:
        demo_with_study(study)
    for fragment in fragments:
        assert fragment in str(err.value)


def test_trial_seeds_start_at_run_seed() -> None:
    resolved = resolve_study(load_config(CONFIGS / "demo.yaml", ["run.seed=10"]), "components")
    assert resolved.seeds == (10, 11, 12)
    assert [t.config.run.seed for t in resolved.trials if t.variant == "lora_vce"] == [10, 11, 12]


def test_seeds_past_the_seed_range_are_refused_before_training() -> None:
    cfg = demo_with_study(spec({"v": {}}, seeds=3))
    cfg.run.seed = 2**32 - 2
    assert "seed 4294967296 is out of range" in refusal(cfg)


def test_a_variant_without_overrides_trains_the_config_as_it_is() -> None:
    cfg = demo_with_study(spec({"base": None, "lora": {"adapter.type": "lora"}}))
    resolved = resolve_study(cfg, "s")
    assert resolved.variants["base"].model_dump(exclude={"study"}) == cfg.model_dump(exclude={"study"})
    assert resolved.variants["lora"].adapter.type == "lora" and cfg.adapter.type == "dual_lora"
    assert len(vce_groups(resolved)) == 2  # one stage 1 per seed, shared by both variants


def test_the_study_trainable_set_reaches_every_variant_and_no_variant_may_set_it() -> None:
    cfg = load_config(CONFIGS / "demo.yaml")
    assert {v.stage2.trainable for v in resolve_study(cfg, "rank").variants.values()} == {"adapter_only"}
    assert {v.stage2.trainable for v in resolve_study(cfg, "methods").variants.values()} == {"all"}
    tree = raw("demo.yaml")
    tree["study"]["studies"]["rank"]["variants"]["lora_r4"]["stage2.trainable"] = "all"
    with pytest.raises(ConfigError, match=r"variant 'lora_r4': stage2.trainable is set for the whole study by "
                                          r"study.studies.rank.trainable"):
        resolve_study(config_from_dict(tree), "rank")


def test_stage1_cannot_be_adapter_only() -> None:
    with pytest.raises(ConfigError, match="stage1.trainable must be 'all'"):
        load_config(CONFIGS / "demo.yaml", ["stage1.trainable=adapter_only"])


def test_compare_with_must_name_variants() -> None:
    tree = raw("demo.yaml")
    tree["study"]["studies"]["rank"]["compare_with"] = {"dual_lora_r8": "lora_r9"}
    with pytest.raises(ConfigError, match=r"compare_with names 'lora_r9', not a variant"):
        config_from_dict(tree)
