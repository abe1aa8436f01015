"""Public models as sources of checkpoints: hub names or local directories, their revisions, steps and tokens.

A source is one of

- ``hf:ORG/NAME``: a model on the Hugging Face hub; its revisions are its branches, listed with
  ``huggingface_hub.list_repo_refs`` (Pythia: ``step0`` ... ``step143000``; OLMo-2: ``stage1-step1000-tokens5B``),
  or any tag or commit given by name; default ``main``;
- a local model directory (``config.json`` and safetensors weights, as ``save_pretrained`` writes them);
  its one revision is ``.``, the directory itself;
- a local directory whose sub-directories are model directories, one per revision, named like hub
  revisions (``step0/``, ``step1000/``); by default every one of them.

Which revisions are read is a selection over that list (:mod:`spectra.hf.selection`: names, ``all``, globs,
``every:N``, ``log:K``, ``range:A-B``); :func:`plan_revisions` resolves it into a :class:`RevisionPlan` without
downloading anything.

Each revision becomes a ``step`` of the cube, with ``tokens`` by the first rule that applies
(:func:`tokens_for`): ``--tokens-per-step`` times the step; the token count in an OLMo-2-style name
(``tokens5B``: 5e9, as rounded by the publisher); Pythia's 2,097,152 tokens per step (1024 sequences
of 2048 tokens, for a model whose name starts with ``pythia-``); else NaN. The step comes from
``step<N>`` in the name, or from ``REV:STEP`` when the name has none (``main:143000``: the step the
checkpoint was taken at).

Fetching a revision's files (and the Hugging Face cache) is :mod:`spectra.hf.cache`'s. This module reads no
weights and imports neither torch nor transformers.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

from spectra.errors import SpectraError
from spectra.hf.selection import NAMED, Outcome, parse_selection, select

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
    selected_by: str = NAMED
    """The ``--revisions`` item that selected it (``named``, ``all``, a glob, ``log:30``, ...)."""


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


def _model_dir_step(source: ModelSource) -> int | None:
    return step_of(source.model_id)


def list_revisions(source: ModelSource) -> list[str]:
    """Every revision the source offers, by name: the hub's branches (``huggingface_hub.list_repo_refs``), the
    model sub-directories of a revisions directory, or ``.`` for one model directory; nothing is downloaded.

    Raises
    ------
    SpectraError
        The hub cannot be asked (offline mode, no network, an unknown or gated model), in one line.
    """
    if source.kind == "model-dir":
        return ["."]
    if source.kind == "revisions-dir":
        assert source.root is not None
        return [p.name for p in _revision_dirs(source.root)]
    return _hub_branches(source.model_id)


def _hub_branches(repo: str) -> list[str]:
    """The branch names of a hub model (one call to the hub, no file downloaded)."""
    import huggingface_hub
    from huggingface_hub.errors import GatedRepoError, OfflineModeIsEnabled, RepositoryNotFoundError

    try:
        refs = huggingface_hub.list_repo_refs(repo)
    except OfflineModeIsEnabled:
        raise SpectraError(
            f"hf:{repo}: its revisions cannot be listed in offline mode (HF_HUB_OFFLINE is set); all, globs, "
            "every:N, log:K, range:A-B and --list-revisions ask the hub: name the revisions (REV or REV:STEP) instead"
        ) from None
    except GatedRepoError:
        raise SpectraError(
            f"hf:{repo} is gated: accept its licence on the hub and log in (HF_TOKEN or `hf auth login`)"
        ) from None
    except RepositoryNotFoundError:
        raise SpectraError(f"hf:{repo}: no such model on the hub (or it is private)") from None
    except Exception as e:  # the network, the hub: one line instead of a traceback, naming what failed
        raise SpectraError(
            f"hf:{repo}: cannot list its revisions on the hub ({type(e).__name__}: {e}); check the network, or "
            "name the revisions (REV or REV:STEP) instead"
        ) from None
    return sorted(b.name for b in refs.branches)


@dataclass(frozen=True)
class RevisionPlan:
    """What a ``--revisions`` value resolves to for one source (:func:`plan_revisions`); nothing downloaded."""

    source: ModelSource
    request: str
    """The selection as given (comma-separated)."""
    revisions: tuple[Revision, ...]
    """The selected revisions that have a step, sorted by step."""
    listed: tuple[str, ...] | None
    """Every revision the source lists, when it was listed (a rule or ``--list-revisions`` asked for it)."""
    outcome: Outcome
    """The selection's own account: its pool, the listed names without a step, rules that picked nothing."""
    problems: tuple[str, ...]
    """Why the selection cannot be extracted as it stands (a selected name without a step, two revisions at
    one step); empty when it can."""

    def check(self) -> RevisionPlan:
        """The plan itself when it can be extracted, else a :class:`SpectraError` with its first problem."""
        if self.problems:
            more = f" (and {len(self.problems) - 1} more problems)" if len(self.problems) > 1 else ""
            raise SpectraError(self.problems[0] + more)
        return self

    def notes(self) -> list[str]:
        """One line per thing the selection leaves out or finds odd, so that nothing is dropped silently."""
        out = []
        if self.outcome.without_step:
            out.append(
                f"{self.source.spec}: not selected, no step in the name (add one as REV:STEP): "
                + ", ".join(self.outcome.without_step)
            )
        out += [f"{self.source.spec}: {rule} selects no revision" for rule in self.outcome.empty_rules]
        gaps = self.outcome.gaps
        if gaps:
            out.append(
                f"{self.source.spec}: gaps in the steps the rules drew from: "
                + "; ".join(g.describe() for g in gaps)
            )
        return out

    def describe(self, done: Collection[int] = ()) -> list[str]:
        """The plan as lines of text: a header, one row per revision (``done``: steps a cube already holds),
        the tokens rules, the notes and the problems."""
        listed = f"{len(self.listed)} revisions listed, " if self.listed is not None else ""
        lines = [f"{self.source.spec}: {listed}{len(self.revisions)} selected by {self.request!r}"]
        rules = list(dict.fromkeys(r.tokens_rule for r in self.revisions))
        rows = [
            (
                r.label,
                str(r.step),
                _tokens_text(r.tokens),
                r.selected_by,
                f"[{rules.index(r.tokens_rule) + 1}]",
            )
            + (("in the cube" if r.step in done else "to extract",) if done else ())
            for r in self.revisions
        ]
        header = ("revision", "step", "tokens", "selected by", "tokens rule") + (("cube",) if done else ())
        widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
        for row in [header, *rows]:
            lines.append(
                "  ".join(
                    cell.ljust(w) if i != 1 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))
                ).rstrip()
            )
        lines += [f"[{i + 1}] tokens: {rule}" for i, rule in enumerate(rules)]
        return lines + self.notes() + [f"problem: {p}" for p in self.problems]


def _tokens_text(tokens: float) -> str:
    return "unknown" if math.isnan(tokens) else f"{int(tokens):,}"


def _named_checks(source: ModelSource, outcome: Outcome) -> None:
    """Refuse names that cannot be a revision of this source (before anything is listed or fetched)."""
    for choice in outcome.chosen:
        if choice.rule != NAMED:
            continue
        if source.kind == "model-dir" and choice.label != ".":
            raise SpectraError(
                f"{source.spec} is one model directory: its revision is '.' (or '.:STEP'), not {choice.label!r}"
            )
        if source.kind == "revisions-dir":
            assert source.root is not None
            if not _is_model_dir(source.root / choice.label):
                raise SpectraError(
                    f"{source.root / choice.label}: no such revision directory (no {CONFIG_FILE})"
                )


def _problems(source: ModelSource, outcome: Outcome) -> list[str]:
    problems = [
        f"revision {c.label!r} of {source.model_id}: its name has no step (step<N>); give it as {c.label}:STEP "
        "with the step the checkpoint was taken at"
        for c in outcome.chosen
        if c.step is None
    ]
    for step, labels in sorted(outcome.duplicates.items()):
        problems.append(
            f"revisions {', '.join(repr(x) for x in labels)} both stand for step {step}; a cube holds one "
            "checkpoint per step (select one naming, e.g. with a glob such as 'stage1-*', and extract OLMo-2 "
            "stages or other restarts into separate cubes)"
        )
    return problems


def plan_revisions(
    source: ModelSource,
    revisions: str | Sequence[str] | None = None,
    *,
    tokens_per_step: int | None = None,
    listing: bool = False,
) -> RevisionPlan:
    """The revisions a ``--revisions`` value selects, with their steps and tokens; nothing is downloaded.

    Parameters
    ----------
    source
        From :func:`parse_source`.
    revisions
        A selection (:mod:`spectra.hf.selection`): names ``REV`` or ``REV:STEP``, ``all``, globs, ``every:N``,
        ``log:K``, ``range:A-B``, comma-separated or as a list. Default: ``main`` on the hub, ``all`` for a
        revisions directory, ``.`` for a model directory.
    tokens_per_step
        Tokens per optimizer step, overriding the family rules.
    listing
        List the source's revisions even when the selection holds only names (for ``--list-revisions``).

    Returns
    -------
    RevisionPlan
        The selected revisions sorted by step, what was listed, the notes and the problems; call
        :meth:`RevisionPlan.check` before extracting.

    Raises
    ------
    SpectraError
        A malformed selection, a sub-directory that does not exist, a revision other than ``.`` of a model
        directory, a non-positive ``tokens_per_step``, a hub that cannot be asked for its list of revisions.
    """
    if tokens_per_step is not None and tokens_per_step <= 0:
        raise SpectraError(f"--tokens-per-step must be positive, got {tokens_per_step}")
    if revisions is None or (not isinstance(revisions, str) and not revisions):
        revisions = {"hub": "main", "revisions-dir": "all", "model-dir": "."}[source.kind]
    selection = parse_selection(revisions)

    def step_from_name(label: str) -> int | None:
        return _model_dir_step(source) if label == "." else step_of(label)

    listed = list_revisions(source) if (selection.needs_listing or listing) else None
    pairs = None if listed is None else [(name, step_from_name(name)) for name in listed]
    outcome = select(selection, pairs, step_of=step_from_name)
    _named_checks(source, outcome)
    planned = []
    for choice in outcome.chosen:
        if choice.step is None:
            continue
        name = source.model_id if choice.label == "." else choice.label
        tokens, rule = tokens_for(source.model_id, name, choice.step, tokens_per_step)
        planned.append(Revision(choice.label, choice.step, tokens, rule, choice.rule))
    return RevisionPlan(
        source=source,
        request=",".join(selection.order),
        revisions=tuple(planned),
        listed=None if listed is None else tuple(listed),
        outcome=outcome,
        problems=tuple(_problems(source, outcome)),
    )


__all__ = [
    "CONFIG_FILE",
    "HUB_PREFIX",
    "PYTHIA_TOKENS_PER_STEP",
    "FetchedRevision",
    "ModelSource",
    "Revision",
    "RevisionPlan",
    "is_public_source",
    "list_revisions",
    "parse_source",
    "plan_revisions",
    "step_of",
    "tokens_for",
    "tokens_in_name",
]
