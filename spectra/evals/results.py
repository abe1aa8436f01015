"""The downstream-eval results file of a run, ``RUN/evals.json``: its format, reading, writing, and one table.

``collapse-spectra eval`` ([`spectra.evals.run`][spectra.evals.run]) writes one file per run, beside its cube. It is
plain JSON, rewritten atomically after every checkpoint, and holds one **record** per (checkpoint, task, requested
few-shot count, limit) evaluated:

| key | meaning |
| --- | --- |
| ``checkpoint``, ``step``, ``tokens`` | the checkpoint's file name (in ``RUN/checkpoints/``) and its training progress |
| ``checkpoint_sha256`` | sha256 of the checkpoint file evaluated |
| ``task``, ``task_version``, ``output_type`` | the lm-eval task, its ``metadata.version`` and kind (``multiple_choice``, ``loglikelihood``, ...) |
| ``task_config_sha256`` | sha256 of the task's resolved configuration as lm-eval reports it (a changed local task shows here) |
| ``num_fewshot``, ``requested_num_fewshot`` | the few-shot count lm-eval used, and the one asked for (``null``: the task's default) |
| ``limit`` | at most this many documents per task (``null``: all) |
| ``n_samples``, ``n_samples_original`` | documents evaluated, and in the task |
| ``chance`` | expected accuracy of a uniform guess (mean of 1 / number of choices) for multiple-choice tasks, else ``null`` |
| ``metrics`` | ``{name: {"value", "stderr", "filter", "higher_is_better"}}``, e.g. ``acc``, ``acc_norm``, ``perplexity``; ``stderr`` as lm-eval computes it (``null`` where it has none) |
| ``lm_eval_version``, ``versions`` | lm-eval's version; python, collapse, torch, numpy, safetensors, lm_eval, tokenizers (:func:`trainer.provenance.software_versions`) |
| ``tokenizer_sha256``, ``data_dir`` | the dataset tokenizer the model was scored with, and its directory |
| ``device``, ``batch_size``, ``bootstrap_iters``, ``seeds``, ``include_path`` | how it ran |
| ``date`` | UTC time the record was made (ISO 8601) |

Reading it needs no torch: the report calls [`read_eval_results`][spectra.evals.results.read_eval_results] and
[`eval_table`][spectra.evals.results.eval_table].
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.stats

from spectra.errors import SpectraError
from spectra.fileio import atomic_write

__all__ = [
    "EVALS_FILENAME",
    "EVALS_FORMAT",
    "EVALS_FORMAT_VERSION",
    "RECORD_KEY",
    "eval_table",
    "evals_path",
    "read_eval_results",
    "record_key",
    "score_interval",
    "write_eval_results",
]

EVALS_FILENAME = "evals.json"
"""A run directory's eval results."""
EVALS_FORMAT = "collapse-evals"
"""Value of the file's ``format`` key."""
EVALS_FORMAT_VERSION = 1
"""The format version this module reads and writes."""
RECORD_KEY = ("checkpoint", "task", "requested_num_fewshot", "limit")
"""What makes a record unique: an evaluation with the same key is not repeated."""
CONFIDENCE = 0.95
"""Level of the intervals of [`score_interval`][spectra.evals.results.score_interval]."""

PathLike = str | os.PathLike[str]


def evals_path(run_dir: PathLike) -> Path:
    """``RUN/evals.json``."""
    return Path(run_dir) / EVALS_FILENAME


def record_key(record: dict[str, Any]) -> tuple:
    """The :data:`RECORD_KEY` values of a record."""
    return tuple(record.get(k) for k in RECORD_KEY)


def read_eval_results(run_dir_or_file: PathLike) -> dict[str, Any]:
    """The eval results of a run: ``{"format", "format_version", "run_name", "run_dir", "records": [...]}``.

    Parameters
    ----------
    run_dir_or_file
        A run directory (its ``evals.json``) or the file itself.

    Raises
    ------
    SpectraError
        No such file, not JSON, not an evals file of a version this reader knows, or records without their keys.

    Examples
    --------
    >>> read_eval_results("runs/A1-s0")["records"][0]["metrics"]["acc"]["value"]  # doctest: +SKIP
    0.2581
    """
    path = Path(run_dir_or_file)
    if path.is_dir():
        path = evals_path(path)
    if not path.is_file():
        raise SpectraError(f"{path}: no eval results (run `collapse-spectra eval` on the run first)")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SpectraError(f"{path}: not a readable JSON file ({e})") from None
    if not isinstance(data, dict) or data.get("format") != EVALS_FORMAT:
        raise SpectraError(f"{path}: not an evals file (no format={EVALS_FORMAT!r})")
    if data.get("format_version") != EVALS_FORMAT_VERSION:
        raise SpectraError(
            f"{path}: evals format_version {data.get('format_version')!r} is not readable by this version "
            f"(it reads {EVALS_FORMAT_VERSION})"
        )
    records = data.get("records")
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise SpectraError(f"{path}: 'records' is not a list of objects")
    for i, r in enumerate(records):
        missing = [k for k in ("checkpoint", "step", "tokens", "task", "metrics") if k not in r]
        if missing:
            raise SpectraError(f"{path}: record {i} lacks {', '.join(missing)}")
    data["path"] = str(path)
    return data


def write_eval_results(run_dir: PathLike, run_name: str, records: Iterable[dict[str, Any]]) -> Path:
    """Write ``RUN/evals.json`` atomically with ``records`` (sorted by tokens, task, few-shot count, limit)."""
    records = sorted(
        records,
        key=lambda r: (r["tokens"], r["task"], str(r.get("requested_num_fewshot")), str(r.get("limit"))),
    )
    data = {
        "format": EVALS_FORMAT,
        "format_version": EVALS_FORMAT_VERSION,
        "run_name": run_name,
        "run_dir": str(Path(run_dir).resolve()),
        "records": records,
    }
    text = json.dumps(data, indent=1, sort_keys=False, allow_nan=False) + "\n"
    return atomic_write(evals_path(run_dir), lambda tmp: tmp.write_text(text))


def score_interval(
    value: float, stderr: float | None, n: int | None, metric: str
) -> tuple[float, float, str]:
    """A 95% interval for one score, and how it was made.

    Accuracies (``acc``, ``acc_norm``, ``exact_match``: means of 0/1 outcomes over ``n`` documents) get the
    Wilson score interval, which stays inside [0, 1] and keeps its coverage for small ``n`` and scores near 0 or
    1, where ``value +- 1.96 stderr`` does not. Other metrics (perplexity) get ``value +- 1.96 stderr`` with lm-eval's
    standard error, or no interval where it gave none.

    Examples
    --------
    >>> lo, hi, how = score_interval(0.25, 0.0433, 100, "acc")
    >>> round(lo, 3), round(hi, 3), how
    (0.176, 0.343, 'Wilson 95% over 100 documents')
    """
    z = float(scipy.stats.norm.ppf(0.5 + CONFIDENCE / 2))
    if metric in ("acc", "acc_norm", "exact_match") and n and 0.0 <= value <= 1.0:
        denom = 1 + z**2 / n
        centre = (value + z**2 / (2 * n)) / denom
        half = z * math.sqrt(value * (1 - value) / n + z**2 / (4 * n**2)) / denom
        return centre - half, centre + half, f"Wilson {CONFIDENCE:.0%} over {n} documents"
    if stderr is not None and np.isfinite(stderr):
        return value - z * stderr, value + z * stderr, f"+-{z:.2f} lm-eval stderr"
    return math.nan, math.nan, "no interval (lm-eval gave no standard error)"


def eval_table(results: Iterable[dict[str, Any]]) -> pd.DataFrame:
    """One row per (run, checkpoint, task, metric) of several runs' eval results, with 95% intervals.

    Parameters
    ----------
    results
        [`read_eval_results`][spectra.evals.results.read_eval_results] outputs, one per run.

    Returns
    -------
    pandas.DataFrame
        Columns ``run, checkpoint, step, tokens, task, metric, filter, value, stderr, ci_low, ci_high, interval``
        (how the interval was made), ``n_samples, num_fewshot, limit, chance, higher_is_better, task_version,
        lm_eval_version``. Where one file holds two records of the same evaluation (the same checkpoint, task,
        few-shot count actually used and limit, asked for once by default and once explicitly), the later one is
        kept.
    """
    rows = []
    for data in results:
        run = str(data.get("run_name", ""))
        for record in data["records"]:
            same = (record["checkpoint"], record["task"], record.get("num_fewshot"), record.get("limit"))
            for metric, m in record["metrics"].items():
                value = m.get("value")
                stderr = m.get("stderr")
                value = math.nan if value is None else float(value)
                stderr = None if stderr is None else float(stderr)
                lo, hi, how = score_interval(value, stderr, record.get("n_samples"), metric)
                rows.append(
                    {
                        "_key": (run, *same),
                        "run": run,
                        "checkpoint": record["checkpoint"],
                        "step": int(record["step"]),
                        "tokens": int(record["tokens"]),
                        "task": record["task"],
                        "metric": metric,
                        "filter": m.get("filter", "none"),
                        "value": value,
                        "stderr": math.nan if stderr is None else stderr,
                        "ci_low": lo,
                        "ci_high": hi,
                        "interval": how,
                        "n_samples": record.get("n_samples"),
                        "num_fewshot": record.get("num_fewshot"),
                        "limit": record.get("limit"),
                        "chance": record.get("chance") if metric in ("acc", "acc_norm") else None,
                        "higher_is_better": m.get("higher_is_better"),
                        "task_version": record.get("task_version"),
                        "lm_eval_version": record.get("lm_eval_version"),
                    }
                )
    columns = [
        "run", "checkpoint", "step", "tokens", "task", "metric", "filter", "value", "stderr", "ci_low", "ci_high",
        "interval", "n_samples", "num_fewshot", "limit", "chance", "higher_is_better", "task_version",
        "lm_eval_version",
    ]  # fmt: skip
    if not rows:
        return pd.DataFrame(columns=columns)
    df = pd.DataFrame(rows)
    df = df.drop_duplicates(subset=["_key", "metric", "filter"], keep="last")
    return df[columns].reset_index(drop=True)
