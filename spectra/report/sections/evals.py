"""Does rank predict reasoning? Downstream scores per configuration and seed, and PR against score."""

from __future__ import annotations

from spectra.errors import SpectraError
from spectra.evals import scores as evals_stats
from spectra.figures.evals import pr_vs_score
from spectra.report.context import ReportContext
from spectra.report.document import Block, Bullets, Heading, NotApplicable, Paragraph, Table
from spectra.report.output import ReportWriter

SCORE_COLUMNS = ["run", "label", "seed", "task", "metric", "value", "ci_low", "ci_high", "chance",
                 "chance_in_interval", "num_fewshot", "n_samples", "tokens"]  # fmt: skip


def evals_section(ctx: ReportContext, w: ReportWriter) -> list[Block]:
    blocks: list[Block] = [Heading(1, "Does rank predict reasoning?")]
    if not ctx.evals:
        return blocks + [
            NotApplicable(
                "Downstream evals",
                "no run has an evals.json (run `collapse-spectra eval RUN_OR_STUDY --tasks ...`, see the evals page)",
            )
        ]
    blocks.append(
        Paragraph(
            "The 300M plan's question (section 4.D): do runs with higher key rank score better downstream? Scores "
            "come from lm-evaluation-harness at each run's last evaluated checkpoint; accuracies carry a 95% Wilson "
            "interval over the task's documents. At this model size the scores are expected near chance: where an "
            "interval contains chance, the model is too small for the task to tell configurations apart, and a "
            "correlation of PR with such scores is a correlation with noise."
        )
    )
    try:
        scores = evals_stats.score_table(ctx.evals, ctx.ds, **ctx.labels_kw)
    except SpectraError as e:
        return blocks + [NotApplicable("Downstream evals", str(e))]
    blocks.append(
        Table(
            scores[[c for c in SCORE_COLUMNS if c in scores]],
            "Scores per run, task and metric",
            {"value": ".3f", "ci_low": ".3f", "ci_high": ".3f", "chance": ".3f"},
            csv=w.csv("eval_scores.csv", scores),
        )
    )
    tasks = list(dict.fromkeys(scores["task"]))
    blocks += _table_d(ctx, w, scores, tasks)
    blocks += _rank_vs_score(ctx, w, scores, tasks)
    return blocks


def _table_d(ctx: ReportContext, w: ReportWriter, scores, tasks) -> list[Block]:
    pair = (
        ctx.plan_label("A2"),
        ctx.plan_label("B1"),
    )  # the plan's hero (Muon, no QK-norm) vs AdamW + QK-norm
    try:
        table = evals_stats.table_d(scores, tasks, pair=pair)
    except SpectraError as e:
        return [NotApplicable("Table D", str(e))]
    return [
        Table(
            table,
            f"The plan's table D: score per configuration and seed, and the difference {pair[0]} − {pair[1]} of "
            "the seed means (Welch's p with two seeds or more on each side)",
            {c: ".3f" for c in table.columns if c not in ("config", "label", "seed", "run")},
            csv=w.csv("table_d.csv", table),
        )
    ]


def _rank_vs_score(ctx: ReportContext, w: ReportWriter, scores, tasks) -> list[Block]:
    summaries = ctx.headline  # PR with its null, per run
    blocks: list[Block] = []
    notes = []
    for task in tasks:
        points = evals_stats.rank_vs_score(summaries, scores, task)
        if points.empty:
            continue
        correlation = evals_stats.rank_score_correlation(points)
        w.figure(
            blocks,
            f"pr_vs_score_{task}",
            f"Headline PR against the {task} score, one point per run; bars: the PR's interval over heads and the "
            "score's 95% interval; dashed: chance.",
            f"PR against {task}",
            lambda points=points, correlation=correlation: pr_vs_score(points, correlation),
        )
        rho = correlation["rho"]
        notes.append(
            f"{task}: Spearman ρ = {rho:+.2f} over {correlation['n_runs']} runs ({correlation['n_configurations']} "
            f"configurations), p = {correlation['p']:.2g}. {correlation['note']}".strip()
            if rho == rho
            else f"{task}: no rank correlation ({correlation['note']})"
        )
    if notes:
        notes.append(
            "Whatever ρ is, the runs of one configuration share everything but the seed, so n runs are not n "
            'independent tests of "higher rank, better model"; configurations differ in more than their rank '
            "(optimizer, QK-norm, data), so a correlation across them is not an effect of rank."
        )
        blocks.append(Bullets(notes))
    return blocks
