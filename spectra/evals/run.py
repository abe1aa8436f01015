"""Downstream evals through lm-evaluation-harness: our checkpoints, the dataset's tokenizer, lm-eval's tasks.

``evaluate(path, tasks)`` scores a run's final checkpoint (or every checkpoint) on lm-eval tasks with
``lm_eval.simple_evaluate`` and the model wrapper of [`spectra.evals.lm_eval_model`][spectra.evals.lm_eval_model], and writes
the scores, their standard errors, task versions, few-shot counts and the lm-eval version to ``RUN/evals.json``
([`spectra.evals.results`][spectra.evals.results]). Tasks are lm-eval's own: hub tasks by name (``hellaswag``,
``lambada_openai``) where the Hugging Face Hub is reachable, and local tasks from YAML files found through
``TaskManager(include_path=...)`` offline, for example a task whose dataset is local JSON
(``dataset_path: json`` with ``dataset_kwargs: {data_files: ...}``).

Incremental like extraction: an evaluation already in the file (same checkpoint, task, requested few-shot count
and limit) is skipped, and the file is rewritten atomically after each checkpoint, so an interruption loses at
most one checkpoint's work.

``lm_eval`` is the optional ``eval`` extra (``pip install -e '.[eval]'``), imported only here, when an
evaluation runs. Note that ``lm_eval.simple_evaluate`` seeds Python's, numpy's and torch's global random
generators (its ``random_seed``, ``numpy_random_seed``, ``torch_random_seed``), as it always does.

Examples
--------
>>> from spectra.evals.run import evaluate
>>> evaluate("runs/A1-s0", ["hellaswag", "lambada_openai"], num_fewshot={"hellaswag": 10})  # doctest: +SKIP
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spectra.dataset import META_FILE, TOKENIZER_FILE, read_meta
from spectra.errors import SpectraError
from spectra.evals.results import evals_path, read_eval_results, record_key, write_eval_results
from spectra.extract.load import (
    Checkpoint,
    load_checkpoint,
    read_metadata,
    resolve_device,
)
from spectra.fileio import ExclusiveLock, check_writable, remove_stale_temporaries
from spectra.rundir import CHECKPOINTS_DIR, find_checkpoints, holds_checkpoints, run_dir_of
from spectra.study import is_study_dir, read_study
from trainer.provenance import software_versions, utc_now

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_BOOTSTRAP_ITERS",
    "EvalResult",
    "EvalTarget",
    "evaluate",
    "evaluate_checkpoint",
    "load_dataset_tokenizer",
    "parse_num_fewshot",
    "resolve_eval_inputs",
    "task_manager_for",
]

DEFAULT_BATCH_SIZE = 8
"""Sequences per forward pass."""
DEFAULT_BOOTSTRAP_ITERS = 1000
"""Bootstrap resamples lm-eval uses for the standard errors it cannot compute in closed form (perplexity);
means (accuracies) have a closed form. lm-eval's own default is 100000, minutes on a CPU for LAMBADA."""

PathLike = str | os.PathLike[str]


@dataclass(frozen=True)
class EvalTarget:
    """One run to evaluate: its directory and the checkpoints to score."""

    run_dir: Path
    checkpoints: tuple[Path, ...]


@dataclass(frozen=True)
class EvalResult:
    """What ``evaluate`` did for one run."""

    path: Path
    """The run's ``evals.json``."""
    added: tuple[tuple[str, str], ...]
    """(checkpoint file name, task) evaluated in this call."""
    skipped: tuple[tuple[str, str], ...]
    """(checkpoint file name, task) already in the file."""


def resolve_eval_inputs(path: PathLike, *, all_checkpoints: bool = False) -> list[EvalTarget]:
    """The runs and checkpoints that ``path`` names.

    - a checkpoint file: that checkpoint of its run;
    - a run directory (or its ``checkpoints/``): its final checkpoint, or every one with ``all_checkpoints``;
    - a directory of run directories: each run, the same way (sorted by name);
    - a study directory (docs/studies.md): its main runs that have checkpoints, in the study's order.

    One function, so that every layout is resolved in one place.

    Raises
    ------
    SpectraError
        ``path`` does not exist, or holds no checkpoints.
    """
    path = Path(path)
    if path.is_file():
        return [EvalTarget(run_dir_of(path), (path,))]
    if not path.is_dir():
        raise SpectraError(f"{path}: no such checkpoint, run directory or directory of runs")
    if is_study_dir(path):
        runs = [run for run in read_study(path).run_dirs("main") if (run / CHECKPOINTS_DIR).is_dir()]
        if not runs:
            raise SpectraError(f"{path}: no run of the study has checkpoints yet")
    elif holds_checkpoints(path):
        runs = [path]
    else:
        runs = sorted(child for child in path.iterdir() if child.is_dir() and holds_checkpoints(child))
        if not runs:
            raise SpectraError(f"{path}: neither a run directory nor a directory of run directories")
    targets = []
    for run in runs:
        found = find_checkpoints(run)
        targets.append(EvalTarget(run_dir_of(run), tuple(found if all_checkpoints else found[-1:])))
    return targets


def parse_num_fewshot(
    spec: int | str | Mapping[str, int] | None, tasks: Sequence[str]
) -> dict[str, int | None]:
    """The requested few-shot count of each task: one count for all (``10``), per task (``"hellaswag=10"``).

    ``None`` (or a task not named) means the task's own default. Examples: ``parse_num_fewshot("hellaswag=10,
    lambada_openai=0", [...])``, ``parse_num_fewshot(5, [...])``.

    >>> parse_num_fewshot("hellaswag=10", ["hellaswag", "lambada_openai"])
    {'hellaswag': 10, 'lambada_openai': None}
    """
    if spec is None or spec == "":
        return dict.fromkeys(tasks)
    if isinstance(spec, int) and not isinstance(spec, bool):
        counts: Mapping[str, int] = dict.fromkeys(tasks, spec)
    elif isinstance(spec, Mapping):
        counts = dict(spec)
    elif isinstance(spec, str) and "=" not in spec:
        try:
            counts = dict.fromkeys(tasks, int(spec))
        except ValueError:
            raise SpectraError(f"--num-fewshot {spec!r}: a number, or task=number pairs") from None
    elif isinstance(spec, str):
        counts = {}
        for part in spec.split(","):
            name, _, number = part.partition("=")
            try:
                counts[name.strip()] = int(number)
            except ValueError:
                raise SpectraError(f"--num-fewshot {part!r}: expected task=number") from None
    else:
        raise SpectraError(f"num_fewshot {spec!r}: a number, a mapping or task=number pairs")
    unknown = sorted(set(counts) - set(tasks))
    if unknown:
        raise SpectraError(f"num_fewshot names tasks that are not evaluated: {', '.join(unknown)}")
    if any(n < 0 for n in counts.values()):
        raise SpectraError("num_fewshot counts must be >= 0")
    return {task: counts.get(task) for task in tasks}


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_dataset_tokenizer(ckpt: Checkpoint, data_dir: PathLike | None = None):
    """The tokenizer the run was trained with: ``tokenizer.json`` of its dataset directory, checked.

    Parameters
    ----------
    ckpt
        The checkpoint; its recorded dataset directory is used unless ``data_dir`` is given.
    data_dir
        Another copy of the dataset directory.

    Returns
    -------
    tuple
        ``(tokenizers.Tokenizer, eot_id, sha256 of tokenizer.json, data_dir)``.

    Raises
    ------
    SpectraError
        No dataset directory, no ``tokenizer.json``, a tokenizer whose sha256 differs from the one the checkpoint
        records, one larger than the model's vocabulary, or no end-of-text id.
    """
    from tokenizers import Tokenizer

    directory = Path(data_dir) if data_dir is not None else ckpt.data_dir
    if directory is None:
        raise SpectraError(f"{ckpt.path}: no dataset directory recorded; pass it with --data")
    file = directory / TOKENIZER_FILE
    if not file.is_file():
        raise SpectraError(
            f"{file}: no tokenizer (the dataset directory of {ckpt.path}; pass another with --data)"
        )
    sha = _sha256_file(file)
    recorded = _recorded_tokenizer(ckpt, directory)
    if recorded.get("sha256") and recorded["sha256"] != sha:
        raise SpectraError(
            f"{file}: sha256 {sha} differs from the tokenizer {ckpt.path.name} was trained with "
            f"({recorded['sha256']}): its token ids would mean other words"
        )
    eot_id = recorded.get("eot_id")
    if not isinstance(eot_id, int):
        raise SpectraError(
            f"{ckpt.path}: no end-of-text id recorded in the checkpoint or {directory / META_FILE}"
        )
    try:
        tok = Tokenizer.from_file(str(file))
    except Exception as e:  # tokenizers raises its own Exception subclass for a bad file
        raise SpectraError(f"{file}: not a readable tokenizers file ({e})") from None
    if tok.get_vocab_size() > ckpt.model_config.vocab_size:
        raise SpectraError(
            f"{file}: {tok.get_vocab_size()} tokens do not fit the model's vocabulary of "
            f"{ckpt.model_config.vocab_size}"
        )
    return tok, eot_id, sha, directory


def _recorded_tokenizer(ckpt: Checkpoint, directory: Path) -> dict[str, Any]:
    """The tokenizer entry (sha256, eot_id) of the checkpoint's dataset metadata, else of the dataset's meta.json."""
    entry: dict[str, Any] = {}
    if (directory / META_FILE).is_file():
        tokenizer = read_meta(directory).get("tokenizer")
        entry.update(tokenizer if isinstance(tokenizer, dict) else {})
    if "dataset" in ckpt.metadata:
        try:
            dataset = json.loads(ckpt.metadata["dataset"])
        except json.JSONDecodeError as e:
            raise SpectraError(f"{ckpt.path}: metadata dataset is not valid JSON ({e})") from None
        if isinstance(dataset, dict):
            entry.update({k: v for k, v in (dataset.get("tokenizer") or {}).items() if v is not None})
            if isinstance(dataset.get("eot_id"), int):
                entry["eot_id"] = dataset["eot_id"]
    return entry


def _lm_eval():
    try:
        import lm_eval
    except ImportError:
        raise SpectraError(
            "downstream evals need lm-evaluation-harness, the optional 'eval' extra: pip install -e '.[eval]'"
        ) from None
    return lm_eval


def _metrics(task_results: dict[str, Any], higher: dict[str, bool]) -> dict[str, dict[str, Any]]:
    """lm-eval's ``"acc,none"``, ``"acc_stderr,none"`` keys as ``{"acc": {"value", "stderr", "filter", ...}}``."""
    out: dict[str, dict[str, Any]] = {}
    for key, value in task_results.items():
        if "," not in key:
            continue
        name, filter_name = key.split(",", 1)
        if name.endswith("_stderr"):
            continue
        stderr = task_results.get(f"{name}_stderr,{filter_name}")
        label = name if filter_name == "none" else f"{name},{filter_name}"
        out[label] = {
            "value": None if value is None else float(value),
            "stderr": float(stderr) if isinstance(stderr, int | float) else None,
            "filter": filter_name,
            "higher_is_better": higher.get(name),
        }
    return out


def _chance(samples: list[dict[str, Any]] | None, output_type: str) -> float | None:
    """Mean of 1 / (number of choices) over the documents of a multiple-choice task."""
    if output_type != "multiple_choice" or not samples:
        return None
    return float(sum(1.0 / len(s["arguments"]) for s in samples) / len(samples))


def evaluate_checkpoint(
    checkpoint: PathLike | Checkpoint,
    tasks: Sequence[str],
    *,
    num_fewshot: int | str | Mapping[str, int] | None = None,
    limit: int | None = None,
    include_path: Iterable[PathLike] = (),
    data_dir: PathLike | None = None,
    device: str = "auto",
    batch_size: int = DEFAULT_BATCH_SIZE,
    bootstrap_iters: int = DEFAULT_BOOTSTRAP_ITERS,
    task_manager: Any = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Score one checkpoint on ``tasks`` with ``lm_eval.simple_evaluate``; one record per task (see evals_io).

    Parameters
    ----------
    checkpoint
        A checkpoint file, or a loaded checkpoint.
    tasks
        lm-eval task names.
    num_fewshot
        One count for every task, or per task (see [`parse_num_fewshot`][spectra.evals.run.parse_num_fewshot]);
        ``None``: each task's default.
    limit
        At most this many documents per task (``None``: all).
    include_path
        Directories of local task YAML files, given to ``TaskManager(include_path=...)``.
    data_dir
        The dataset directory whose ``tokenizer.json`` the run was trained with; default: the one it records.
    device, batch_size
        Where and how many sequences per forward pass.
    bootstrap_iters
        lm-eval's bootstrap resamples for standard errors without a closed form.
    task_manager
        An ``lm_eval.tasks.TaskManager`` to use; default [`task_manager_for`][spectra.evals.run.task_manager_for]
        ``(tasks, include_path)``.
    progress
        Show the progress bar of the log-likelihood requests (on stderr).

    Returns
    -------
    list of dict
        The records, in task order.
    """
    lm_eval = _lm_eval()
    from spectra.evals.lm_eval_model import CollapseLM

    tasks, fewshot, include, manager = _task_request(tasks, num_fewshot, limit, include_path, task_manager)
    dev = resolve_device(device)
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else load_checkpoint(checkpoint, dev)
    tok, eot_id, tok_sha, directory = load_dataset_tokenizer(ckpt, data_dir)
    lm = CollapseLM(ckpt.model, tok, eot_id, batch_size=batch_size, device=dev, progress=progress)

    context = {
        "checkpoint": ckpt.path.name,
        "step": ckpt.step,
        "tokens": ckpt.tokens,
        "checkpoint_sha256": _sha256_file(ckpt.path),
        "limit": limit,
        "lm_eval_version": lm_eval.__version__,
        "versions": software_versions("lm_eval", "tokenizers"),
        "tokenizer_sha256": tok_sha,
        "data_dir": str(directory.resolve()),
        "device": str(dev),
        "batch_size": batch_size,
        "bootstrap_iters": bootstrap_iters,
        "include_path": include,
    }
    records = []
    for count in dict.fromkeys(fewshot.values()):  # one simple_evaluate per requested few-shot count
        group = [t for t in tasks if fewshot[t] == count]
        try:
            results = lm_eval.simple_evaluate(
                model=lm,
                tasks=group,
                num_fewshot=count,
                limit=limit,
                bootstrap_iters=bootstrap_iters,
                task_manager=manager,
                log_samples=True,
            )
        except ConnectionError as e:
            raise SpectraError(
                f"tasks {', '.join(group)}: the dataset could not be fetched ({e}); offline, evaluate local tasks "
                "given with --include-path (see docs/evals.md)"
            ) from None
        records += [_record(results, task, count, context) for task in group]
    return records


def _task_request(
    tasks: Sequence[str],
    num_fewshot: int | str | Mapping[str, int] | None,
    limit: int | None,
    include_path: Iterable[PathLike],
    task_manager: Any,
) -> tuple[list[str], dict[str, int | None], list[str], Any]:
    """The tasks (deduplicated), each one's few-shot count, the include path resolved and the task manager, after
    refusing no tasks, a bad limit, and lm-eval groups (records are per task)."""
    tasks = list(dict.fromkeys(tasks))
    if not tasks:
        raise SpectraError("no tasks given")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise SpectraError(f"limit must be a positive integer, got {limit!r}")
    fewshot = parse_num_fewshot(num_fewshot, tasks)
    include = [str(Path(p).resolve()) for p in include_path]
    manager = task_manager or task_manager_for(tasks, include)
    groups = [t for t in tasks if t not in getattr(manager, "all_subtasks", tasks)]
    if groups:
        raise SpectraError(
            f"{', '.join(groups)}: an lm-eval group or tag, not a task; name its tasks (records are per task)"
        )
    return tasks, fewshot, include, manager


def _record(
    results: dict[str, Any], task: str, requested: int | None, context: dict[str, Any]
) -> dict[str, Any]:
    """One task's entry of ``evals.json`` from ``simple_evaluate``'s results (see spectra.evals.results)."""
    task_config = results["configs"][task]
    output_type = str(task_config.get("output_type"))
    n = results["n-samples"][task]
    config = results.get("config", {})
    return {
        **{k: context[k] for k in ("checkpoint", "step", "tokens", "checkpoint_sha256")},
        "task": task,
        "task_version": results["versions"].get(task),
        "output_type": output_type,
        "task_config_sha256": hashlib.sha256(
            json.dumps(task_config, sort_keys=True, default=str).encode()
        ).hexdigest(),
        "num_fewshot": results["n-shot"].get(task),
        "requested_num_fewshot": requested,
        "limit": context["limit"],
        "n_samples": int(n["effective"]),
        "n_samples_original": int(n["original"]),
        "chance": _chance(results.get("samples", {}).get(task), output_type),
        "metrics": _metrics(results["results"][task], results.get("higher_is_better", {}).get(task, {})),
        **{k: context[k] for k in ("lm_eval_version", "versions", "tokenizer_sha256", "data_dir", "device")},
        **{k: context[k] for k in ("batch_size", "bootstrap_iters")},
        "seeds": {k: config.get(k) for k in ("random_seed", "numpy_seed", "torch_seed", "fewshot_seed")},
        "include_path": context["include_path"],
        "date": utc_now(),
    }


def _run_name(run_dir: Path, checkpoints: Sequence[Path]) -> str:
    return read_metadata(checkpoints[0])["run_name"] if checkpoints else run_dir.name


def evaluate(
    path: PathLike,
    tasks: Sequence[str],
    *,
    all_checkpoints: bool = False,
    num_fewshot: int | str | Mapping[str, int] | None = None,
    limit: int | None = None,
    include_path: Iterable[PathLike] = (),
    data_dir: PathLike | None = None,
    device: str = "auto",
    batch_size: int = DEFAULT_BATCH_SIZE,
    bootstrap_iters: int = DEFAULT_BOOTSTRAP_ITERS,
    echo: Callable[[str], None] | None = None,
    progress: bool = True,
) -> list[EvalResult]:
    """Evaluate the checkpoints ``path`` names and add the scores to each run's ``evals.json``.

    Parameters
    ----------
    path
        A checkpoint file, a run directory or a directory of run directories
        ([`resolve_eval_inputs`][spectra.evals.run.resolve_eval_inputs]).
    tasks
        lm-eval task names.
    all_checkpoints
        Every checkpoint of each run instead of the final one.
    num_fewshot, limit, include_path, data_dir, device, batch_size, bootstrap_iters, progress
        As for [`evaluate_checkpoint`][spectra.evals.run.evaluate_checkpoint].
    echo
        Called with a line per checkpoint evaluated or skipped (the command prints them).

    Returns
    -------
    list of EvalResult
        One per run.

    Raises
    ------
    SpectraError
        Bad inputs, an existing ``evals.json`` that is not one (it is left as it is), unknown tasks, a tokenizer
        that is not the run's, unreachable hub tasks.
    """
    tasks = list(dict.fromkeys(tasks))
    fewshot = parse_num_fewshot(num_fewshot, tasks)
    targets = resolve_eval_inputs(path, all_checkpoints=all_checkpoints)
    options = dict(
        limit=limit, include_path=include_path, data_dir=data_dir, device=device, batch_size=batch_size,
        bootstrap_iters=bootstrap_iters, progress=progress,
    )  # fmt: skip
    for target in targets:  # every place is checked before the first model is scored
        check_writable(evals_path(target.run_dir), "eval results")
    results = []
    for target in targets:
        file = evals_path(target.run_dir)
        # one evaluation at a time adds to a run's evals.json; a killed one's temporaries are removed
        with ExclusiveLock(file, f"eval results {file}"):
            remove_stale_temporaries(file)
            results.append(_evaluate_run(target, tasks, fewshot, options, echo))
    return results


def _evaluate_run(
    target: EvalTarget, tasks: list[str], fewshot: dict[str, int | None], options: dict, echo
) -> EvalResult:
    """Score the target's checkpoints on the tasks its evals.json does not hold yet (see :func:`evaluate`)."""
    file = evals_path(target.run_dir)
    records = read_eval_results(file)["records"] if file.exists() else []
    done = {record_key(r) for r in records}
    run_name = _run_name(target.run_dir, target.checkpoints)
    added, skipped = [], []
    for checkpoint in target.checkpoints:
        todo = [t for t in tasks if (checkpoint.name, t, fewshot[t], options["limit"]) not in done]
        skipped += [(checkpoint.name, t) for t in tasks if t not in todo]
        if not todo:
            if echo:
                echo(f"{checkpoint}: {', '.join(tasks)} already in {file}")
            continue
        counts = {t: n for t, n in fewshot.items() if t in todo and n is not None}
        new = evaluate_checkpoint(checkpoint, todo, num_fewshot=counts, **options)
        records += new
        done |= {record_key(r) for r in new}
        added += [(checkpoint.name, t) for t in todo]
        write_eval_results(target.run_dir, run_name, records)  # after each checkpoint: a kill loses one
        if echo:
            echo(f"{checkpoint}: {_summary(new)}")
    return EvalResult(path=file, added=tuple(added), skipped=tuple(skipped))


def task_manager_for(tasks: Sequence[str], include_path: Iterable[PathLike] = ()):
    """An ``lm_eval.tasks.TaskManager`` that knows ``tasks``, built as cheaply as possible, and cached.

    lm-eval's own index of its roughly 15,000 task files takes from seconds to a minute to build (every YAML is
    parsed). When every task is found in ``include_path`` alone, that index is left out
    (``include_defaults=False``); otherwise both are indexed, ``include_path`` taking precedence.

    Raises
    ------
    SpectraError
        A directory of ``include_path`` that does not exist, or a task found nowhere.
    """
    include = tuple(str(Path(p).resolve()) for p in include_path)
    for p in include:
        if not Path(p).is_dir():
            raise SpectraError(f"--include-path {p}: no such directory of task files")
    if include:
        local = _cached_task_manager(include, False)
        if all(t in local.all_tasks for t in tasks):
            return local
    manager = _cached_task_manager(include, True)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        where = f" or in {', '.join(include)}" if include else "; local tasks need --include-path"
        raise SpectraError(f"unknown lm-eval task(s) {', '.join(unknown)}: not among lm-eval's tasks{where}")
    return manager


@functools.lru_cache(maxsize=8)
def _cached_task_manager(include: tuple[str, ...], include_defaults: bool):
    _lm_eval()
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(include) or None, include_defaults=include_defaults)


def _summary(records: Sequence[dict[str, Any]]) -> str:
    parts = []
    for r in records:
        scores = ", ".join(
            f"{name} {m['value']:.4g}" for name, m in r["metrics"].items() if m["value"] is not None
        )
        parts.append(f"{r['task']} ({r['num_fewshot']}-shot, n={r['n_samples']}): {scores}")
    return "; ".join(parts)
