"""How every number was made: the fixed batch, the software versions and the configurations of each run."""

from __future__ import annotations

import json

import pandas as pd

from spectra.report.context import ReportContext
from spectra.report.document import Block, Details, Heading, Table
from spectra.report.output import ReportWriter


def provenance_section(ctx: ReportContext, w: ReportWriter) -> list[Block]:
    runs_in, cubes, run_names, surgeries = ctx.runs_in, ctx.cubes, ctx.run_names, ctx.surgeries
    blocks: list[Block] = [Heading(1, "Provenance")]
    rows = []
    for r, cube, name in zip(runs_in, cubes, run_names):
        a = cube.attrs
        rows.append(
            {
                "run": name,
                "cube": str(r.cube),
                "eval_batch_sha256": str(a.get("eval_batch_sha256", "—")),
                "eval_batch_shape": str(a.get("eval_batch_shape", "—")),
                "drop_first": a.get("drop_first", "—"),
                "n_tokens": a.get("n_tokens", "—"),
                "surgery": str(r.surgery) if r.surgery else "—",
            }
        )
    blocks.append(
        Table(
            pd.DataFrame(rows),
            "Cubes: the fixed batch (its sha256), positions dropped, token vectors per SVD",
        )
    )
    for cube, name in zip(cubes, run_names):
        a = cube.attrs
        text = "\n".join(
            [
                f"history: {a.get('history', '—')}",
                f"versions: {_pretty_json(a.get('versions'))}",
                f"model_config: {_pretty_json(a.get('model_config'))}",
                f"run_config: {_pretty_json(a.get('run_config'))}",
            ]
        )
        if name in surgeries:
            s = surgeries[name].attrs
            text += "\n" + "\n".join(
                f"surgery.{k}: {s[k]}"
                for k in ("checkpoint", "step", "tokens", "test_tokens", "layers", "gamma_status", "history")
                if k in s
            )
        blocks.append(Details(f"Run {name}: versions and configuration", text))
    return blocks


def _pretty_json(value) -> str:
    if value is None:
        return "—"
    try:
        return json.dumps(json.loads(value), indent=2, sort_keys=True)
    except (TypeError, ValueError):
        return str(value)
