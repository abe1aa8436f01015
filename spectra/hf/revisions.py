"""Public models as sources of checkpoints: hub names or local directories, revisions, steps and tokens.

A source is one of

- ``hf:ORG/NAME``: a model on the Hugging Face hub; its revisions are branch, tag or commit names
  (Pythia: ``step0`` ... ``step143000``; OLMo-2: ``stage1-step1000-tokens5B``; default ``main``);
- a local model directory (``config.json`` and safetensors weights, as ``save_pretrained`` writes them);
  its one revision is ``.``, the directory itself;
- a local directory whose sub-directories are model directories, one per revision, named like hub
  revisions (``step0/``, ``step1000/``); by default every one of them.

Each revision becomes a ``step`` of the cube, with ``tokens`` by the first rule that applies
(:func:`tokens_for`): ``--tokens-per-step`` times the step; the token count in an OLMo-2-style name
(``tokens5B``: 5e9, as rounded by the publisher); Pythia's 2,097,152 tokens per step (1024 sequences
of 2048 tokens, for a model whose name starts with ``pythia-``); else NaN. The step comes from
``step<N>`` in the name, or from ``REV:STEP`` when the name has none (``main:143000``: the step the
checkpoint was taken at).

Hub files are fetched with ``huggingface_hub.hf_hub_download`` (its cache, its offline mode, its token
for gated models) into a local snapshot directory, after which a hub revision is read exactly like a
local directory. Only ``config.json``, the tokenizer files and safetensors weights are fetched: a
revision without safetensors weights is refused, pickle weights are never downloaded or loaded.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

from spectra.errors import SpectraError

HUB_PREFIX = "hf:"
"""Prefix of a hub model name on the command line."""
PYTHIA_TOKENS_PER_STEP = 2_097_152
"""Pythia's batch: 1024 sequences of 2048 tokens per optimizer step (Biderman et al., 2023)."""
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.bin")
_OPTIONAL_FILES = (
    TOKENIZER_FILE,
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
)

_STEP_RE = re.compile(r"(?<![a-z])step[-_]?(\d+)", re.IGNORECASE)
_TOKENS_RE = re.compile(r"(?<![a-z])tokens[-_]?(\d+(?:\.\d+)?)([KMBT])", re.IGNORECASE)
_UNITS = {"K": 10**3, "M": 10**6, "B": 10**9, "T": 10**12}
_COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")


@dataclass(frozen=True)
class ModelSource:
    """Where a public model's revisions come from."""

    spec: str
    """As given: ``hf:ORG/NAME`` or a directory."""
    model_id: str
    """The hub repository id, or the local directory's name."""
    kind: str
    """``hub``, ``model-dir`` (one revision, ``.``) or ``revisions-dir`` (one sub-directory per revision)."""
    root: Path | None
    """The local directory (None for the hub)."""


@dataclass(frozen=True)
class Revision:
    """One revision of a model and the step and tokens it stands for."""

    label: str
    """The revision's name: a hub revision, a sub-directory name, or ``.`` for a model directory."""
    step: int
    """Optimizer steps at this revision."""
    tokens: float
    """Training tokens at this revision, NaN where no rule gives them."""
    tokens_rule: str
    """How ``tokens`` was obtained, in words."""


@dataclass(frozen=True)
class FetchedRevision:
    """A revision available as a local model directory."""

    revision: Revision
    directory: Path
    """Holds ``config.json`` and the safetensors weights (a hub snapshot for hub sources)."""
    commit: str
    """The hub commit the revision resolved to; empty for local directories."""


def _is_model_dir(path: Path) -> bool:
    return (path / CONFIG_FILE).is_file()


def _revision_dirs(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_dir() and _is_model_dir(p)) if path.is_dir() else []


def is_public_source(path: str | os.PathLike) -> bool:
    """Whether ``path`` names a public model: ``hf:...``, a model directory, or a directory of them.

    Examples
    --------
    >>> is_public_source("hf:EleutherAI/pythia-160m"), is_public_source("runs/A1-s0")
    (True, False)
    """
    text = os.fspath(path)
    if text.startswith(HUB_PREFIX):
        return True
    p = Path(text)
    return _is_model_dir(p) or bool(_revision_dirs(p))


def parse_source(spec: str | os.PathLike) -> ModelSource:
    """Classify a public-model source (see the module docstring).

    Raises
    ------
    SpectraError
        An empty hub name, or a path that is neither a model directory nor a directory of them.
    """
    text = os.fspath(spec)
    if text.startswith(HUB_PREFIX):
        repo = text[len(HUB_PREFIX) :].strip("/")
        if not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", repo):
            raise SpectraError(f"{text}: not a hub model name (expected hf:ORG/NAME)")
        return ModelSource(spec=text, model_id=repo, kind="hub", root=None)
    path = Path(text)
    if _is_model_dir(path):
        return ModelSource(spec=text, model_id=path.resolve().name, kind="model-dir", root=path)
    if _revision_dirs(path):
        return ModelSource(spec=text, model_id=path.resolve().name, kind="revisions-dir", root=path)
    raise SpectraError(
        f"{path}: not a model directory (no {CONFIG_FILE}) nor a directory of revision sub-directories"
    )


def step_of(label: str) -> int | None:
    """The step in a revision name: the number after ``step`` (``step1000``, ``stage1-step1000-tokens5B``).

    >>> step_of("stage1-step1000-tokens5B"), step_of("main")
    (1000, None)
    """
    m = _STEP_RE.search(label)
    return int(m.group(1)) if m else None


def tokens_in_name(label: str) -> int | None:
    """The token count an OLMo-2-style revision name states (``tokens5B`` -> 5_000_000_000), else None.

    >>> tokens_in_name("stage1-step1000-tokens5B")
    5000000000
    """
    m = _TOKENS_RE.search(label)
    if not m:
        return None
    return round(float(m.group(1)) * _UNITS[m.group(2).upper()])


def tokens_for(model_id: str, label: str, step: int, tokens_per_step: int | None) -> tuple[float, str]:
    """``(tokens, rule)`` for one revision, by the first rule that applies (module docstring).

    >>> tokens_for("EleutherAI/pythia-160m", "step1000", 1000, None)
    (2097152000, 'Pythia: step x 2,097,152 tokens (1024 sequences x 2048 tokens per step)')
    >>> tokens_for("Qwen/Qwen3-0.6B", "main", 0, None)[0]
    nan
    """
    if tokens_per_step is not None:
        return step * tokens_per_step, f"--tokens-per-step: step x {tokens_per_step:,}"
    named = tokens_in_name(label)
    if named is not None:
        return named, "the revision name's token count (tokens<N>B, rounded by the publisher to whole units)"
    if model_id.rsplit("/", 1)[-1].lower().startswith("pythia-"):
        return step * PYTHIA_TOKENS_PER_STEP, (
            f"Pythia: step x {PYTHIA_TOKENS_PER_STEP:,} tokens (1024 sequences x 2048 tokens per step)"
        )
    return math.nan, "unknown: no rule applies (pass --tokens-per-step)"


def _split_spec(item: str) -> tuple[str, int | None]:
    """``REV`` or ``REV:STEP`` (a git ref name cannot contain a colon)."""
    if ":" not in item:
        return item, None
    label, step = item.rsplit(":", 1)
    if not step.isdigit():
        raise SpectraError(f"revision {item!r}: the part after ':' must be the step, a non-negative integer")
    return label, int(step)


def plan_revisions(
    source: ModelSource, revisions: list[str] | None = None, *, tokens_per_step: int | None = None
) -> list[Revision]:
    """The revisions to read, with their steps and tokens, sorted by step; nothing is downloaded.

    Parameters
    ----------
    source
        From :func:`parse_source`.
    revisions
        ``REV`` or ``REV:STEP`` items; default: ``main`` on the hub, every sub-directory of a revisions
        directory, ``.`` for a model directory.
    tokens_per_step
        Tokens per optimizer step, overriding the family rules.

    Raises
    ------
    SpectraError
        A revision without a step (no ``step<N>`` in its name and no ``:STEP``), two revisions at the same
        step, a sub-directory that does not exist, a non-positive ``tokens_per_step``.
    """
    if tokens_per_step is not None and tokens_per_step <= 0:
        raise SpectraError(f"--tokens-per-step must be positive, got {tokens_per_step}")
    if revisions is None or not revisions:
        if source.kind == "revisions-dir":
            assert source.root is not None
            revisions = [p.name for p in _revision_dirs(source.root)]
        else:
            revisions = ["main" if source.kind == "hub" else "."]
    planned: dict[int, Revision] = {}
    for item in revisions:
        label, step = _split_spec(item.strip())
        if not label:
            raise SpectraError(f"revision {item!r}: empty name")
        if source.kind == "model-dir" and label != ".":
            raise SpectraError(
                f"{source.spec} is one model directory: its revision is '.' (or '.:STEP'), not {label!r}"
            )
        if source.kind == "revisions-dir":
            assert source.root is not None
            if not _is_model_dir(source.root / label):
                raise SpectraError(f"{source.root / label}: no such revision directory (no {CONFIG_FILE})")
        name = source.model_id if label == "." else label
        step = step if step is not None else step_of(name)
        if step is None:
            raise SpectraError(
                f"revision {label!r} of {source.model_id}: its name has no step (step<N>); give it as "
                f"{label}:STEP with the step the checkpoint was taken at"
            )
        if step in planned:
            raise SpectraError(
                f"revisions {planned[step].label!r} and {label!r} both stand for step {step}; a cube holds one "
                "checkpoint per step (extract OLMo-2 stages or other restarts into separate cubes)"
            )
        tokens, rule = tokens_for(source.model_id, name, step, tokens_per_step)
        planned[step] = Revision(label=label, step=step, tokens=tokens, tokens_rule=rule)
    return [planned[s] for s in sorted(planned)]


def _hub_file(repo: str, filename: str, revision: str, cache_dir: str | os.PathLike | None) -> Path | None:
    """A hub file in the local cache, downloaded if needed; None if the revision has no such file."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        return Path(hf_hub_download(repo, filename, revision=revision, cache_dir=cache_dir))
    except GatedRepoError:
        raise SpectraError(
            f"hf:{repo} is gated: accept its licence on the hub and log in (HF_TOKEN or `hf auth login`)"
        ) from None
    except RevisionNotFoundError:
        raise SpectraError(f"hf:{repo} has no revision {revision!r}") from None
    except RepositoryNotFoundError:
        raise SpectraError(f"hf:{repo}: no such model on the hub (or it is private)") from None
    except EntryNotFoundError:  # absent from the revision, or offline and not in the cache
        return None


def _fetch_hub(source: ModelSource, rev: Revision, cache_dir: str | os.PathLike | None) -> FetchedRevision:
    repo, label = source.model_id, rev.label
    config = _hub_file(repo, CONFIG_FILE, label, cache_dir)
    if config is None:
        raise SpectraError(
            f"hf:{repo} revision {label!r}: no {CONFIG_FILE} on the hub or, offline, in the local cache"
        )
    for name in _OPTIONAL_FILES:
        _hub_file(repo, name, label, cache_dir)
    index = _hub_file(repo, SAFETENSORS_INDEX, label, cache_dir)
    if index is not None:
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        for shard in shards:
            if _hub_file(repo, shard, label, cache_dir) is None:
                raise SpectraError(
                    f"hf:{repo} revision {label!r}: shard {shard} of {SAFETENSORS_INDEX} is missing"
                )
    elif _hub_file(repo, SAFETENSORS_FILE, label, cache_dir) is None:
        raise SpectraError(
            f"hf:{repo} revision {label!r} has no safetensors weights ({SAFETENSORS_FILE} or "
            f"{SAFETENSORS_INDEX}) on the hub or, offline, in the local cache; pickle weights "
            "(pytorch_model.bin) are never loaded"
        )
    directory = config.parent  # the cache's snapshots/<commit>/ directory
    return FetchedRevision(rev, directory, directory.name if _COMMIT_RE.match(directory.name) else "")


def check_safetensors(directory: Path, what: str) -> None:
    """Refuse a model directory without safetensors weights, naming the pickle files it has instead."""
    if (directory / SAFETENSORS_FILE).is_file() or (directory / SAFETENSORS_INDEX).is_file():
        return
    pickles = [name for name in PICKLE_WEIGHTS if (directory / name).is_file()]
    found = f" (it has {', '.join(pickles)}: pickle weights, which are never loaded)" if pickles else ""
    raise SpectraError(
        f"{what}: no safetensors weights ({SAFETENSORS_FILE} or {SAFETENSORS_INDEX}) in {directory}{found}"
    )


def fetch_revision(
    source: ModelSource, rev: Revision, *, cache_dir: str | os.PathLike | None = None
) -> FetchedRevision:
    """Make one revision available as a local model directory (downloading it from the hub if needed).

    Raises
    ------
    SpectraError
        A revision without safetensors weights (pickle weights are refused), an unknown or gated
        repository or revision, or files missing offline.
    """
    if source.kind == "hub":
        fetched = _fetch_hub(source, rev, cache_dir)
    else:
        assert source.root is not None
        directory = source.root if rev.label == "." else source.root / rev.label
        fetched = FetchedRevision(rev, directory, "")
    what = f"{source.spec} revision {rev.label!r}" if rev.label != "." else source.spec
    check_safetensors(fetched.directory, what)
    return fetched


__all__ = [
    "HUB_PREFIX",
    "PYTHIA_TOKENS_PER_STEP",
    "FetchedRevision",
    "ModelSource",
    "Revision",
    "check_safetensors",
    "fetch_revision",
    "is_public_source",
    "parse_source",
    "plan_revisions",
    "step_of",
    "tokens_for",
    "tokens_in_name",
]
