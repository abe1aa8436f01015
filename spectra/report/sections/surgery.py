"""Pruning surgery: test loss after removing key dimensions by gamma, by SVD, or at random."""

from __future__ import annotations

import pandas as pd

from spectra.figures.surgery import surgery_curve, surgery_curves
from spectra.report.context import ReportContext
from spectra.report.document import Block, Bullets, Heading, NotApplicable, Paragraph, Table
from spectra.report.output import ReportWriter


def surgery_section(ctx: ReportContext, w: ReportWriter) -> list[Block]:
    run_names, surgeries = ctx.run_names, ctx.surgeries
    blocks: list[Block] = [Heading(1, "Pruning surgery")]
    if not surgeries:
        blocks.append(
            NotApplicable(
                "Surgery curves",
                "no run has a surgery.nc (run `collapse-spectra surgery RUN/checkpoints/tokens_N.safetensors`).",
            )
        )
        return blocks
    blocks.append(
        Paragraph(
            "Test loss after removing a fraction of each key head's dimensions: by smallest |gamma| (the "
            "source documents' method), by smallest singular directions of the keys, or at random (every draw "
            "shown, the line through their mean, the band their range; the number of draws is in the legend). If gamma ≈ SVD and both beat random, gamma is a usable proxy "
            "for what the keys use; if SVD beats gamma, gamma misleads. The loss is measured on the held-out "
            "test split, never used for any SVD."
        )
    )
    missing = [r for r in run_names if r not in surgeries]
    if missing:
        blocks.append(Paragraph("No surgery results for: " + ", ".join(missing) + "."))
    items = [surgeries[r] for r in run_names if r in surgeries]
    w.figure(
        blocks,
        "surgery",
        "Test loss against the percentage of key dimensions removed per head.",
        "Surgery curves",
        lambda: surgery_curves(items),
    )
    rows = []
    for run in run_names:
        if run not in surgeries:
            continue
        s = surgeries[run]
        for strategy in s["strategy"].values:
            curve = surgery_curve(s, str(strategy))
            row = {"run": run, "strategy": str(strategy), "baseline": float(s["baseline_loss"])}
            row.update({f"{100 * f:.1f}%": m for f, m in zip(curve["fraction"], curve["mean"])})
            rows.append(row)
    table = pd.DataFrame(rows)
    blocks.append(
        Table(
            table,
            "Mean test loss (nats/token) per strategy and fraction removed",
            {c: ".3f" for c in table.columns if c not in ("run", "strategy")},
            csv=w.csv("surgery.csv", table),
        )
    )
    statuses = {r: surgeries[r].attrs.get("gamma_status", "") for r in surgeries}
    odd = {r: s for r, s in statuses.items() if s and s != "ok"}
    if odd:
        blocks.append(Bullets([f"{r}: gamma strategy not applicable ({s})" for r, s in odd.items()]))
    return blocks
