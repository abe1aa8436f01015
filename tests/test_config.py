"""Typed configs: presets, TOML files, checked overrides, round trips, immutability."""

from __future__ import annotations

import dataclasses
import json
import tomllib
from pathlib import Path

import pytest

from trainer.config import (
    ConfigError,
    ModelConfig,
    OptimConfig,
    RunConfig,
    TrainConfig,
    apply_overrides,
    load_config,
    model_config_from_dict,
    preset_description,
    preset_names,
    run_config_from_dict,
)
from trainer.errors import TrainerError


def test_presets_load():
    assert {"tiny", "paper-88m"} <= set(preset_names())
    for name in preset_names():
        cfg = load_config(name)
        assert isinstance(cfg, RunConfig)
        assert cfg.preset == name
        assert cfg.name == name
        assert preset_description(name)  # every preset says in one line what it is


def test_paper_preset_matches_the_source_documents():
    cfg = load_config("paper-88m")
    m = cfg.model
    assert (m.vocab_size, m.d_model, m.n_layers, m.n_heads, m.n_kv_heads) == (49152, 512, 22, 8, 4)
    assert (m.resolved_head_dim, m.d_ff, m.mlp, m.context_length) == (64, 2048, "relu2", 2048)
    assert m.tie_embeddings and m.qk_norm == "learned"
    o = cfg.optim
    assert (o.name, o.lr, o.muon_lr, o.muon_momentum, o.muon_nesterov, o.muon_ns_steps) == (
        "muon",
        0.006,
        0.024,
        0.95,
        True,
        5,
    )
    assert (o.weight_decay, o.norm_weight_decay, o.grad_clip, o.schedule) == (0.2, 0.2, 1.0, "constant")


@pytest.mark.parametrize("name", ["seed-88m", "seed-tiny"])
def test_seed_presets_are_the_source_documents_choices(name):
    """Every difference of docs/replication.md, as the code behind the source documents has it."""
    cfg = load_config(name)
    m, o, t = cfg.model, cfg.optim, cfg.train
    assert (m.rope_layout, m.norm_eps, m.resolved_norm_eps) == ("interleaved", "dtype", None)
    assert (m.init_std, m.init_scheme, m.embed_scale, m.qk_norm) == (
        0.02,
        "unscaled",
        "sqrt_d_model",
        "learned",
    )
    assert (o.name, o.lr, o.muon_lr, o.muon_momentum, o.muon_nesterov, o.muon_ns_steps) == (
        "muon",
        0.006,
        0.024,
        0.95,
        True,
        5,
    )
    assert (o.muon_coefficients, o.muon_ns_dtype, o.muon_qkvo, o.muon_weight_decay) == (
        "polar_express_seed",
        "bfloat16",
        "fused",
        0.0,
    )
    assert (o.weight_decay, o.norm_weight_decay, o.betas, o.eps) == (0.2, 0.2, (0.9, 0.999), 1e-8)
    assert (o.grad_clip, o.schedule, o.warmup_frac) == (1.0, "constant", 0.0)
    assert t.weights_dtype == "float32"  # the issue: the study, not the preset, sets pure bfloat16
    sizes = load_config("paper-88m" if name == "seed-88m" else "tiny").model
    assert {
        f: getattr(m, f) for f in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff")
    } == {
        f: getattr(sizes, f) for f in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff")
    }


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.norm_eps=machine"], r"model.norm_eps: 'machine' does not match"),
        (["model.norm_eps=-1.0"], r"model.norm_eps must be non-negative or 'dtype', got -1.0"),
        (
            ["model.rope_layout=adjacent"],
            r"model.rope_layout: 'adjacent' is not one of 'half', 'interleaved'",
        ),
        (["optim.muon_qkvo=joint"], r"optim.muon_qkvo: 'joint' is not one of"),
        (
            ["optim.muon_qkvo=fused", "optim.muon_impl=torch"],
            r"optim.muon_qkvo='fused' needs optim.muon_impl='batched' \(torch.optim.Muon orthogonalises one",
        ),
        (
            ["optim.muon_qkvo=separate_stacked_lr", "optim.muon_impl=torch"],
            r"optim.muon_qkvo='separate_stacked_lr' needs optim.muon_impl='batched'",
        ),
        (
            ["optim.muon_qkvo=fused", "model.head_dim=16"],
            r"it needs n_heads \* head_dim = 64 to equal model.d_model = 128",
        ),
        (
            ["optim.muon_coefficients=polar_express_seed", "optim.muon_impl=torch"],
            r"optim.muon_coefficients='polar_express_seed' needs optim.muon_impl='batched'",
        ),
        (["optim.muon_coefficients=polar_express_seed", "optim.muon_ns_steps=4"], r"is a set of 5 steps"),
    ],
)
def test_replication_fields_are_checked(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config("tiny", overrides)


def test_replication_fields_accept_their_values():
    cfg = load_config(
        "tiny",
        [
            "model.norm_eps=dtype",
            "model.qk_norm=frozen_k",
            "optim.muon_qkvo=separate_stacked_lr",
            "train.weights_dtype=bfloat16",
            "optim.muon_coefficients=polar_express_seed",
        ],
    )
    assert cfg.model.norm_eps == "dtype" and cfg.model.resolved_norm_eps is None
    assert load_config("tiny", ["model.norm_eps=1e-5"]).model.resolved_norm_eps == 1e-5
    assert (cfg.model.qk_norm, cfg.optim.muon_qkvo, cfg.train.weights_dtype) == (
        "frozen_k",
        "separate_stacked_lr",
        "bfloat16",
    )
    # AdamW has no stacks to fuse: a width that fused Muon refuses is fine there
    assert load_config("tiny", ["optim.name=adamw", "optim.muon_qkvo=fused", "model.head_dim=16"])


def test_override_sets_a_typed_value():
    cfg = load_config("tiny", ["optim.lr=3e-3"])
    assert cfg.optim.lr == 3e-3 and isinstance(cfg.optim.lr, float)
    cfg = load_config(
        "tiny", ["optim.lr=1", "model.qk_norm=none", "optim.betas=[0.8, 0.99]", "train.compile=true"]
    )
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)  # TOML int promoted to float
    assert cfg.model.qk_norm == "none"
    assert cfg.optim.betas == (0.8, 0.99)  # TOML array -> the annotated tuple
    assert cfg.train.compile is True
    # everything not overridden is the preset's
    base = load_config("tiny")
    assert cfg.model == dataclasses.replace(base.model, qk_norm="none")
    assert load_config("tiny", ["train.tokens=1e6"]).train.tokens == 1_000_000  # whole float -> int


def test_apply_overrides_merges_nested_keys():
    out = apply_overrides({"optim": {"lr": 1.0, "name": "muon"}}, ["optim.lr=3e-3", "model.qk_norm=none"])
    assert out == {"optim": {"lr": 3e-3, "name": "muon"}, "model": {"qk_norm": "none"}}


@pytest.mark.parametrize(
    "override, names",
    [
        ("optim.lrr=1", "optim.lrr"),
        ("optimm.lr=1", "optimm.lr"),
        ("name.x=1", "name.x"),
        ("train.tokens=abc", "train.tokens"),
        ("train.tokens=1.5", "train.tokens"),
        ("model.qk_norm=maybe", "model.qk_norm"),
        ("model.tie_embeddings=1", "model.tie_embeddings"),
        ("optim.lr=nan", "optim.lr"),
        ("optim.betas=[0.9]", "optim.betas"),
        ("optim.betas=0.9", "optim.betas"),
        ("model=3", "model"),
        ("optim={lr = 1.0}", "optim"),
    ],
)
def test_bad_override_names_the_key(override, names):
    with pytest.raises(ConfigError) as info:
        load_config("tiny", [override])
    assert names in str(info.value)
    assert isinstance(info.value, TrainerError)  # the CLI reports TrainerError as a one-line message


def test_table_as_value_is_rejected():
    with pytest.raises(ConfigError, match="config key model is a table"):
        load_config("tiny", ["model=3"])
    with pytest.raises(ConfigError, match=r"^model: expected a table, got 3"):
        run_config_from_dict({"model": 3})


def test_malformed_overrides():
    with pytest.raises(ConfigError, match="not of the form key=value"):
        load_config("tiny", ["optim.lr"])
    with pytest.raises(ConfigError, match="malformed"):
        load_config("tiny", ["optim..lr=1"])


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.seq_len=1024", "train.seq_len"),
        ("model.n_kv_heads=3", "model.n_kv_heads"),
        ("model.n_kv_heads=0", "model.n_kv_heads"),  # must not be a ZeroDivisionError
        ("model.n_heads=0", "model.n_heads"),
        ("model.head_dim=-2", "model.head_dim"),
        ("model.head_dim=31", "head dim 31"),
        ("optim.lr=-1", "optim.lr"),
        ("optim.muon_momentum=1.0", "optim.muon_momentum"),
        ("optim.muon_ns_steps=100", "optim.muon_ns_steps"),
        ("optim.betas=[0.9, 1.0]", "optim.betas"),
        ("optim.eps=0", "optim.eps"),
        ("optim.min_lr_frac=1.5", "optim.min_lr_frac"),
        ("optim.warmup_frac=1.0", "optim.warmup_frac"),
        ("train.batch_size=0", "train.batch_size"),
        ("train.milestones=list", "train.milestone_tokens"),
        ("train.loss_chunk_tokens=-1", "train.loss_chunk_tokens"),
        ("train.sdpa_backend=fastest", "train.sdpa_backend"),
        ("optim.muon_impl=fast", "optim.muon_impl"),
        ("optim.muon_coefficients=cubic", "optim.muon_coefficients"),
    ],
)
def test_invalid_values_name_the_key(override, key):
    with pytest.raises(ConfigError) as info:
        load_config("tiny", [override])
    assert key in str(info.value)


def test_polar_express_needs_the_batched_muon_and_five_steps():
    assert load_config("tiny", ["optim.muon_coefficients=polar_express"]).optim.muon_impl == "batched"
    with pytest.raises(ConfigError, match="muon_impl='batched'"):
        load_config("tiny", ["optim.muon_coefficients=polar_express", "optim.muon_impl=torch"])
    with pytest.raises(ConfigError, match="5 steps; optim.muon_ns_steps is 4"):
        load_config("tiny", ["optim.muon_coefficients=polar_express", "optim.muon_ns_steps=4"])


def test_float_precision_fields_refuse_what_cannot_run():
    assert load_config("tiny", ["optim.muon_ns_dtype=float64"]).optim.muon_ns_dtype == "float64"
    with pytest.raises(ConfigError, match="torch.optim.Muon always orthogonalises in bfloat16"):
        load_config("tiny", ["optim.muon_ns_dtype=float32", "optim.muon_impl=torch"])
    assert load_config("tiny", ["train.weights_dtype=float64"]).train.weights_dtype == "float64"
    with pytest.raises(ConfigError, match="train.dtype='bfloat16' would autocast"):
        load_config("tiny", ["train.weights_dtype=float64", "train.dtype=bfloat16"])


def test_wsd_warmup_and_decay_must_fit():
    with pytest.raises(ConfigError, match="optim.decay_frac"):
        load_config("tiny", ["optim.schedule=wsd", "optim.warmup_frac=0.5", "optim.decay_frac=0.6"])
    # the same fractions are fine for a schedule without a decay phase
    assert load_config("tiny", ["optim.schedule=cosine", "optim.warmup_frac=0.5", "optim.decay_frac=0.6"])


def test_toml_file_with_preset_base(tmp_path):
    path = tmp_path / "my-run.toml"
    path.write_text(
        'preset = "tiny"\nname = "my-run"\n\n[optim]\nname = "adamw"\nlr = 1e-3\n\n[model]\nqk_norm = "frozen"\n'
    )
    cfg = load_config(str(path), ["train.seed=7"])
    tiny = load_config("tiny")
    assert cfg.name == "my-run" and cfg.preset == "tiny"
    assert cfg.optim == dataclasses.replace(tiny.optim, name="adamw", lr=1e-3)
    assert cfg.model == dataclasses.replace(tiny.model, qk_norm="frozen")
    assert cfg.train == dataclasses.replace(tiny.train, seed=7)


def test_toml_file_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(str(tmp_path / "missing.toml"))
    bad = tmp_path / "bad.toml"
    bad.write_text("[optim\n")
    with pytest.raises(ConfigError, match="bad.toml: invalid TOML"):
        load_config(str(bad))
    unknown_base = tmp_path / "base.toml"
    unknown_base.write_text('preset = "huge"\n')
    with pytest.raises(ConfigError, match="preset 'huge' is unknown"):
        load_config(str(unknown_base))
    typo = tmp_path / "typo.toml"
    typo.write_text('preset = "tiny"\n[optim]\nlrr = 1.0\n')
    with pytest.raises(ConfigError, match="optim.lrr"):
        load_config(str(typo))
    with pytest.raises(ConfigError, match="neither a preset"):
        load_config("no-such-preset")


@pytest.mark.parametrize("name", ["tiny", "paper-88m", "seed-tiny", "seed-88m"])
def test_to_toml_round_trip(name, tmp_path):
    cfg = load_config(name, ["train.milestones=list", "train.milestone_tokens=[0, 1000, 5000]"])
    assert run_config_from_dict(tomllib.loads(cfg.to_toml())) == cfg
    path = tmp_path / "resolved.toml"
    path.write_text(cfg.to_toml())
    assert load_config(str(path)) == cfg
    assert run_config_from_dict(json.loads(cfg.to_json())) == cfg


def test_model_config_from_dict_checks_keys():
    cfg = load_config("tiny").model
    assert model_config_from_dict(dataclasses.asdict(cfg)) == cfg
    with pytest.raises(ConfigError, match="model.d_modell"):
        model_config_from_dict({**dataclasses.asdict(cfg), "d_modell": 3})


@pytest.mark.parametrize("cls", [ModelConfig, OptimConfig, TrainConfig, RunConfig])
def test_configs_are_frozen(cls):
    cfg = cls()
    field = dataclasses.fields(cls)[0].name
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(cfg, field, getattr(cfg, field))
    run = load_config("tiny")
    with pytest.raises(dataclasses.FrozenInstanceError):
        run.optim.lr = 1.0  # type: ignore[misc]
    assert hash(run) == hash(load_config("tiny"))  # frozen, hashable, equal by value


def test_defaults_validate():
    assert RunConfig().validate() == RunConfig()


def test_every_field_is_documented():
    """docs/configuration.md has a table row for every field, so the page cannot fall behind the code."""
    page = (Path(__file__).resolve().parents[1] / "docs" / "configuration.md").read_text()
    missing = []
    for prefix, cls in (
        ("", RunConfig),
        ("model.", ModelConfig),
        ("optim.", OptimConfig),
        ("train.", TrainConfig),
    ):
        for f in dataclasses.fields(cls):
            if f"| `{prefix}{f.name}` |" not in page:
                missing.append(prefix + f.name)
    assert not missing
