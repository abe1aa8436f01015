"""Figures over training: the PR trajectory and per-layer heatmaps, the spectral shape, data complexity, loss."""

from __future__ import annotations

from spectra.analysis import stats
from spectra.figures import final_checkpoint, trajectories
from spectra.report.context import ReportContext
from spectra.report.document import Block, Heading, Table
from spectra.report.output import ReportWriter, file_stem


def _seed_band(ctx: ReportContext) -> str:
    """What the band of a figure over seeds is, in words (no band where every configuration has one seed)."""
    if (ctx.configs["n_seeds"] >= 2).any():
        return "band = range over seeds (configurations with two or more)"
    return "one seed per configuration, so no band"


def trajectories_section(ctx: ReportContext, w: ReportWriter) -> list[Block]:
    blocks: list[Block] = [Heading(1, "Trajectories")]
    w.figure(
        blocks,
        "trajectory",
        f"Mean key PR against training tokens, one line per configuration, mean over its seeds; "
        f"{_seed_band(ctx)} ({ctx.measured}).",
        "PR trajectory",
        lambda: trajectories.trajectory(ctx.ds, **ctx.measurement.keywords(), **ctx.labels_kw),
    )
    checkpoints = stats.checkpoint_table(
        ctx.ds, site=ctx.measurement.site, centering=ctx.measurement.centering, **ctx.labels_kw
    )
    shown = checkpoints.rename(columns={"pr_sv": "PR (sv convention)", "pr_eig": "PR (eig convention)"})
    blocks.append(
        Table(
            shown,
            f"Mean key PR over layers and heads at every checkpoint, both conventions (site `{ctx.measurement.site}`, "
            f"{ctx.measurement.centering})",
            {
                "PR (sv convention)": ".2f",
                "PR (eig convention)": ".2f",
                "train_loss": ".3f",
                "val_loss": ".3f",
            },
            csv=w.csv("pr_per_checkpoint.csv", checkpoints),
        )
    )
    blocks.append(Heading(2, "Per layer, per run"))
    for i, name in enumerate(ctx.run_names):
        stem = f"heatmap_{file_stem(name)}"
        if any(file_stem(other) == file_stem(name) for other in ctx.run_names[:i]):
            stem += f"_{i}"  # run names that differ only in characters a file name cannot hold
        w.figure(
            blocks,
            stem,
            f"Run {name}: key PR per layer (rows) at each checkpoint (columns), mean over heads.",
            f"Heatmap of run {name}",
            lambda name=name: trajectories.heatmap(
                ctx.ds, run=name, **ctx.measurement.keywords(), **ctx.labels_kw
            ),
        )
    return blocks


def shape_section(ctx: ReportContext, w: ReportWriter) -> list[Block]:
    blocks: list[Block] = [Heading(1, "Spectral shape at the final checkpoint")]
    w.figure(
        blocks,
        "waterfall",
        "σ_i/σ_1 against i, each head normalised by its largest singular value, mean over heads and layers.",
        "Singular-value waterfall",
        lambda: final_checkpoint.waterfall(
            ctx.ds, site=ctx.measurement.site, centering=ctx.measurement.centering, **ctx.labels_kw
        ),
    )
    return blocks


def data_complexity_section(ctx: ReportContext, w: ReportWriter) -> list[Block]:
    blocks: list[Block] = [Heading(1, "Data complexity (C1 vs C2)")]
    w.figure(
        blocks,
        "data_complexity",
        "Per-layer key PR at the final checkpoint for simple (C1) and complex (C2) data.",
        "Data-complexity figure",
        lambda: final_checkpoint.data_complexity(ctx.ds, **ctx.measurement.keywords(), **ctx.labels_kw),
    )
    return blocks


def loss_section(ctx: ReportContext, w: ReportWriter) -> list[Block]:
    blocks: list[Block] = [Heading(1, "Loss")]
    w.figure(
        blocks, "loss", "Training and validation loss against tokens.", "Loss curves",
        lambda: trajectories.loss_curves(ctx.ds, **ctx.labels_kw),
    )  # fmt: skip
    w.figure(
        blocks,
        "pr_vs_loss",
        "Mean key PR against validation loss, one line per run through its checkpoints.",
        "PR against validation loss",
        lambda: trajectories.pr_vs_loss(ctx.ds, **ctx.measurement.keywords(), **ctx.labels_kw),
    )
    return blocks
