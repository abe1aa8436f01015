"""How much the headline depends on the measurement: every read-out site, PR convention and centring."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from spectra.analysis import stats
from spectra.report.context import ReportContext
from spectra.report.document import Block, Bullets, Heading, Paragraph, Table
from spectra.report.output import ReportWriter


def sensitivity_section(ctx: ReportContext, w: ReportWriter) -> list[Block]:
    sensitivity = stats.sensitivity_table(ctx.ds, **ctx.labels_kw)
    value_cols = [c for c in sensitivity.columns if c not in ("site", "convention", "centering")]
    return [
        Heading(1, "Sensitivity to the measurement"),
        Paragraph(
            "The same comparison recomputed for every read-out site (proj: raw projection; unit: after the "
            "RMS normalisation, before gamma; normed: after QK-norm with gamma; rope: after the rotary "
            "embedding), PR convention and centring. The source documents' numbers come from one of these "
            "16 variants; if the sign of a difference changes between rows, the conclusion depends on the "
            "measurement choice and should not be stated without it. — means undefined (the unit site of "
            "a run without QK-norm)."
        ),
        Table(
            sensitivity,
            "Headline differences (or configuration means when no planned pair is present) per measurement variant",
            {c: "+.2f" if " vs " in c else ".2f" for c in value_cols},
            csv=w.csv("sensitivity.csv", sensitivity),
        ),
        Bullets(sign_summary(sensitivity, value_cols)),
    ]


def sign_summary(sensitivity: pd.DataFrame, columns: Sequence[str]) -> list[str]:
    """One sentence per column: does the sign hold across the measurement variants?"""
    lines = []
    for c in columns:
        v = sensitivity[c].to_numpy(dtype=float)
        v = v[~np.isnan(v)]
        if " vs " not in c:
            if v.size:
                lines.append(
                    f"{c}: mean PR ranges from {v.min():.2f} to {v.max():.2f} across the {v.size} defined variants."
                )
            continue
        pos, neg = int(np.sum(v > 0)), int(np.sum(v < 0))
        if v.size == 0:
            lines.append(f"{c}: undefined in every variant.")
        elif pos and neg:
            lines.append(
                f"{c}: **the sign flips** — positive in {pos}, negative in {neg} of {v.size} defined variants."
            )
        else:
            sign = "positive" if pos else ("negative" if neg else "zero")
            lines.append(f"{c}: {sign} in all {v.size} defined variants.")
    return lines
