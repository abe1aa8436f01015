"""Studies: the typed study file, its resolution, the run plan and the learning-rate choice.

A study is the plan's configurations x seeds, each configuration's learning rate chosen by a short
sweep. One TOML file describes it (format in docs/studies.md); :func:`load_study` reads it into a
frozen :class:`Study` through the same validator as run configs (:func:`trainer.config.from_plain`:
unknown keys, missing keys and wrong types are errors naming the key), checks it, and *resolves* it:
every default filled in, dataset paths absolute, each configuration's sweep complete. The resolved
study is what the study directory records and compares (:mod:`trainer.study.directory`).

Every run of a study is an ordinary run directory trained from an ordinary run config, built by
:func:`trainer.config.load_config` from the base preset or file and ``key=value`` overrides, lowest
priority first::

    study.set, model.qk_norm, optim.name, configuration.set, train.tokens, train.seed,
    [sweep.set], optim.muon_lr / optim.lr (the sweep's point or the chosen one), name

so each is validated exactly like ``collapse-train run``. Nothing here trains or launches anything:
:mod:`trainer.study.runner` does, through :mod:`trainer.study.executors`.
"""

from __future__ import annotations

import json
import math
import re
import tomllib
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from trainer.config import (
    ConfigError,
    OptimName,
    QKNorm,
    RunConfig,
    apply_overrides,
    from_plain,
    load_config,
    preset_names,
    read_toml,
)

DataClass = Literal["standard", "simple", "complex"]
Phase = Literal["sweep", "main"]
LrCoupling = Literal["scaled", "fixed"]
SelectRule = Literal["final_val_loss"]

PHASE_DIRS: dict[str, str] = {"sweep": "sweep", "main": "runs"}
"""Sub-directory of the study directory holding each phase's run directories (and its logs under logs/)."""

# keys a study sets through its own fields: in a `set` list they would be silently overridden
_RESERVED_KEYS = {
    "name": "the run names are made by the study",
    "model.qk_norm": "use the configuration's qk_norm",
    "optim.name": "use the configuration's optimizer",
    "train.seed": "use the study's seeds (or sweep.seed)",
    "train.tokens": "use the study's tokens (or sweep.tokens)",
}
_SWEPT_KEYS = {"optim.lr": "the sweep sets it", "optim.muon_lr": "the sweep sets it"}
_LABEL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


@dataclass(frozen=True, kw_only=True)
class Datasets:
    """Dataset directories (made by ``collapse-train prepare-data``) per data class.

    A relative path is under the study's ``data_root``. Only the classes some configuration uses
    need one. Datasets that are compared must share a tokenizer (see docs/data.md).
    """

    standard: str = ""
    """The main corpus (A1, A2, B1, B2 of the plan)."""
    simple: str = ""
    """Simple text (the plan's C1)."""
    complex: str = ""
    """Complex text (the plan's C2)."""


@dataclass(frozen=True, kw_only=True)
class SweepConfig:
    """A learning-rate sweep: a grid of short runs, and the rule that picks one of them.

    Under ``muon`` the swept rate is ``optim.muon_lr``; ``optim.lr`` (the AdamW group on embeddings
    and norms) moves with it by the same factor unless ``muon_adamw_lr = "fixed"``. Under ``adamw``
    the swept rate is ``optim.lr``. A sweep with neither ``multipliers`` nor ``values`` is no sweep:
    the configuration trains at its own learning rates.
    """

    multipliers: tuple[float, ...] = ()
    """Factors applied to the configuration's learning rates (after the study's and its own ``set``)."""
    values: tuple[float, ...] = ()
    """Explicit values of the swept rate (``optim.muon_lr`` under muon, ``optim.lr`` under adamw)."""
    tokens: int = 0
    """Training tokens of each sweep run; 0 means the study's ``tokens``."""
    seed: int = 0
    """Seed of every sweep run."""
    muon_adamw_lr: LrCoupling = "scaled"
    """Under muon: ``scaled`` moves ``optim.lr`` by the same factor as ``optim.muon_lr``; ``fixed`` keeps it."""
    select: SelectRule = "final_val_loss"
    """Selection rule: the lowest validation loss at the last step of the sweep run."""
    tie_tolerance: float = 0.0
    """Final validation losses within this of the lowest are a tie; the lowest learning rate among them wins."""
    set: tuple[str, ...] = ()
    """Extra ``key=value`` overrides of the sweep runs only (e.g. fewer checkpoints)."""

    @property
    def enabled(self) -> bool:
        return bool(self.multipliers or self.values)


@dataclass(frozen=True, kw_only=True)
class Configuration:
    """One cell of the study's matrix, trained once per seed."""

    label: str
    """Short unique name (letters, digits, ``_ . + -``), e.g. ``A1``; it names the runs (``A1-s0``)."""
    qk_norm: QKNorm
    """``model.qk_norm``: ``none``, ``learned`` or ``frozen``."""
    optimizer: OptimName
    """``optim.name``: ``muon`` or ``adamw``."""
    data: DataClass = "standard"
    """Which of the study's datasets it trains on."""
    description: str = ""
    """One line for tables and reports, e.g. ``Muon, no QK-norm``."""
    set: tuple[str, ...] = ()
    """``key=value`` overrides of this configuration's runs, after the study's ``set``."""
    tokens: int = 0
    """Training tokens of each of its main runs; 0 means the study's ``tokens``."""
    sweep: SweepConfig = field(default_factory=SweepConfig)
    """Its learning-rate sweep: the study's ``[sweep]`` table with this table's keys replacing its keys."""


@dataclass(frozen=True, kw_only=True)
class Study:
    """A whole study. As returned by :func:`load_study` it is resolved: every default filled in."""

    name: str = ""
    """Name of the study; the file's stem by default."""
    description: str = ""
    """One line saying what the study is."""
    base: str = "tiny"
    """The base run config: a preset name or a run-config TOML file (relative to the study file)."""
    set: tuple[str, ...] = ()
    """``key=value`` overrides shared by every run, as with ``collapse-train run --set``."""
    data_root: str = "."
    """Directory that relative dataset paths are under (relative: to the study file's directory)."""
    datasets: Datasets = field(default_factory=Datasets)
    """Dataset directory per data class."""
    seeds: tuple[int, ...] = (0,)
    """Seeds of the main runs: each configuration is trained once per seed."""
    tokens: int = 0
    """Training tokens of each main run; 0 means the base config's ``train.tokens``."""
    sweep: SweepConfig = field(default_factory=SweepConfig)
    """The default sweep of every configuration."""
    configurations: tuple[Configuration, ...] = ()
    """The matrix: at least one configuration."""

    def configuration(self, label: str) -> Configuration:
        for c in self.configurations:
            if c.label == label:
                return c
        raise ConfigError(f"study {self.name!r} has no configuration {label!r} ({', '.join(self.labels)})")

    @property
    def labels(self) -> list[str]:
        return [c.label for c in self.configurations]

    def to_dict(self) -> dict[str, Any]:
        """Plain nested data (tuples as lists), as written to ``study.toml``."""
        return json.loads(json.dumps(asdict(self)))

    def to_toml(self) -> str:
        import tomli_w

        return tomli_w.dumps(self.to_dict())

    def data_dir(self, configuration: Configuration) -> str:
        return getattr(self.datasets, configuration.data)


# ----------------------------------------------------------------------------------------------------
# Reading, checking and resolving a study file


def study_names() -> list[str]:
    """Names of the study files shipped in ``trainer/study/files/``."""
    files = resources.files("trainer.study").joinpath("files")
    return sorted(p.name.removesuffix(".toml") for p in files.iterdir() if p.name.endswith(".toml"))


def study_from_dict(data: dict[str, Any]) -> Study:
    """Build a :class:`Study` from plain data (unresolved): the per-configuration sweep tables are
    merged over the study's ``[sweep]`` first, then every key and type is checked."""
    data = dict(data)
    shared = data.get("sweep", {})
    configurations = data.get("configurations")
    if isinstance(shared, dict) and isinstance(configurations, list):
        data["configurations"] = [
            {**c, "sweep": {**shared, **c.get("sweep", {})}}
            if isinstance(c, dict) and isinstance(c.get("sweep", {}), dict)
            else c
            for c in configurations
        ]
    return from_plain(Study, data)


def load_study(source: str | Path, data_root: str | Path | None = None) -> Study:
    """Read, check and resolve a study: a shipped study's name or a TOML file's path.

    Parameters
    ----------
    source
        A name from :func:`study_names` (e.g. ``"plan-25m"`` or ``"plan-25m.toml"``) or a path to a
        study TOML file (an existing file wins over a shipped study of the same name).
    data_root
        Replaces the file's ``data_root`` (relative: to the working directory), e.g. to point a
        shipped study at where the datasets are.

    Returns
    -------
    Study
        Resolved: ``name``, ``tokens`` and each configuration's ``sweep.tokens`` filled in,
        ``data_root`` and the dataset paths absolute, ``base`` a preset name or an absolute path.

    Raises
    ------
    ConfigError
        An unknown or missing key, a value of the wrong type, or an inconsistent study (duplicate
        labels or seeds, a reserved key in a ``set`` list, a configuration's data class without a
        dataset, a sweep with both multipliers and values...); the message names the key.

    Examples
    --------
    >>> study = load_study("plan-25m")
    >>> study.labels, study.seeds, study.tokens
    (['A1', 'A2', 'B1', 'B2', 'C1', 'C2'], (0,), 25000000)
    """
    text, origin, default_name = _read_source(source)
    study = study_from_dict(text)
    return resolve_study(study, origin, default_name, data_root)


def _read_source(source: str | Path) -> tuple[dict[str, Any], Path, str]:
    """(plain data, directory relative paths are resolved against, default name).

    A shipped study is named with or without ``.toml`` (``plan-25m``, ``plan-25m.toml``); an existing
    file of that name wins.
    """
    path = Path(source)
    name = path.name.removesuffix(".toml")
    if str(source) in (name, f"{name}.toml") and name in study_names() and not path.is_file():
        text = resources.files("trainer.study").joinpath("files", f"{name}.toml").read_text()
        return tomllib.loads(text), Path.cwd(), name
    if path.suffix != ".toml" and not path.exists():
        raise ConfigError(
            f"{str(source)!r} is neither a shipped study ({', '.join(study_names())}) nor an existing TOML file"
        )
    return read_toml(path), path.resolve().parent, path.stem


def resolve_study(
    study: Study, origin: Path, default_name: str, data_root: str | Path | None = None
) -> Study:
    """Check ``study`` and fill in its defaults; relative paths are under ``origin`` (see :func:`load_study`)."""
    _check_study(study)
    root = (
        Path(data_root).expanduser().resolve() if data_root is not None else _under(origin, study.data_root)
    )
    base = study.base if study.base in preset_names() else str(_under(origin, study.base))
    used = {c.data for c in study.configurations}
    datasets = {}
    for data_class in ("standard", "simple", "complex"):
        path = getattr(study.datasets, data_class)
        if not path and data_class in used:
            users = ", ".join(c.label for c in study.configurations if c.data == data_class)
            raise ConfigError(f"datasets.{data_class}: not given, but configuration(s) {users} train on it")
        datasets[data_class] = str(_under(root, path)) if path else ""
    shared = replace(study, base=base, data_root=str(root))
    base_cfg = _load(base, study.set, "set")
    tokens = study.tokens or base_cfg.train.tokens
    configurations = tuple(
        replace(c, tokens=c.tokens or tokens, sweep=replace(c.sweep, tokens=c.sweep.tokens or tokens))
        for c in study.configurations
    )
    resolved = replace(
        shared,
        name=study.name or default_name,
        datasets=Datasets(**datasets),
        tokens=tokens,
        sweep=replace(study.sweep, tokens=study.sweep.tokens or tokens),
        configurations=configurations,
    )
    for i, c in enumerate(resolved.configurations):  # every run config builds, so errors come before any run
        where = f"configurations[{i}] ({c.label})"
        _load(base, configuration_overrides(resolved, c), f"{where}.set")
        for run in sweep_runs(resolved, c):
            _load(base, run.overrides, f"{where}.sweep")
    return resolved


def _under(origin: Path, path: str) -> Path:
    p = Path(path).expanduser()
    return (p if p.is_absolute() else origin / p).resolve()


def _load(base: str, overrides: Sequence[str], where: str) -> RunConfig:
    try:
        return load_config(base, list(overrides))
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def _check_study(study: Study) -> None:
    if not study.configurations:
        raise ConfigError("configurations: a study needs at least one [[configurations]] table")
    if not study.seeds:
        raise ConfigError("seeds: a study needs at least one seed")
    if len(set(study.seeds)) != len(study.seeds) or any(s < 0 for s in study.seeds):
        raise ConfigError(f"seeds: expected distinct non-negative integers, got {list(study.seeds)}")
    if study.tokens < 0:
        raise ConfigError(f"tokens must be non-negative (0: the base config's), got {study.tokens}")
    _check_overrides(study.set, "set", allow_lr=True)
    _check_sweep(study.sweep, "sweep")
    seen: set[str] = set()
    for i, c in enumerate(study.configurations):
        where = f"configurations[{i}]"
        if not _LABEL_RE.match(c.label):
            raise ConfigError(
                f"{where}.label: {c.label!r} must start with a letter or digit and hold only letters, "
                "digits and _ . + - (it names run directories)"
            )
        if c.label in seen:
            raise ConfigError(f"{where}.label: {c.label!r} is used by two configurations")
        seen.add(c.label)
        if c.tokens < 0:
            raise ConfigError(f"{where}.tokens must be non-negative (0: the study's), got {c.tokens}")
        _check_overrides(c.set, f"{where}.set", allow_lr=True)
        _check_sweep(c.sweep, f"{where}.sweep")


def _check_overrides(overrides: Iterable[str], where: str, *, allow_lr: bool) -> None:
    reserved = _RESERVED_KEYS if allow_lr else {**_RESERVED_KEYS, **_SWEPT_KEYS}
    for item in overrides:
        try:
            apply_overrides({}, [item])  # the syntax and key path, as --set checks them
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
        key = item.split("=", 1)[0].strip()
        if key in reserved:
            raise ConfigError(f"{where}: {key} cannot be set here: {reserved[key]}")


def _check_sweep(sweep: SweepConfig, where: str) -> None:
    if sweep.multipliers and sweep.values:
        raise ConfigError(f"{where}: give multipliers or values, not both")
    grid = sweep.multipliers or sweep.values
    key = "multipliers" if sweep.multipliers else "values"
    if any(not (x > 0 and math.isfinite(x)) for x in grid):
        raise ConfigError(f"{where}.{key}: expected positive numbers, got {list(grid)}")
    if len(set(grid)) != len(grid):
        raise ConfigError(f"{where}.{key}: {list(grid)} repeats a value")
    names = [_grid_suffix(sweep, x) for x in grid]
    if len(set(names)) != len(names):
        raise ConfigError(f"{where}.{key}: {list(grid)} has values too close to name their runs apart")
    if sweep.tokens < 0:
        raise ConfigError(f"{where}.tokens must be non-negative (0: the study's tokens), got {sweep.tokens}")
    if sweep.seed < 0:
        raise ConfigError(f"{where}.seed must be non-negative, got {sweep.seed}")
    if not sweep.tie_tolerance >= 0:
        raise ConfigError(f"{where}.tie_tolerance must be non-negative, got {sweep.tie_tolerance}")
    _check_overrides(sweep.set, f"{where}.set", allow_lr=False)


# ----------------------------------------------------------------------------------------------------
# The run plan


@dataclass(frozen=True)
class PlannedRun:
    """One run of the study: where it goes and the overrides of the base config that make it.

    ``lrs`` and ``multiplier`` are None for a main run whose configuration's sweep has not chosen yet.
    """

    name: str
    """Run name and directory name, e.g. ``A1-s0`` or ``A1-x0.5``."""
    phase: Phase
    label: str
    seed: int
    tokens: int
    """The run's ``train.tokens`` (the budget; the run takes whole optimizer steps of it)."""
    data_class: str
    data_dir: str
    """Absolute path of the dataset directory."""
    overrides: tuple[str, ...]
    """``key=value`` overrides of the study's base, lowest priority first (the LRs included when known)."""
    lrs: dict[str, float] | None = None
    """``{"muon_lr", "lr"}`` under muon, ``{"lr"}`` under adamw; None until the sweep has chosen."""
    multiplier: float | None = None
    """The learning rates as a multiple of the configuration's own."""

    @property
    def run_dir(self) -> str:
        """Path of the run directory relative to the study directory."""
        return f"{PHASE_DIRS[self.phase]}/{self.name}"

    @property
    def log(self) -> str:
        """Path of the run's log relative to the study directory."""
        return f"logs/{PHASE_DIRS[self.phase]}/{self.name}.log"

    def config(self, study: Study) -> RunConfig:
        """The run's validated run config (``lrs`` must be known)."""
        if self.lrs is None:
            raise ConfigError(
                f"{self.name}: its learning rates are chosen by the sweep, which has not finished"
            )
        return load_config(study.base, list(self.overrides))


def configuration_overrides(study: Study, configuration: Configuration) -> list[str]:
    """Overrides of the base that make ``configuration`` (before budget, seed and learning rates)."""
    return [
        *study.set,
        f"model.qk_norm={json.dumps(configuration.qk_norm)}",
        f"optim.name={json.dumps(configuration.optimizer)}",
        *configuration.set,
    ]


def configuration_config(study: Study, configuration: Configuration) -> RunConfig:
    """The configuration's run config at its own learning rates (the base of its sweep's multipliers)."""
    return load_config(study.base, configuration_overrides(study, configuration))


def base_lrs(cfg: RunConfig) -> dict[str, float]:
    """The learning rates a study moves: ``{"muon_lr", "lr"}`` under muon, ``{"lr"}`` under adamw."""
    if cfg.optim.name == "muon":
        return {"muon_lr": cfg.optim.muon_lr, "lr": cfg.optim.lr}
    return {"lr": cfg.optim.lr}


def sweep_grid(cfg: RunConfig, sweep: SweepConfig) -> list[tuple[float, dict[str, float]]]:
    """(multiplier, learning rates) of every point of ``sweep`` for the configuration ``cfg``.

    Under muon, ``values`` are values of ``optim.muon_lr`` and the multiplier is
    ``value / muon_lr``; ``optim.lr`` is multiplied by it too unless ``muon_adamw_lr = "fixed"``.
    Under adamw, ``values`` are values of ``optim.lr``.

    Examples
    --------
    >>> from trainer.config import load_config
    >>> cfg = load_config("tiny")  # muon_lr 0.02, lr 0.003
    >>> sweep_grid(cfg, SweepConfig(multipliers=(0.5, 2.0)))
    [(0.5, {'muon_lr': 0.01, 'lr': 0.0015}), (2.0, {'muon_lr': 0.04, 'lr': 0.006})]
    >>> sweep_grid(cfg, SweepConfig(values=(0.01,), muon_adamw_lr="fixed"))
    [(0.5, {'muon_lr': 0.01, 'lr': 0.003})]
    """
    base = base_lrs(cfg)
    primary = "muon_lr" if cfg.optim.name == "muon" else "lr"
    points = []
    for x in sweep.multipliers or sweep.values:
        m = x if sweep.multipliers else x / base[primary]
        lrs = {
            k: (v * m if (k == primary or sweep.muon_adamw_lr == "scaled") else v) for k, v in base.items()
        }
        if sweep.values:
            lrs[primary] = x  # exactly the value written, not value / base * base
        points.append((m, lrs))
    return points


def _grid_suffix(sweep: SweepConfig, x: float) -> str:
    return f"x{x:g}" if sweep.multipliers else f"lr{x:g}"


def _lr_overrides(lrs: dict[str, float]) -> list[str]:
    return [f"optim.{k}={v!r}" for k, v in lrs.items()]


def sweep_runs(study: Study, configuration: Configuration) -> list[PlannedRun]:
    """The sweep runs of ``configuration`` (none when it has no sweep), in grid order."""
    sweep = configuration.sweep
    if not sweep.enabled:
        return []
    cfg = configuration_config(study, configuration)
    grid = sweep.multipliers or sweep.values
    runs = []
    for x, (m, lrs) in zip(grid, sweep_grid(cfg, sweep)):
        name = f"{configuration.label}-{_grid_suffix(sweep, x)}"
        overrides = (
            *configuration_overrides(study, configuration),
            f"train.tokens={sweep.tokens}",
            f"train.seed={sweep.seed}",
            *sweep.set,
            *_lr_overrides(lrs),
            f"name={json.dumps(name)}",
        )
        runs.append(
            PlannedRun(
                name=name,
                phase="sweep",
                label=configuration.label,
                seed=sweep.seed,
                tokens=sweep.tokens,
                data_class=configuration.data,
                data_dir=study.data_dir(configuration),
                overrides=overrides,
                lrs=lrs,
                multiplier=m,
            )
        )
    return runs


def main_runs(
    study: Study, configuration: Configuration, choice: SweepChoice | None = None
) -> list[PlannedRun]:
    """The main runs of ``configuration``, one per seed, at the chosen learning rates.

    Without a sweep the configuration's own rates are used; with one and no ``choice`` yet, the runs
    are listed with ``lrs = None`` (they cannot be started).
    """
    if configuration.sweep.enabled:
        lrs, m = (choice.lrs, choice.multiplier) if choice and choice.lrs is not None else (None, None)
    else:
        lrs, m = base_lrs(configuration_config(study, configuration)), 1.0
    runs = []
    for seed in study.seeds:
        name = f"{configuration.label}-s{seed}"
        overrides = (
            *configuration_overrides(study, configuration),
            f"train.tokens={configuration.tokens}",
            f"train.seed={seed}",
            *(_lr_overrides(lrs) if lrs else ()),
            f"name={json.dumps(name)}",
        )
        runs.append(
            PlannedRun(
                name=name,
                phase="main",
                label=configuration.label,
                seed=seed,
                tokens=configuration.tokens,
                data_class=configuration.data,
                data_dir=study.data_dir(configuration),
                overrides=overrides,
                lrs=lrs,
                multiplier=m,
            )
        )
    return runs


def config_changes(base: RunConfig, cfg: RunConfig) -> list[str]:
    """``key=value`` for every field where ``cfg`` differs from ``base``, in dotted-key order.

    >>> from trainer.config import load_config
    >>> config_changes(load_config("tiny"), load_config("tiny", ["optim.name=adamw", "train.seed=3"]))
    ['optim.name="adamw"', 'train.seed=3']
    """
    a, b = _flatten(base.to_dict()), _flatten(cfg.to_dict())
    return [f"{k}={json.dumps(b[k])}" for k in sorted(b) if a.get(k) != b[k]]


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in data.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


# ----------------------------------------------------------------------------------------------------
# Choosing the learning rate


@dataclass(frozen=True)
class SweepResult:
    """What one sweep run ended with (read from its run directory by :mod:`trainer.study.directory`)."""

    name: str
    multiplier: float
    lrs: dict[str, float]
    status: str
    """``completed``, ``diverged``, ``failed``, ``running`` or ``missing`` (not started)."""
    val_loss: float | None = None
    """Validation loss at the run's last step; None when not finished or not finite."""
    error: str | None = None
    """The run's error message, when it has one."""


@dataclass(frozen=True)
class SweepRow:
    """One line of the sweep table (``sweep.csv``)."""

    label: str
    run: str
    multiplier: float
    lrs: dict[str, float]
    final_val_loss: float | None
    status: str
    chosen: bool
    reason: str


@dataclass(frozen=True)
class SweepChoice:
    """The outcome of one configuration's sweep.

    ``status``: ``chosen`` (``run``, ``lrs``, ``multiplier``, ``val_loss`` set), ``fixed`` (no sweep:
    the configuration's own rates), ``pending`` (some sweep run has not finished: nothing chosen
    yet), or ``all_diverged`` (an error: no run is usable).
    """

    label: str
    status: Literal["chosen", "fixed", "pending", "all_diverged"]
    reason: str
    run: str | None = None
    multiplier: float | None = None
    lrs: dict[str, float] | None = None
    val_loss: float | None = None
    rows: tuple[SweepRow, ...] = ()


def select_lr(label: str, results: Sequence[SweepResult], tie_tolerance: float = 0.0) -> SweepChoice:
    """Pick the learning rate of configuration ``label`` from its finished sweep runs.

    Rule: the lowest validation loss at the last step of the sweep run. A run that diverged
    (``run.json`` status ``diverged``) or whose final validation loss is not finite is excluded.
    Losses within ``tie_tolerance`` of the lowest are a tie, broken by the lowest learning rate
    (smallest multiplier): the more conservative rate. Nothing is chosen while a run has not finished
    (failed, running or not started): a choice made without it could change.

    Examples
    --------
    >>> r = [SweepResult("A-x1", 1.0, {"lr": 1e-3}, "completed", 4.2),
    ...      SweepResult("A-x2", 2.0, {"lr": 2e-3}, "completed", 4.2),
    ...      SweepResult("A-x4", 4.0, {"lr": 4e-3}, "diverged", None, "non-finite loss at step 3")]
    >>> c = select_lr("A", r)
    >>> c.status, c.run, c.lrs
    ('chosen', 'A-x1', {'lr': 0.001})
    >>> [row.reason for row in c.rows]  # doctest: +NORMALIZE_WHITESPACE
    ['lowest final validation loss (4.2); tied with A-x2 within 0, the lower learning rate wins',
     'tied with A-x1 (4.2), which has the lower learning rate',
     'excluded: diverged (non-finite loss at step 3)']
    """
    excluded = {}
    for r in results:
        if r.status == "diverged":
            excluded[r.name] = f"excluded: diverged ({r.error})" if r.error else "excluded: diverged"
        elif r.status == "completed" and (r.val_loss is None or not math.isfinite(r.val_loss)):
            excluded[r.name] = "excluded: non-finite final validation loss"
    unfinished = [r for r in results if r.status not in ("completed", "diverged")]
    candidates = [r for r in results if r.status == "completed" and r.name not in excluded]

    def row(r: SweepResult, chosen: bool, reason: str) -> SweepRow:
        return SweepRow(label, r.name, r.multiplier, r.lrs, r.val_loss, r.status, chosen, reason)

    if unfinished:
        names = ", ".join(f"{r.name} ({r.status})" for r in unfinished)
        rows = tuple(
            row(r, False, excluded.get(r.name, "" if r in candidates else "not finished")) for r in results
        )
        return SweepChoice(label, "pending", f"waiting for sweep run(s) {names}", rows=rows)
    if not candidates:
        rows = tuple(row(r, False, excluded[r.name]) for r in results)
        return SweepChoice(
            label, "all_diverged", f"every sweep run of configuration {label} diverged", rows=rows
        )
    best = min(r.val_loss for r in candidates)
    tied = sorted((r for r in candidates if r.val_loss <= best + tie_tolerance), key=lambda r: r.multiplier)
    chosen = tied[0]
    others = [r.name for r in tied[1:]]
    why = f"lowest final validation loss ({chosen.val_loss:.6g})"
    if others:
        why += f"; tied with {', '.join(others)} within {tie_tolerance:g}, the lower learning rate wins"
    rows = []
    for r in results:
        if r is chosen:
            rows.append(row(r, True, why))
        elif r.name in excluded:
            rows.append(row(r, False, excluded[r.name]))
        elif r.name in others:
            rows.append(
                row(
                    r,
                    False,
                    f"tied with {chosen.name} ({chosen.val_loss:.6g}), which has the lower learning rate",
                )
            )
        else:
            rows.append(
                row(r, False, f"higher final validation loss than {chosen.name} ({chosen.val_loss:.6g})")
            )
    return SweepChoice(
        label,
        "chosen",
        why,
        run=chosen.name,
        multiplier=chosen.multiplier,
        lrs=chosen.lrs,
        val_loss=chosen.val_loss,
        rows=tuple(rows),
    )


def fixed_choice(study: Study, configuration: Configuration) -> SweepChoice:
    """The "choice" of a configuration without a sweep: its own learning rates."""
    lrs = base_lrs(configuration_config(study, configuration))
    return SweepChoice(
        configuration.label,
        "fixed",
        "no sweep: the configuration's own learning rates",
        multiplier=1.0,
        lrs=lrs,
    )


def format_lrs(lrs: dict[str, float] | None) -> str:
    """``muon_lr=0.02 lr=0.003``; ``chosen by the sweep`` when not known yet."""
    return " ".join(f"{k}={v:g}" for k, v in lrs.items()) if lrs else "chosen by the sweep"
