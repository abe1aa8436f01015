"""Does gamma track what the keys use? Spearman's rho between |gamma_j| and the energy of coordinate j."""

from __future__ import annotations

import numpy as np
import pandas as pd

from spectra.analysis import checkpoints, plan
from spectra.analysis import gamma as gamma_analysis
from spectra.figures.gamma import gamma_scatter
from spectra.report.context import ReportContext
from spectra.report.document import Block, Heading, Paragraph, Table
from spectra.report.output import ReportWriter


def gamma_section(ctx: ReportContext, w: ReportWriter) -> list[Block]:
    ds, gamma_site, labels_kw = ctx.ds, ctx.gamma_site, ctx.labels_kw
    blocks: list[Block] = [Heading(1, "Gamma vs importance")]
    note = (
        "before gamma multiplies the keys: the importance of the coordinate independently of the gain"
        if gamma_site == "unit"
        else "after gamma: this energy contains gamma² by construction, so the correlation is biased toward +1"
    )
    blocks.append(
        Paragraph(
            "Per layer and key/value head: Spearman's ρ between |gamma_j| (the key QK-norm gain of coordinate j) "
            f"and the energy of coordinate j, the mean of k_j² over the fixed batch, read at site `{gamma_site}` "
            f"({note}); n = head_dim coordinates per correlation. Runs without QK-norm and frozen gammas are "
            "reported as such."
        )
    )
    result = gamma_analysis.gamma_energy_correlation(ds, which="k", site=gamma_site)
    per_head = gamma_analysis.correlation_table(result, ds, **labels_kw)
    per_layer = gamma_analysis.layer_summary(result, ds)
    w.csv("gamma_per_head.csv", per_head)
    layer_csv = w.csv("gamma_per_layer.csv", per_layer)
    runs = plan.run_table(ds, **labels_kw).set_index("run")
    rows = []
    for run, frame in per_layer.groupby("run", sort=False):
        heads = per_head[(per_head["run"] == run) & (per_head["step"] == frame["step"].iloc[0])]
        ok = heads[heads["status"] == gamma_analysis.STATUS_OK]
        rows.append(
            {
                "run": run,
                "label": runs.loc[run, "label"],
                "qk_norm": runs.loc[run, "qk_norm"],
                "tokens": checkpoints.token_count(frame["tokens"].iloc[0]),
                "heads": len(heads),
                "median_rho": float(ok["rho"].median()) if len(ok) else np.nan,
                "positive_p<0.05": int(((ok["rho"] > 0) & (ok["pvalue"] < 0.05)).sum()),
                "negative_p<0.05": int(((ok["rho"] < 0) & (ok["pvalue"] < 0.05)).sum()),
                "status": "; ".join(sorted(set(heads["status"]))),
            }
        )
    summary = pd.DataFrame(rows)
    blocks.append(
        Table(
            summary,
            "Final checkpoint, per run: Spearman ρ over all (layer, key/value head) pairs",
            {"median_rho": "+.2f"},
        )
    )
    blocks.append(
        Table(
            per_layer[
                ["run", "layer", "median_rho", "min_rho", "max_rho", "n_heads", "n_significant", "status"]
            ],
            "Final checkpoint, per run and layer (p < 0.05 counted as significant, without correction for multiple tests)",
            {"median_rho": "+.2f", "min_rho": "+.2f", "max_rho": "+.2f"},
            csv=layer_csv,
        )
    )
    w.figure(
        blocks,
        "gamma_scatter",
        f"|gamma_j| against the share of each head's key energy in coordinate j (site {gamma_site}), final checkpoint.",
        "Gamma-vs-energy scatter",
        lambda: gamma_scatter(ds, which="k", site=gamma_site, **labels_kw),
    )
    return blocks
