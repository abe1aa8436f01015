"""The learning-rate sweep of each study among the inputs: the sweep table, the choice per configuration."""

from __future__ import annotations

from spectra.analysis.plan import best_lr_table
from spectra.figures.sweep import lr_sweep
from spectra.report.context import ReportContext
from spectra.report.document import Block, Heading, NotApplicable, Paragraph, Table
from spectra.report.output import ReportWriter, file_stem


def learning_rate_section(ctx: ReportContext, w: ReportWriter) -> list[Block]:
    if not ctx.studies:
        return []  # runs outside a study: their learning rates are in each run's config (provenance)
    blocks: list[Block] = [Heading(1, "Learning rates")]
    for study in ctx.studies:
        stem = file_stem(study.name, "study")
        configurations = study.configurations()
        table = study.sweep_table()
        blocks.append(Heading(2, f"Study {study.name}"))
        blocks.append(
            Paragraph(
                "Each configuration trains at the learning rate its own sweep chose: one short run per grid point "
                "(one seed), the lowest validation loss at the end of the run wins (ties to the lower rate); a "
                "diverged run is excluded. Under Muon the swept rate is `optim.muon_lr` and the AdamW rate of "
                "embeddings and gains moves with it unless the study says otherwise. One draw per point: a "
                "difference smaller than the seed-to-seed spread of the main runs is not a preference."
            )
        )
        best = best_lr_table(configurations)
        blocks.append(
            Table(
                best,
                "Best LR / Sweep val loss per configuration (the 300M plan's table A)",
                {"best muon_lr": ".4g", "best lr (AdamW)": ".4g", "multiplier": "g", "sweep val loss": ".4f"},
                csv=w.csv(f"best_lr_{stem}.csv", best),
            )
        )
        if table.empty:
            blocks.append(NotApplicable("Learning-rate figure", f"study {study.name} has no sweep"))
            continue
        w.figure(
            blocks,
            f"lr_sweep_{stem}",
            "Validation loss at the end of each sweep run against its learning rate; stars: the chosen runs; "
            "x: diverged.",
            "Learning-rate figure",
            lambda table=table, configurations=configurations, name=study.name: lr_sweep(
                table, configurations, name
            ),
        )
        blocks.append(
            Table(
                table,
                "Every sweep run",
                {"multiplier": "g", "muon_lr": ".4g", "lr": ".4g", "final_val_loss": ".4f"},
                csv=w.csv(f"sweep_{stem}.csv", table),
            )
        )
    return blocks
