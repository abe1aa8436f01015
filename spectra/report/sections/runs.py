"""The runs and the plan's matrix, the headline PR per run and configuration, and the planned comparisons."""

from __future__ import annotations

from spectra.analysis import stats
from spectra.analysis.null import NULL_DRAWS
from spectra.report.context import ReportContext
from spectra.report.document import Block, Heading, Paragraph, Table
from spectra.report.output import ReportWriter

RUN_COLUMNS = [
    "run",
    "label",
    "qk_norm",
    "optimizer",
    "muon_qkvo",
    "weights_dtype",
    "seed",
    "data",
    "data_class",
    "n_checkpoints",
    "final_step",
    "final_tokens",
]
FORMAT_PR = {"mean": ".2f", "ci_low": ".2f", "ci_high": ".2f", "sd": ".2f"}


def plan_section(ctx: ReportContext, w: ReportWriter) -> list[Block]:
    if ctx.studies:
        where = (
            "The runs of a study carry the study's own configuration labels and data classes (its "
            "`study.json`); a study configuration counts for the plan's cell its QK-norm, optimizer and data "
            "class make, whatever its label. Other runs' data classes come from the dataset names."
        )
    else:
        where = (
            "Data classes come from the dataset names (`bbe`/`simple` → simple, `kjv`/`complex` → complex, "
            "else standard) unless named with --simple-data / --complex-data."
        )
    return [
        Heading(1, "Runs and the plan's matrix"),
        Paragraph(
            "The plan (seed 002) crosses QK-norm (learned / none), optimizer (Muon+AdamW / AdamW) and data "
            f"(standard / simple / complex) in six configurations, A1 … C2. {where} A configuration outside "
            "the matrix (e.g. a frozen gamma) is listed as extra; runs that replicate the source code's training "
            "(fused-QKVO Muon A1f/A2f, its step-size control A1c/A2c, pure bfloat16 weights A1f-bf16/B1-bf16) have "
            "cells of their own, compared with the plan's where both are present."
        ),
        Table(
            ctx.coverage,
            "Configurations of the plan: present, missing, extra",
            csv=w.csv("plan_matrix.csv", ctx.coverage),
        ),
        Table(ctx.runs[RUN_COLUMNS], "Runs", csv=w.csv("runs.csv", ctx.runs)),
    ]


def headline_section(ctx: ReportContext, w: ReportWriter) -> list[Block]:
    return [
        Heading(1, "Headline: mean key PR at the final checkpoint"),
        Paragraph(
            f"Per run: the mean of the PR of every (layer, key/value head) at the run's last checkpoint "
            f"({ctx.measured}), with a {stats.CONFIDENCE:.0%} percentile-bootstrap interval over heads "
            f"({ctx.n_resamples} resamples, seed {ctx.seed}). That interval describes the spread between heads of "
            "one model, not how much the number would change with another training seed. Beside it, the PR that "
            "Gaussian random vectors of the same N tokens and head dimension give (the null: "
            f"{NULL_DRAWS} seeded draws, Monte Carlo standard error in `null_se`) and the PR as a fraction of it: "
            "even random vectors read below head_dim at finite N, so a fraction well below 1, not a PR below "
            "head_dim, is collapse."
        ),
        Table(
            ctx.headline[
                [
                    "run",
                    "label",
                    "seed",
                    "step",
                    "tokens",
                    "n_heads",
                    "n_tokens",
                    "head_dim",
                    "mean",
                    "ci_low",
                    "ci_high",
                    "null_mean",
                    "fraction_of_null",
                    "fraction_ci_low",
                    "fraction_ci_high",
                ]
            ],  # fmt: skip
            "Per run: mean PR and its bootstrap CI over heads, against the Gaussian null",
            {
                **FORMAT_PR,
                "null_mean": ".2f",
                "fraction_of_null": ".2f",
                "fraction_ci_low": ".2f",
                "fraction_ci_high": ".2f",
            },  # fmt: skip
            csv=w.csv("run_summaries.csv", ctx.headline),
        ),
        Table(
            ctx.configs,
            "Per configuration: mean over seeds, bootstrap CI over seeds",
            FORMAT_PR,
            csv=w.csv("configurations.csv", ctx.configs),
        ),
    ]


COMPARISON_COLUMNS = [
    "pair",
    "question",
    "n_a",
    "n_b",
    "mean_a",
    "mean_b",
    "diff",
    "diff_ci_low",
    "diff_ci_high",
    "welch_p",
    "mwu_p",
    "reading",
    "note",
]


def comparisons_section(ctx: ReportContext, w: ReportWriter) -> list[Block]:
    return [
        Heading(1, "Comparisons between configurations"),
        Paragraph(
            "The plan's comparisons (section 4: A1 vs A2, A1 vs B1, C1 vs C2) and the double control B1 vs B2, "
            "each as the first configuration minus the second, on the "
            "per-seed headline values. With at least two seeds on each side: Welch's t-test "
            "(scipy.stats.ttest_ind, equal_var=False) and a bootstrap CI of the difference over seeds; with "
            "at least three, also the two-sided Mann-Whitney U test. The seed is the unit of replication."
        ),
        Table(
            ctx.comparisons[COMPARISON_COLUMNS],
            "Planned comparisons (diff = mean of the first − mean of the second)",
            {
                "mean_a": ".2f",
                "mean_b": ".2f",
                "diff": "+.2f",
                "diff_ci_low": "+.2f",
                "diff_ci_high": "+.2f",
                "welch_p": ".3g",
                "mwu_p": ".3g",
            },
            csv=w.csv("comparisons.csv", ctx.comparisons),
        ),
    ]
