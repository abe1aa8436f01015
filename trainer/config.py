"""Typed run configuration: nested dataclasses, named presets, TOML files and checked overrides.

A run is fully described by one :class:`RunConfig`. Presets are TOML files shipped in
``trainer/presets/``; a user's TOML file has the same shape. Command-line overrides such as
``--set optim.lr=3e-3`` are parsed against the field types, and an unknown key or a value of the
wrong type raises :class:`ConfigError` naming the key. Configs are frozen after construction:
overrides build a new object, nothing is mutated field by field.

Only this module and :mod:`trainer.model` may be imported by ``spectra`` (see DESIGN.md).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from trainer.errors import TrainerError

QKNorm = Literal["none", "learned", "frozen", "frozen_k"]
MLPKind = Literal["relu2", "swiglu"]
OptimName = Literal["muon", "adamw"]
Schedule = Literal["constant", "cosine", "wsd"]
Milestones = Literal["plan", "log", "plan+log", "list"]
MuonImpl = Literal["torch", "batched"]
MuonCoefficients = Literal["quintic", "polar_express", "polar_express_seed"]
MuonQKVO = Literal["separate", "fused", "separate_stacked_lr"]
SDPABackend = Literal["auto", "default", "cudnn", "flash", "efficient", "math"]
WeightsDType = Literal["float32", "float64", "bfloat16"]
MuonNSDType = Literal["bfloat16", "float32", "float64"]
RopeLayout = Literal["half", "interleaved"]
EmbedScale = Literal["none", "sqrt_d_model"]
InitScheme = Literal["scaled_residual", "unscaled"]
DTYPE_EPS = "dtype"
"""``model.norm_eps`` spelling of ``torch.nn.RMSNorm``'s default ``eps=None`` (TOML has no null)."""


class ConfigError(TrainerError, ValueError):
    """A configuration value, key or file is invalid; the message names it."""


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Architecture of the Llama-style decoder (everything needed to rebuild the weights)."""

    vocab_size: int = 4096
    """Vocabulary size; must match the dataset's tokenizer."""
    d_model: int = 128
    """Residual stream width."""
    n_layers: int = 4
    """Number of transformer blocks."""
    n_heads: int = 4
    """Query heads per layer."""
    n_kv_heads: int = 2
    """Key/value heads per layer (grouped-query attention); must divide ``n_heads``."""
    head_dim: int = 0
    """Width of one head; 0 means ``d_model // n_heads``."""
    d_ff: int = 512
    """Hidden width of the MLP."""
    mlp: MLPKind = "relu2"
    """MLP kind: ``relu2`` (squared ReLU, two matrices) or ``swiglu`` (three matrices)."""
    context_length: int = 256
    """Maximum sequence length (RoPE tables are built for it)."""
    tie_embeddings: bool = True
    """Share the token embedding with the LM head."""
    qk_norm: QKNorm = "learned"
    """RMSNorm over head_dim on q and k: ``none``, ``learned`` gain, ``frozen`` gain fixed at 1 on both, or
    ``frozen_k``: the key gain fixed at 1, the query gain learned."""
    rope_theta: float = 10000.0
    """RoPE base frequency."""
    rope_layout: RopeLayout = "half"
    """Which coordinates RoPE rotates together: ``half`` pairs j with j + D/2 (Llama, "rotate half");
    ``interleaved`` pairs 2i with 2i + 1 (torchtune's, the source documents' model). Same frequencies."""
    norm_eps: float | Literal["dtype"] = 1e-6
    """Epsilon of every RMSNorm, or ``"dtype"``: ``torch.nn.RMSNorm``'s default (``eps=None``, the source
    documents' model), the machine epsilon of the type the norm computes in: float32's (1.2e-7) for float32 and
    bfloat16 inputs, float64's for float64."""
    init_std: float = 0.02
    """Standard deviation of the normal initialisation of every matrix and of the embedding."""
    init_scheme: InitScheme = "scaled_residual"
    """``scaled_residual``: the residual writes (``o_proj``, ``mlp.down``) at ``init_std / sqrt(2 n_layers)``
    (GPT-2); ``unscaled``: every matrix at ``init_std`` (the source documents' model)."""
    embed_scale: EmbedScale = "none"
    """``sqrt_d_model`` multiplies the token embeddings by sqrt(d_model) on the way in (the source documents'
    model; a tied LM head stays unscaled); ``none`` leaves them as they are."""

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    @property
    def resolved_norm_eps(self) -> float | None:
        """The ``eps`` handed to ``torch.nn.RMSNorm``: None (the input dtype's epsilon) for ``"dtype"``."""
        return None if self.norm_eps == DTYPE_EPS else float(self.norm_eps)

    def validate(self) -> None:
        # sizes first: the divisibility checks below would divide by a zero head count
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "context_length"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"model.{name} must be positive, got {getattr(self, name)}")
        if self.head_dim < 0:
            raise ConfigError(f"model.head_dim must be positive (0: d_model // n_heads), got {self.head_dim}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"model.n_heads={self.n_heads} is not a multiple of model.n_kv_heads={self.n_kv_heads}"
            )
        if not self.head_dim and self.d_model % self.n_heads:
            raise ConfigError(
                f"model.d_model={self.d_model} is not divisible by model.n_heads={self.n_heads}"
            )
        if self.resolved_head_dim % 2:
            raise ConfigError(f"head dim {self.resolved_head_dim} must be even for RoPE")
        if self.rope_theta <= 0:
            raise ConfigError(f"model.rope_theta must be positive, got {self.rope_theta}")
        if self.norm_eps != DTYPE_EPS and self.norm_eps < 0:
            raise ConfigError(f"model.norm_eps must be non-negative or {DTYPE_EPS!r}, got {self.norm_eps}")
        if self.init_std < 0:
            raise ConfigError(f"model.init_std must be non-negative, got {self.init_std}")


@dataclass(frozen=True, kw_only=True)
class OptimConfig:
    """Optimizers, learning-rate schedule and clipping."""

    name: OptimName = "muon"
    """``muon``: torch.optim.Muon on 2-D hidden matrices + AdamW on the rest; ``adamw``: AdamW on all."""
    lr: float = 3e-3
    """AdamW learning rate (embeddings, norms and gains under ``muon``; everything under ``adamw``)."""
    muon_lr: float = 0.02
    """Muon learning rate for the 2-D hidden matrices (ignored by ``adamw``)."""
    muon_momentum: float = 0.95
    """Muon momentum."""
    muon_nesterov: bool = True
    """Nesterov momentum in Muon."""
    muon_ns_steps: int = 5
    """Newton-Schulz orthogonalisation steps in Muon."""
    muon_weight_decay: float = 0.0
    """Decoupled weight decay of the Muon group."""
    muon_impl: MuonImpl = "batched"
    """``torch``: ``torch.optim.Muon``, one matrix at a time; ``batched``: ``trainer.muon.BatchedMuon``, the same
    update with one stacked (on CUDA compiled) Newton-Schulz per matrix shape."""
    muon_coefficients: MuonCoefficients = "quintic"
    """Newton-Schulz coefficients: ``quintic`` (Keller Jordan's, torch.optim.Muon's, at every step),
    ``polar_express`` (Amsel et al. 2025, one set per step, input scaled by ``1.02 ||U||_F + 1e-6`` as in
    modded-nanogpt) or ``polar_express_seed`` (the same five sets, scaled by ``1.01 ||U||_F + 1e-7`` as in the
    source documents' code); the Polar Express sets need ``batched`` and 5 steps. It changes the optimizer
    being studied, so it is recorded with the run like every field."""
    muon_qkvo: MuonQKVO = "separate"
    """How Muon treats a layer's four attention projections: ``separate`` (each orthogonalised on its own,
    with its own shape's learning-rate factor); ``fused`` (stacked ``[W_q; W_k; W_v; W_o]`` and orthogonalised
    as one matrix, the learning rate scaled by the stack's ``sqrt(max(1, rows / cols))``, as the source
    documents' code does); ``separate_stacked_lr`` (the control: each orthogonalised on its own, with the
    stack's factor). Momentum stays per projection. Not ``separate`` needs ``batched`` and
    ``n_heads * head_dim == d_model``."""
    muon_ns_dtype: MuonNSDType = "bfloat16"
    """Dtype of the Newton-Schulz orthogonalisation: ``bfloat16`` (Muon as published and as ``torch.optim.Muon``
    hard-codes it), or ``float32`` / ``float64`` (``batched`` only), e.g. to check data parallelism to float64
    rounding or to ask whether bfloat16 orthogonalisation matters for what the keys learn."""
    weight_decay: float = 0.1
    """AdamW decoupled weight decay on matrices and embeddings."""
    norm_weight_decay: float = 0.0
    """AdamW weight decay on norm gains (including QK-norm gamma)."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""
    schedule: Schedule = "constant"
    """Learning-rate schedule: ``constant``, ``cosine`` (warmup then cosine) or ``wsd`` (warmup-stable-decay)."""
    warmup_frac: float = 0.0
    """Fraction of the steps spent in linear warmup."""
    decay_frac: float = 0.2
    """Fraction of the steps spent decaying at the end of ``wsd``."""
    min_lr_frac: float = 0.0
    """Final learning rate as a fraction of the peak (``cosine`` and ``wsd``)."""

    def validate(self) -> None:
        # checked here so that bad values name their key instead of failing inside torch.optim
        for name in ("lr", "muon_lr", "muon_weight_decay", "weight_decay", "norm_weight_decay", "grad_clip"):
            if getattr(self, name) < 0:
                raise ConfigError(f"optim.{name} must be non-negative, got {getattr(self, name)}")
        if not 0 <= self.muon_momentum < 1:
            raise ConfigError(f"optim.muon_momentum must be in [0, 1), got {self.muon_momentum}")
        if not 0 <= self.muon_ns_steps < 100:  # torch.optim.Muon refuses 100 or more
            raise ConfigError(f"optim.muon_ns_steps must be in [0, 100), got {self.muon_ns_steps}")
        if self.muon_ns_dtype != "bfloat16" and self.muon_impl != "batched":
            raise ConfigError(
                f"optim.muon_ns_dtype={self.muon_ns_dtype!r} needs optim.muon_impl='batched' "
                "(torch.optim.Muon always orthogonalises in bfloat16)"
            )
        if self.muon_coefficients != "quintic":
            name = self.muon_coefficients
            if self.muon_impl != "batched":
                raise ConfigError(
                    f"optim.muon_coefficients={name!r} needs optim.muon_impl='batched' "
                    "(torch.optim.Muon takes one coefficient triple for every step)"
                )
            if self.muon_ns_steps != 5:
                raise ConfigError(
                    f"optim.muon_coefficients={name!r} is a set of 5 steps; optim.muon_ns_steps is "
                    f"{self.muon_ns_steps}"
                )
        if self.muon_qkvo != "separate" and self.muon_impl != "batched":
            raise ConfigError(
                f"optim.muon_qkvo={self.muon_qkvo!r} needs optim.muon_impl='batched' "
                "(torch.optim.Muon orthogonalises one parameter at a time and sizes its step by that one's shape)"
            )
        if not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"optim.betas must both be in [0, 1), got {list(self.betas)}")
        if self.eps <= 0:
            raise ConfigError(f"optim.eps must be positive, got {self.eps}")
        if not 0 <= self.min_lr_frac <= 1:
            raise ConfigError(f"optim.min_lr_frac must be in [0, 1], got {self.min_lr_frac}")
        if self.schedule == "wsd" and self.warmup_frac + self.decay_frac > 1:
            raise ConfigError(
                f"optim.warmup_frac={self.warmup_frac} + optim.decay_frac={self.decay_frac} exceed the whole run"
            )


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Token budget, batch shape, precision and checkpoint schedule."""

    tokens: int = 1_000_000
    """Total training tokens (rounded down to whole optimizer steps)."""
    batch_size: int = 16
    """Sequences per micro-batch per process."""
    seq_len: int = 256
    """Tokens per training sequence (at most ``model.context_length``)."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step."""
    seed: int = 0
    """Seed for initialisation and for the data order."""
    device: str = "auto"
    """``auto`` (cuda if available), ``cpu`` or ``cuda[:N]``."""
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """Autocast dtype: ``auto`` is bfloat16 on CUDA and float32 on the CPU (no autocast with float64 weights)."""
    weights_dtype: WeightsDType = "float32"
    """Dtype of the parameters, their gradients, the optimizer states and the checkpoints: ``float32``;
    ``float64`` for exactness checks (two data-parallel ranks then agree with one process to float64 rounding;
    it needs ``dtype`` ``auto`` or ``float32``: forward passes run in float64, without autocast); or
    ``bfloat16``, pure bfloat16 training with no float32 master copy (the source documents' trainer casts its
    model so): an update below about 2^-8 of a weight is rounded away."""
    compile: bool = False
    """Wrap the model, its loss included, in ``torch.compile``."""
    loss_chunk_tokens: int = 4096
    """Tokens per chunk of the LM head and cross-entropy (``trainer.model.linear_cross_entropy``): the float32 logits of at most this
    many tokens exist at once; 0 computes the logits of the whole micro-batch at once (the plain loss)."""
    sdpa_backend: SDPABackend = "auto"
    """Attention kernel: ``auto`` tries cuDNN, then flash, then memory-efficient, then math; ``default`` leaves
    the choice to torch; ``cudnn``, ``flash``, ``efficient`` or ``math`` allow only that kernel."""
    milestones: Milestones = "plan"
    """Checkpoint schedule: the plan's (0, 0.5M, 1M, 2M, 4M, 8M, 12M, 16M, 20M, 25M scaled to ``tokens``),
    ``log`` (``n_log_milestones`` log-spaced points), ``plan+log`` (both: the plan's points for comparison with
    the source documents, log-spaced ones for phase detection), or ``list`` (``milestone_tokens``)."""
    milestone_tokens: tuple[int, ...] = ()
    """Explicit token counts for ``milestones = "list"``."""
    n_log_milestones: int = 10
    """Number of log-spaced checkpoints for ``milestones = "log"`` or ``"plan+log"`` (plus the one at 0); 40 to 50
    give the dense trajectories phase detection needs (duplicates at small step counts collapse)."""
    val_tokens: int = 65_536
    """Tokens of the fixed validation slice evaluated at every checkpoint."""
    log_every: int = 10
    """Write a metrics line every this many optimizer steps."""
    resume_every: int = 50
    """Write resume state every this many optimizer steps (and at every checkpoint)."""
    tensorboard: bool = False
    """Also log the metrics lines as TensorBoard scalars into ``RUN_DIR/tensorboard/`` (rank 0; needs the
    ``tensorboard`` extra). ``metrics.jsonl`` is written either way and stays the record."""


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """Everything one training run needs."""

    name: str = "run"
    """Run name, recorded in every checkpoint."""
    preset: str = ""
    """Preset the config started from (informational)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> RunConfig:
        self.model.validate()
        self.optim.validate()
        t = self.train
        if t.seq_len > self.model.context_length:
            raise ConfigError(
                f"train.seq_len={t.seq_len} exceeds model.context_length={self.model.context_length}"
            )
        for name in ("tokens", "batch_size", "seq_len", "grad_accum", "log_every", "resume_every"):
            if getattr(t, name) <= 0:
                raise ConfigError(f"train.{name} must be positive, got {getattr(t, name)}")
        self._check_fused_qkvo()
        if t.weights_dtype == "float64" and t.dtype == "bfloat16":
            raise ConfigError(
                "train.weights_dtype='float64' runs its forward passes in float64; train.dtype='bfloat16' "
                "would autocast them (use train.dtype='auto' or 'float32')"
            )
        if t.loss_chunk_tokens < 0:
            raise ConfigError(
                f"train.loss_chunk_tokens must be non-negative (0: no chunks), got {t.loss_chunk_tokens}"
            )
        if t.milestones == "list" and not t.milestone_tokens:
            raise ConfigError("train.milestones='list' needs train.milestone_tokens")
        if any(m < 0 for m in t.milestone_tokens):
            raise ConfigError("train.milestone_tokens must be non-negative")
        if not 0 <= self.optim.warmup_frac < 1 or not 0 <= self.optim.decay_frac <= 1:
            raise ConfigError("optim.warmup_frac must be in [0, 1) and optim.decay_frac in [0, 1]")
        return self

    def _check_fused_qkvo(self) -> None:
        """Stacking ``[W_q; W_k; W_v; W_o]`` needs every block to have d_model columns: W_o's are n_heads * head_dim."""
        m = self.model
        width = m.n_heads * m.resolved_head_dim
        if self.optim.name == "muon" and self.optim.muon_qkvo != "separate" and width != m.d_model:
            raise ConfigError(
                f"optim.muon_qkvo={self.optim.muon_qkvo!r} stacks W_o (d_model x n_heads*head_dim) under "
                f"W_q, W_k, W_v (rows x d_model): it needs n_heads * head_dim = {width} to equal "
                f"model.d_model = {m.d_model}"
            )

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(dataclasses.asdict(self))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def to_toml(self) -> str:
        import tomli_w

        return tomli_w.dumps(self.to_dict())


def _to_plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return [_to_plain(v) for v in value]
    return value


# ----------------------------------------------------------------------------------------------------
# Building configs from plain data (TOML, JSON, overrides), with type checks that name the key.


def _coerce(key: str, tp: Any, value: Any) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert it (e.g. list -> tuple, int -> float)."""
    if dataclasses.is_dataclass(tp):  # a table, e.g. one element of a list of tables
        return _build(tp, value, f"{key}.")
    origin = typing.get_origin(tp)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(repr, allowed))}")
        return value
    if origin in (tuple, list):
        if isinstance(value, str | bytes) or not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(f"{key}[{i}]", args[0], v) for i, v in enumerate(value))
        if origin is tuple:
            if len(value) != len(args):
                raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)}")
            return tuple(_coerce(f"{key}[{i}]", a, v) for i, (a, v) in enumerate(zip(args, value)))
        return [_coerce(f"{key}[{i}]", args[0], v) for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(key, arg, value)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: {value!r} does not match {tp}")
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported field type {tp}")  # pragma: no cover - a bug in this module


def _build(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a table, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        names = ", ".join(f"{prefix}{k}" for k in unknown)
        raise ConfigError(f"unknown config key(s): {names}; valid keys here: {', '.join(sorted(fields))}")
    required = [
        name
        for name, f in fields.items()
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    missing = [name for name in required if name not in data]
    if missing:
        raise ConfigError(f"missing config key(s): {', '.join(prefix + k for k in missing)}")
    return cls(**{name: _coerce(f"{prefix}{name}", hints[name], value) for name, value in data.items()})


def from_plain(cls: type, data: Any, prefix: str = "") -> Any:
    """Build the frozen dataclass ``cls`` from plain nested data (TOML, JSON), checking every key and type.

    This is the one validator of the package's typed files: run configs and study files alike. An
    unknown key, a missing required key or a value of the wrong type raises :class:`ConfigError`
    naming the key, with ``prefix`` in front (e.g. ``"configurations[2]."``). Nested dataclasses are
    tables, and ``tuple[SomeDataclass, ...]`` fields are arrays of tables.

    >>> from_plain(TrainConfig, {"tokens": 1e6, "seed": 3}).tokens
    1000000
    >>> from_plain(TrainConfig, {"tokenz": 1}, "train.")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    trainer.config.ConfigError: unknown config key(s): train.tokenz; valid keys here: ...
    """
    return _build(cls, data, prefix)


def model_config_from_dict(data: dict[str, Any]) -> ModelConfig:
    """Rebuild a :class:`ModelConfig` from plain data (e.g. a checkpoint's metadata); keys are checked."""
    cfg = _build(ModelConfig, data, "model.")
    cfg.validate()
    return cfg


def run_config_from_dict(data: dict[str, Any]) -> RunConfig:
    """Build and validate a :class:`RunConfig` from plain nested data."""
    return _build(RunConfig, data, "").validate()


def _parse_override_value(raw: str) -> Any:
    """Parse the right-hand side of ``key=value`` as a TOML value; bare words become strings."""
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def _deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def apply_overrides(data: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Merge ``key.sub=value`` strings into plain config data (types are checked when the config is built).

    >>> apply_overrides({"optim": {"lr": 1.0}}, ["optim.lr=3e-3", "model.qk_norm=none"])
    {'optim': {'lr': 0.003}, 'model': {'qk_norm': 'none'}}
    """
    out = data
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        parts = key.split(".")
        if not all(parts):
            raise ConfigError(f"override key {key!r} is malformed")
        _check_key_path(parts, key)
        nested: Any = _parse_override_value(raw.strip())
        for part in reversed(parts):
            nested = {part: nested}
        out = _deep_merge(out, nested)
    return out


def _check_key_path(parts: list[str], key: str) -> None:
    cls: Any = RunConfig
    for i, part in enumerate(parts):
        if not dataclasses.is_dataclass(cls):
            raise ConfigError(f"unknown config key: {key} ({'.'.join(parts[:i])} is not a table)")
        hints = typing.get_type_hints(cls)
        if part not in hints:
            valid = ", ".join(sorted(f.name for f in dataclasses.fields(cls)))
            raise ConfigError(f"unknown config key: {key} (valid keys here: {valid})")
        cls = hints[part]
    if dataclasses.is_dataclass(cls):
        raise ConfigError(f"config key {key} is a table; set one of its fields instead")


# ----------------------------------------------------------------------------------------------------
# Presets and files


def preset_names() -> list[str]:
    """Names of the presets shipped in ``trainer/presets/``."""
    files = resources.files("trainer").joinpath("presets")
    return sorted(p.name.removesuffix(".toml") for p in files.iterdir() if p.name.endswith(".toml"))


def preset_description(name: str) -> str:
    """The first comment line of a preset file (its one-line description)."""
    text = resources.files("trainer").joinpath("presets", f"{name}.toml").read_text()
    for line in text.splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return ""


def read_toml(path: Path) -> dict[str, Any]:
    """The plain data of a TOML file.

    Raises
    ------
    ConfigError
        Naming the file in one line: missing, a directory, unreadable, not UTF-8 text (TOML is UTF-8, so a
        binary file is refused at its first undecodable byte) or invalid TOML.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except IsADirectoryError:
        raise ConfigError(f"{path} is a directory, not a TOML file") from None
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"{path}: not a TOML file (TOML is UTF-8 text; byte {e.object[e.start]:#04x} at offset {e.start} "
            "is not UTF-8: a binary file?)"
        ) from None
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from None


def load_config(preset_or_path: str, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Load a preset by name or a TOML file by path, apply ``key=value`` overrides and validate.

    A TOML file may start from a preset with a top-level ``preset = "tiny"`` key; its own tables
    then override the preset's.
    """
    if preset_or_path in preset_names():
        text = resources.files("trainer").joinpath("presets", f"{preset_or_path}.toml").read_text()
        data = tomllib.loads(text)
        data.setdefault("preset", preset_or_path)
    else:
        path = Path(preset_or_path)
        if path.suffix != ".toml" and not path.exists():
            raise ConfigError(
                f"{preset_or_path!r} is neither a preset ({', '.join(preset_names())}) nor an existing TOML file"
            )
        data = read_toml(path)
        base = data.get("preset")
        if base:
            if base not in preset_names():
                raise ConfigError(f"{path}: preset {base!r} is unknown ({', '.join(preset_names())})")
            text = resources.files("trainer").joinpath("presets", f"{base}.toml").read_text()
            data = _deep_merge(tomllib.loads(text), data)
    data = apply_overrides(data, list(overrides))
    return run_config_from_dict(data)


# ----------------------------------------------------------------------------------------------------
# Config identity


def config_sha256(cfg: RunConfig) -> str:
    """sha256 of the config's canonical JSON (sorted keys)."""
    return hashlib.sha256(cfg.to_json().encode()).hexdigest()


def config_differences(saved: dict[str, Any], current: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two plain config dicts, as ``key: saved -> current``.

    >>> config_differences({"optim": {"lr": 0.1}, "name": "a"}, {"optim": {"lr": 0.2}, "name": "a"})
    ['optim.lr: 0.1 (saved) != 0.2 (now)']
    """
    out = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key, "<absent>"), current.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} (saved) != {b!r} (now)")
    return out


def differences_from_saved(saved: dict[str, Any], cfg: RunConfig) -> list[str]:
    """:func:`config_differences` between a config saved with a run and ``cfg``, defaults filled in.

    A field added to the config since the run was saved is absent from ``saved``; it counts as its default,
    which is the behaviour the run had before the field existed, so adding a field never stops a run from
    being resumed or recognised. A saved config this version cannot read is compared as it is.

    >>> differences_from_saved({"optim": {"lr": 0.1}}, RunConfig())
    ['optim.lr: 0.1 (saved) != 0.003 (now)']
    """
    try:
        filled = run_config_from_dict(saved).to_dict()
    except ConfigError:
        filled = saved
    return config_differences(filled, cfg.to_dict())
