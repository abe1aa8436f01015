"""The report's opening: what was measured, and the caveats a reader must know before any number."""

from __future__ import annotations

import datetime as _dt
import os

from spectra.errors import SpectraError
from spectra.report.context import ReportContext
from spectra.report.document import Block, Bullets, Heading, Paragraph
from spectra.report.output import ReportWriter
from trainer.provenance import package_version


def overview_section(ctx: ReportContext, w: ReportWriter) -> list[Block]:
    now = generated_at().strftime("%Y-%m-%d %H:%M UTC")
    return [
        Paragraph(
            f"Generated {now} by collapse {package_version('collapse')} over {len(ctx.run_names)} run(s). Headline measurement: "
            f"{ctx.measured}, the mean over layers and key/value heads at each run's final checkpoint."
        ),
        Paragraph(
            "The participation ratio (PR) counts how many directions the keys of a head spread over: "
            "from 1 (all on one direction) to head_dim (spread evenly). Singular-value convention: "
            "(Σσ)²/Σσ², the source documents' formula; eigenvalue convention: (Σσ²)²/Σσ⁴, the usual one "
            "in the literature, always lower. Each number below says which it is."
        ),
    ]


def generated_at() -> _dt.datetime:
    """Now, or SOURCE_DATE_EPOCH (the reproducible-builds convention) where it is set, so that two builds of one
    report can be compared byte for byte."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    if epoch is None:
        return _dt.datetime.now(_dt.UTC)
    if not epoch.strip().isdigit():
        raise SpectraError(f"SOURCE_DATE_EPOCH={epoch!r}: expected whole seconds since 1970-01-01 UTC")
    return _dt.datetime.fromtimestamp(int(epoch), _dt.UTC)


def _foreign_surgeries(ctx: ReportContext) -> dict[str, str]:
    """A surgery.nc in a run directory that belongs to another run: shown, but flagged."""
    return {
        name: str(ctx.surgeries[name].attrs.get("run_name"))
        for name, cube in zip(ctx.run_names, ctx.cubes)
        if name in ctx.surgeries and ctx.surgeries[name].attrs.get("run_name") != cube.attrs.get("run_name")
    }


def _measurement_caveats(ctx: ReportContext) -> list[str]:
    items = []
    for key, what in (
        ("eval_batch_sha256", "fixed batches"),
        ("drop_first", "numbers of dropped positions"),
        ("n_tokens", "numbers of token vectors per SVD"),
    ):
        values = {str(c.attrs.get(key)) for c in ctx.cubes}
        if len(values) > 1:
            items.append(
                f"**The cubes use different {what}** ({key}: {', '.join(sorted(values))}): differences between "
                "runs mix model and measurement."
            )
    n_tokens = [int(c.attrs["n_tokens"]) for c in ctx.cubes if str(c.attrs.get("n_tokens", "")).isdigit()]
    head_dim = ctx.ds.sizes["sv"]
    if n_tokens and min(n_tokens) < 10 * head_dim:
        items.append(
            f"The spectra come from {min(n_tokens)} token vectors per head for head_dim {head_dim}: with fewer "
            "than about ten vectors per dimension the sample spectrum is noisy and its PR is biased; compare runs "
            "measured on the same batch only."
        )
    return items


def caveats_section(ctx: ReportContext, w: ReportWriter) -> list[Block]:
    items = [f"Skipped {run}: {why}." for run, why in ctx.skipped]
    foreign = _foreign_surgeries(ctx)
    if foreign:
        items.append(
            "**Surgery results of another run**: "
            + ", ".join(f"{n} holds the surgery of {r}" for n, r in foreign.items())
            + "; check that the right surgery.nc is in each run directory."
        )
    single = ctx.configs[ctx.configs["n_seeds"] < 2]["label"].tolist()
    if single:
        items.append(
            f"One seed only for {', '.join(single)}. With n=1 seed per configuration no test across seeds is "
            "possible; the head-level CI describes within-model spread, not run-to-run variability, and a "
            "difference between two single-seed configurations can be seed-to-seed noise."
        )
    items += _measurement_caveats(ctx)
    missing = ctx.coverage[ctx.coverage["status"] == "missing"]["label"].tolist()
    if missing:
        items.append(
            f"Configurations of the plan without runs: {', '.join(missing)}; comparisons involving them are not made."
        )
    if ctx.measurement.site == "unit" and (ctx.runs["qk_norm"] == "none").any():
        items.append(
            "The headline site `unit` does not exist for runs without QK-norm: their headline values are undefined."
        )
    items.append(
        "The source documents report PR in the singular-value convention on uncentred keys read after the norm "
        "(an earlier version after RoPE); their 88M-parameter runs and a later 1.5B-parameter run disagree on the "
        "ordering of the configurations. A comparison here holds for this model size, data and measurement; see the "
        "sensitivity table before generalising."
    )
    if not ctx.surgeries:
        items.append(
            "No pruning surgery results: whether gamma tracks what the keys use is not tested causally here."
        )
    return [Heading(1, "Caveats"), Bullets(items)]
