"""When does collapse happen? Breakpoints of the PR trajectories, and whether they fall in loss plateaus."""

from __future__ import annotations

from spectra.analysis import dynamics, piecewise
from spectra.errors import SpectraError
from spectra.figures.dynamics import trajectory_with_breakpoints
from spectra.report.context import ReportContext
from spectra.report.document import Block, Bullets, Heading, NotApplicable, Paragraph, Table
from spectra.report.output import ReportWriter

BREAKPOINT_COLUMNS = [
    "run", "label", "seed", "n_points", "n_breakpoints", "breakpoint_1", "breakpoint_2",
    "slope_before", "slope_after", "net_change", "sudden", "note",
]  # fmt: skip
TOKENS = {
    "breakpoint_1": ".3g",
    "breakpoint_2": ".3g",
    "slope_before": "+.2f",
    "slope_after": "+.2f",
    "net_change": "+.2f",
}


def _method() -> Paragraph:
    return Paragraph(
        "Each run's mean key PR (and each layer's) against log10 tokens is fitted by continuous piecewise-linear "
        f"models with 0, 1 and 2 breakpoints (exhaustive search, at least {piecewise.MIN_POINTS_PER_SEGMENT} "
        "checkpoints per segment, step 0 left out); BIC chooses, a model with more breakpoints needing a BIC lower "
        f"by {piecewise.BIC_MARGIN:g}. A drop is *sudden* when one segment carries at least "
        f"{piecewise.SUDDEN_SHARE:.0%} of the fitted range within at most {piecewise.SUDDEN_SPAN:.0%} of the "
        "log-token range and falls by more than 3 residual standard deviations; a loss segment is a *plateau* "
        f"when its slope is at most {piecewise.PLATEAU_RATIO:.0%} of the steepest. Slopes are PR per decade of "
        "tokens. With 10 checkpoints (the plan's milestones) a breakpoint is located to within a segment; "
        '`train.milestones = "plan+log"` gives 30 to 50 (see the phase-detection page). A smooth bend '
        "is often fitted by two breakpoints: read the slopes, not only the count."
    )


def dynamics_section(ctx: ReportContext, w: ReportWriter) -> list[Block]:
    blocks: list[Block] = [Heading(1, "When does collapse happen?"), _method()]
    kw = {**ctx.measurement.keywords(), **ctx.labels_kw}
    try:
        ranks = dynamics.breakpoint_table(ctx.ds, **kw)
    except SpectraError as e:
        return blocks + [NotApplicable("Breakpoints", str(e))]
    overall = ranks[ranks["series"] == "all"]
    blocks.append(
        Table(
            overall[[c for c in BREAKPOINT_COLUMNS if c in overall]],
            f"PR trajectory of each run (mean over layers and heads, {ctx.measured}): the breakpoints BIC chose",
            TOKENS,
            csv=w.csv("breakpoints.csv", ranks),
        )
    )
    spread = dynamics.breakpoint_spread(ranks)
    blocks.append(
        Table(
            spread,
            "Main breakpoint across the seeds of each configuration (geometric mean of its tokens, spread in decades)",
            {"geometric_mean": ".3g", "sd_decades": ".2f", "min": ".3g", "max": ".3g"},
            csv=w.csv("breakpoint_spread.csv", spread),
        )
    )
    w.figure(
        blocks,
        "trajectory_breakpoints",
        "PR trajectories with their fits (lines), breakpoints (dotted) and sudden drops (shaded), above the "
        "validation loss with its plateaus (grey).",
        "Trajectory with breakpoints",
        lambda: trajectory_with_breakpoints(ctx.ds, **kw),
    )
    blocks += _plateaus(ctx, w, ranks)
    return blocks


def _plateaus(ctx: ReportContext, w: ReportWriter, ranks) -> list[Block]:
    try:
        losses = dynamics.loss_breakpoint_table(ctx.ds, **ctx.labels_kw)
    except SpectraError as e:
        return [NotApplicable("Loss plateaus", str(e))]
    coincidence = dynamics.plateau_coincidence(ranks[ranks["series"] == "all"], losses)
    blocks: list[Block] = [Heading(2, "Does a rank breakpoint fall in a loss plateau?")]
    if coincidence.empty:
        return blocks + [
            Paragraph("No run's PR trajectory has a breakpoint, so there is nothing to compare.")
        ]
    blocks.append(
        Table(
            coincidence,
            "Each breakpoint of the mean PR, and the validation loss around it",
            {
                "tokens": ".3g",
                "plateau_start": ".3g",
                "plateau_end": ".3g",
                "nearest_loss_breakpoint": ".3g",
                "decades_to_loss_breakpoint": "+.2f",
            },  # fmt: skip
            csv=w.csv("plateau_coincidence.csv", coincidence),
        )
    )
    main = coincidence[coincidence["main"]]
    known = main["in_loss_plateau"].dropna()
    blocks.append(
        Bullets(
            [
                f"{int(known.sum())} of {len(known)} main breakpoints fall in a plateau of the run's validation loss"
                + (
                    f" ({len(main) - len(known)} runs' losses could not be fitted)"
                    if len(known) < len(main)
                    else ""
                )
                + ". A coincidence in one run is not evidence; across seeds of a configuration it is a pattern."
            ]
        )
    )
    return blocks
