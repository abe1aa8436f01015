"""The tables of docs/replication.md's finding, from the extracted `seed-muon` and `seed-bf16` study directories.

    python scripts/seed_muon_findings.py STUDY_DIR [STUDY_DIR ...]

For each contrast (a minus b, configurations of trainer/study/files/seed-muon.toml and seed-bf16.toml) whose
two configurations are among the studies given, and each checkpoint the two share, the difference of the
seed means of one headline number per run, with the project's statistics
(`spectra.analysis.stats.compare_groups`: a 95% percentile-bootstrap interval of the difference over seeds,
Welch's t-test): the mean key PR (site `normed`, singular-value convention, uncentred, over every layer and
key/value head) and the mean PR of W_k's singular values per key/value head. It prints Markdown; it writes
nothing.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import xarray as xr

import spectra
from spectra.analysis import stats

CONTRASTS = (
    ("MF-L", "MS-L", "fused - separate, QK-norm"),
    ("MF-N", "MS-N", "fused - separate, no QK-norm"),
    ("MF-L", "MC-L", "fused - step-size control, QK-norm"),
    ("MF-N", "MC-N", "fused - step-size control, no QK-norm"),
    ("MC-L", "MS-L", "step-size control - separate, QK-norm"),
    ("MC-N", "MS-N", "step-size control - separate, no QK-norm"),
    ("MS-L", "AW-L", "Muon (separate) - AdamW, QK-norm"),
    ("MF-L", "AW-L", "Muon (fused) - AdamW, QK-norm"),
    ("F32-MF", "F32-AW", "seed recipe: Muon - AdamW, float32 weights"),
    ("B16-MF", "B16-AW", "seed recipe: Muon - AdamW, bfloat16 weights"),
    ("B16-AW", "F32-AW", "seed recipe: bfloat16 - float32 weights, AdamW"),
    ("B16-MF", "F32-MF", "seed recipe: bfloat16 - float32 weights, fused Muon"),
    ("B16-AW-LR", "F32-AW", "seed recipe: bfloat16 - float32 weights, AdamW, both at 0.006"),
    ("B16-AW", "B16-AW-LR", "seed recipe: bfloat16 AdamW at its swept rate - at 0.006"),
    ("B16-MF", "B16-AW-LR", "seed recipe: Muon - AdamW at 0.006, bfloat16 weights"),
)


def headline_numbers(ds: xr.Dataset) -> dict[str, xr.DataArray]:
    """Per run and step: mean key PR at the normed site and mean W_k PR (both singular-value convention)."""
    keys = ds.k_sv.sel(site="normed", centering="uncentered").spectra.participation_ratio(convention="sv")
    weights = ds.wk_sv.spectra.participation_ratio(convention="sv")
    return {"key PR": keys.mean(["layer", "kv_head"]), "W_k PR": weights.mean(["layer", "kv_head"])}


def per_label(values: xr.DataArray, label: str) -> xr.DataArray:
    """The runs ``LABEL-s<seed>`` of one configuration, along ``run``."""
    runs = [r for r in values["run"].values if str(r).rsplit("-s", 1)[0] == label]
    return values.sel(run=runs)


def contrast_rows(values: xr.DataArray, a: str, b: str) -> list[str]:
    va, vb = per_label(values, a), per_label(values, b)
    tokens_a = va["tokens"].isel(run=0).values
    tokens_b = vb["tokens"].isel(run=0).values
    rows = []
    for i, step in enumerate(values["step"].values):
        xa, xb = va.sel(step=step).values, vb.sel(step=step).values
        if np.isnan(xa).any() or np.isnan(xb).any() or tokens_a[i] != tokens_b[i]:
            continue  # a checkpoint one of the two lacks
        c = stats.compare_groups(xa, xb, name_a=a, name_b=b)
        rows.append(
            f"| {int(tokens_a[i]):,} | {c.mean_a:.2f} | {c.mean_b:.2f} | {c.diff:+.2f} "
            f"| [{c.diff_ci_low:+.2f}, {c.diff_ci_high:+.2f}] | {c.welch_p:.2g} | {c.n_a}, {c.n_b} |"
        )
    return rows


def main(studies: list[Path]) -> None:
    ds = spectra.open_cubes([study / "runs" for study in studies])
    labels = {str(r).rsplit("-s", 1)[0] for r in ds["run"].values}
    for name, values in headline_numbers(ds).items():
        for a, b, title in CONTRASTS:
            if not {a, b} <= labels:
                continue
            print(f"\n#### {name}: {title} ({a} - {b})\n")
            print("| tokens | mean a | mean b | a - b | 95% bootstrap CI | Welch p | n seeds |")
            print("| ---: | ---: | ---: | ---: | --- | ---: | --- |")
            print("\n".join(contrast_rows(values, a, b)))


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: python scripts/seed_muon_findings.py STUDY_DIR [STUDY_DIR ...]")
    main([Path(arg) for arg in sys.argv[1:]])
