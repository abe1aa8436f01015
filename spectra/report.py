"""The study's report: every figure, table and comparison over a set of runs, as HTML and Markdown.

:func:`build_report` is the library call behind ``collapse-spectra report RUN_OR_CUBE... -o DIR``;
:func:`render_plot` is the one behind ``collapse-spectra plot KIND CUBE... -o FILE``. Both resolve their
inputs (a run directory means its ``spectra.nc`` and, if present, its ``surgery.nc``; a cube file means
itself), open the cubes with :func:`spectra.cube_io.open_cubes`, and call the pure functions of
:mod:`spectra.stats`, :mod:`spectra.gamma` and :mod:`spectra.plots`.

What the report directory holds (all written atomically, each file under a temporary name then renamed):

- ``report.html``: self-contained (figures embedded as base64 PNG, CSS inline, no external reference);
- ``report.md``: the same content, referencing the figures in ``figures/``;
- ``figures/*.png`` and ``figures/*.svg``;
- ``tables/*.csv``: every table in full (the report shows some of them abbreviated);
- ``report-files.json``: the list of files the report wrote, so that a later report into the same
  directory removes its own stale figures and tables and touches nothing else.

No torch here: the report reads cubes and surgery results, never checkpoints.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import json
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from importlib import metadata as _metadata
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

from spectra import gamma as gamma_analysis
from spectra import plots, stats
from spectra.cube_io import CUBE_FILENAME, open_cube, open_cubes
from spectra.errors import SpectraError
from spectra.fileio import atomic_write

SURGERY_FILENAME = "surgery.nc"
SURGERY_FORMAT = "collapse-surgery"
MANIFEST = "report-files.json"
REPORT_HTML = "report.html"
REPORT_MD = "report.md"

PathLike = str | os.PathLike[str]


# --------------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunInput:
    """One run of the report: its cube and, when there is one, its surgery results."""

    cube: Path
    surgery: Path | None = None


def resolve_inputs(inputs: Iterable[PathLike]) -> list[RunInput]:
    """Turn the command line's RUN_OR_CUBE arguments into cubes and surgery files.

    - a run directory (holding ``spectra.nc``): its cube, and its ``surgery.nc`` if present;
    - a directory of run directories: each of them, sorted by name;
    - a ``.nc`` cube file: itself, and a ``surgery.nc`` beside it if that file's ``run_name`` is the cube's
      (a directory of cubes may hold other runs' results).

    Raises :class:`SpectraError` for a path that is none of these, naming it.
    """
    runs: list[RunInput] = []
    for raw in inputs:
        p = Path(raw)
        if p.is_dir():
            if (p / CUBE_FILENAME).is_file():
                runs.append(_run_dir_input(p))
                continue
            children = sorted(c for c in p.iterdir() if (c / CUBE_FILENAME).is_file())
            if not children:
                raise SpectraError(
                    f"{p}: neither a run directory (no {CUBE_FILENAME}) nor a directory of run directories "
                    f"(run `collapse-spectra extract RUN` first)"
                )
            runs.extend(_run_dir_input(c) for c in children)
        elif p.is_file():
            runs.append(_cube_file_input(p))
        else:
            raise SpectraError(f"{p}: no such run directory or cube file")
    if not runs:
        raise SpectraError("no runs given")
    seen: dict[Path, Path] = {}
    for r in runs:
        key = r.cube.resolve()
        if key in seen:
            raise SpectraError(f"the same cube is given more than once: {r.cube}")
        seen[key] = r.cube
    return runs


def _run_dir_input(run_dir: Path) -> RunInput:
    surgery = run_dir / SURGERY_FILENAME
    return RunInput(run_dir / CUBE_FILENAME, surgery if surgery.is_file() else None)


def _cube_file_input(cube: Path) -> RunInput:
    sibling = cube.parent / SURGERY_FILENAME
    if cube.name == SURGERY_FILENAME:
        raise SpectraError(
            f"{cube}: a surgery file, not a cube; give the run directory or its {CUBE_FILENAME}"
        )
    if not sibling.is_file():
        return RunInput(cube)
    run_name = open_cube(cube).attrs.get("run_name")
    return RunInput(cube, sibling if load_surgery(sibling).attrs.get("run_name") == run_name else None)


def load_surgery(path: PathLike) -> xr.Dataset:
    """Read a ``surgery.nc`` (written by ``collapse-spectra surgery``) into memory and check its schema.

    A run directory means its ``surgery.nc``. Raises :class:`SpectraError` naming the file if it is
    missing, unreadable, or lacks ``loss(strategy, fraction, seed)`` and ``baseline_loss``.
    """
    p = Path(path)
    if p.is_dir():
        p = p / SURGERY_FILENAME
    if not p.is_file():
        raise SpectraError(f"{p}: no such surgery file (run `collapse-spectra surgery CHECKPOINT` first)")
    try:
        ds = xr.load_dataset(p, engine="netcdf4")
    except (OSError, ValueError) as e:
        raise SpectraError(f"{p}: not a readable NetCDF file ({e})") from e
    fmt = ds.attrs.get("format", SURGERY_FORMAT)
    if fmt != SURGERY_FORMAT:
        raise SpectraError(
            f"{p}: not a surgery file (global attribute format = {fmt!r}, expected {SURGERY_FORMAT!r})"
        )
    if (
        "loss" not in ds
        or set(ds["loss"].dims) != {"strategy", "fraction", "seed"}
        or "baseline_loss" not in ds
    ):
        raise SpectraError(f"{p}: a surgery file needs loss(strategy, fraction, seed) and baseline_loss")
    ds.attrs.setdefault("run_name", p.parent.name)
    ds.attrs["path"] = str(p)
    return ds


# --------------------------------------------------------------------------------------------------
# One figure on its own (collapse-spectra plot)
# --------------------------------------------------------------------------------------------------

_MEASUREMENT = ("site", "convention", "centering", "which")
_LABELS = ("simple_data", "complex_data")
KIND_OPTIONS = {
    "trajectory": (*_MEASUREMENT, *_LABELS),
    "heatmap": (*_MEASUREMENT, "run", *_LABELS),
    "waterfall": ("site", "centering", "which", "layer", *_LABELS),
    "data-complexity": (*_MEASUREMENT, *_LABELS),
    "surgery": (),
    "gamma": ("site", "which", "run", *_LABELS),
    "loss": _LABELS,
    "pr-vs-loss": (*_MEASUREMENT, *_LABELS),
}
"""Options each figure kind accepts; ``site`` of ``gamma`` is where the coordinate energy is read."""


def render_plot(kind: str, inputs: Sequence[PathLike], output: PathLike, **options) -> list[Path]:
    """Draw one figure of kind ``kind`` from ``inputs`` and write it as PNG and SVG; returns both paths.

    Parameters
    ----------
    kind
        One of :data:`spectra.plots.FIGURE_KINDS`.
    inputs
        Cube files or run directories; for ``surgery``, surgery files or run directories.
    output
        ``FILE.png``, ``FILE.svg`` or ``FILE``: both ``FILE.png`` and ``FILE.svg`` are written.
    **options
        Options of the figure function (``site``, ``convention``, ``centering``, ``which``, ``layer``,
        ``run``, ``simple_data``, ``complex_data``); ``None`` means the default. An option the kind does
        not use is an error, so that nothing given is silently ignored.

    Examples
    --------
    >>> render_plot("trajectory", ["runs/A1-s0", "runs/A2-s0"], "trajectory.png", site="rope")  # doctest: +SKIP
    [PosixPath('trajectory.png'), PosixPath('trajectory.svg')]
    """
    if kind not in plots.PLOTTERS:
        raise SpectraError(f"unknown figure kind {kind!r}; kinds: {', '.join(plots.FIGURE_KINDS)}")
    given = {k: v for k, v in options.items() if v is not None and v != ()}
    unused = sorted(set(given) - set(KIND_OPTIONS[kind]))
    if unused:
        names = ", ".join("--" + u.replace("_", "-") for u in unused)
        raise SpectraError(f"{names} does not apply to the {kind} figure")
    if not inputs:
        raise SpectraError("no inputs given")
    if kind == "surgery":
        fig = plots.surgery_curves([load_surgery(p) for p in inputs])
    else:
        ds = open_cubes(list(inputs))
        fig = plots.PLOTTERS[kind](ds, **given)
    return plots.save_figure(fig, output)


# --------------------------------------------------------------------------------------------------
# Document model: blocks rendered to Markdown and to HTML
# --------------------------------------------------------------------------------------------------


@dataclass
class Heading:
    level: int
    text: str


@dataclass
class Paragraph:
    text: str


@dataclass
class Bullets:
    items: list[str]


@dataclass
class Table:
    frame: pd.DataFrame
    caption: str = ""
    formats: dict[str, str] = field(default_factory=dict)
    csv: str | None = None  # file under tables/ holding the full table


@dataclass
class FigureBlock:
    stem: str  # figures/<stem>.png and .svg
    caption: str


@dataclass
class NotApplicable:
    what: str
    reason: str


@dataclass
class Details:
    summary: str
    text: str


Block = Heading | Paragraph | Bullets | Table | FigureBlock | NotApplicable | Details


def _format_value(value, spec: str | None) -> str:
    if value is None:
        return "—"
    if isinstance(value, (float, np.floating)):
        if np.isnan(value):
            return "—"
        return format(float(value), spec or ".3g")
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)) and spec:
        return format(int(value), spec)
    return str(value)


def _cells(table: Table) -> tuple[list[str], list[list[str]]]:
    header = [str(c) for c in table.frame.columns]
    rows = [
        [_format_value(v, table.formats.get(str(c))) for c, v in zip(table.frame.columns, row)]
        for row in table.frame.itertuples(index=False, name=None)
    ]
    return header, rows


def _sentence(text: str) -> str:
    """A message as a sentence: capital first letter, final full stop."""
    text = text.strip()
    if not text:
        return text
    text = text[0].upper() + text[1:]
    return text if text.endswith((".", "!", "?")) else text + "."


def _md_escape_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def to_markdown(title: str, blocks: Sequence[Block]) -> str:
    """Render the report's blocks as Markdown; figures are referenced as ``figures/<stem>.png``."""
    out = [f"# {title}", ""]
    for b in blocks:
        if isinstance(b, Heading):
            out += ["#" * (b.level + 1) + " " + b.text, ""]
        elif isinstance(b, Paragraph):
            out += [b.text, ""]
        elif isinstance(b, Bullets):
            out += [f"- {item}" for item in b.items] + [""]
        elif isinstance(b, Table):
            header, rows = _cells(b)
            if b.caption:
                out += [f"*{b.caption}*", ""]
            out.append("| " + " | ".join(_md_escape_cell(h) for h in header) + " |")
            out.append("|" + "|".join(" --- " for _ in header) + "|")
            out += ["| " + " | ".join(_md_escape_cell(c) for c in row) + " |" for row in rows]
            if b.csv:
                out += ["", f"CSV: [tables/{b.csv}](tables/{b.csv})"]
            out.append("")
        elif isinstance(b, FigureBlock):
            out += [
                f"![{b.caption}](figures/{b.stem}.png)",
                "",
                f"*{b.caption}* ([SVG](figures/{b.stem}.svg))",
                "",
            ]
        elif isinstance(b, NotApplicable):
            out += [f"> **{b.what}: not applicable.** {_sentence(b.reason)}", ""]
        elif isinstance(b, Details):
            out += [
                f"<details><summary>{html.escape(b.summary)}</summary>",
                "",
                "```",
                b.text,
                "```",
                "",
                "</details>",
                "",
            ]
    return "\n".join(out).rstrip() + "\n"


_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; max-width: 72rem; margin: 2rem auto;
       padding: 0 1rem; color: #222; line-height: 1.45; }
h1 { border-bottom: 2px solid #444; padding-bottom: .3rem; }
h2 { border-bottom: 1px solid #bbb; padding-bottom: .2rem; margin-top: 2.2rem; }
table { border-collapse: collapse; margin: .2rem 0 .4rem; font-size: .85rem; }
th, td { border: 1px solid #ccc; padding: .25rem .5rem; text-align: left; vertical-align: top; }
th { background: #f0f0f0; }
tr:nth-child(even) td { background: #fafafa; }
p.caption { font-style: italic; margin: 1rem 0 .2rem; }
figure { margin: 1rem 0 2rem; }
figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { font-style: italic; font-size: .9rem; }
.na { border-left: 4px solid #c90; background: #fff8e6; padding: .5rem .8rem; margin: 1rem 0; }
code, pre { font-family: ui-monospace, monospace; font-size: .85rem; }
pre { background: #f6f6f6; padding: .6rem; overflow-x: auto; }
nav ul { columns: 2; }
"""


def _inline_html(text: str) -> str:
    """Escape text, then render `code` spans and **bold** (the only inline markup the report uses)."""
    escaped = html.escape(text)
    escaped = re.sub(r"`([^`]+)`", r"<code>\1</code>", escaped)
    return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", escaped)


def _anchor(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def to_html(title: str, blocks: Sequence[Block], images: dict[str, bytes]) -> str:
    """Render the report's blocks as one self-contained HTML page (PNG figures embedded as data URIs)."""
    toc = [b for b in blocks if isinstance(b, Heading) and b.level == 1]
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{html.escape(title)}</title>",
        f"<style>{_CSS}</style>",
        "</head><body>",
        f"<h1>{html.escape(title)}</h1>",
        "<nav><ul>"
        + "".join(f'<li><a href="#{_anchor(h.text)}">{html.escape(h.text)}</a></li>' for h in toc)
        + "</ul></nav>",
    ]
    for b in blocks:
        if isinstance(b, Heading):
            level = min(b.level + 1, 6)
            parts.append(f'<h{level} id="{_anchor(b.text)}">{_inline_html(b.text)}</h{level}>')
        elif isinstance(b, Paragraph):
            parts.append(f"<p>{_inline_html(b.text)}</p>")
        elif isinstance(b, Bullets):
            parts.append("<ul>" + "".join(f"<li>{_inline_html(i)}</li>" for i in b.items) + "</ul>")
        elif isinstance(b, Table):
            header, rows = _cells(b)
            caption = f'<p class="caption">{_inline_html(b.caption)}</p>' if b.caption else ""
            head = "<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>"
            body = "".join(
                "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows
            )
            parts.append(f"{caption}<table><thead>{head}</thead><tbody>{body}</tbody></table>")
            if b.csv:
                parts.append(
                    f"<p><small>CSV: <code>tables/{html.escape(b.csv)}</code> beside this report.</small></p>"
                )
        elif isinstance(b, FigureBlock):
            data = base64.b64encode(images[b.stem]).decode("ascii")
            parts.append(
                f'<figure><img alt="{html.escape(b.caption)}" src="data:image/png;base64,{data}">'
                f"<figcaption>{_inline_html(b.caption)}</figcaption></figure>"
            )
        elif isinstance(b, NotApplicable):
            parts.append(
                f'<div class="na"><strong>{html.escape(b.what)}: not applicable.</strong> {_inline_html(_sentence(b.reason))}</div>'
            )
        elif isinstance(b, Details):
            parts.append(
                f"<details><summary>{html.escape(b.summary)}</summary><pre>{html.escape(b.text)}</pre></details>"
            )
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


# --------------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------------


@dataclass
class _Writer:
    """Writes the report's files atomically and remembers them (for the manifest and the HTML)."""

    out_dir: Path
    written: list[str] = field(default_factory=list)
    images: dict[str, bytes] = field(default_factory=dict)

    def figure(self, blocks: list[Block], stem: str, caption: str, what: str, draw) -> None:
        """Draw with ``draw()`` and add the figure, or add why it is not applicable (a SpectraError's message)."""
        try:
            fig = draw()
        except SpectraError as e:
            blocks.append(NotApplicable(what, str(e)))
            return
        paths = plots.save_figure(fig, self.out_dir / "figures" / f"{stem}.png")
        self.written += [str(p.relative_to(self.out_dir)) for p in paths]
        self.images[stem] = paths[0].read_bytes()
        blocks.append(FigureBlock(stem, caption))

    def csv(self, name: str, frame: pd.DataFrame) -> str:
        path = self.out_dir / "tables" / name
        atomic_write(path, lambda tmp: frame.to_csv(tmp, index=False))
        self.written.append(str(path.relative_to(self.out_dir)))
        return name

    def text(self, name: str, content: str) -> Path:
        path = atomic_write(self.out_dir / name, lambda tmp: tmp.write_text(content, encoding="utf-8"))
        self.written.append(name)
        return path


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "run"


def _version() -> str:
    try:
        return _metadata.version("collapse")
    except _metadata.PackageNotFoundError:
        return "unknown"


def build_report(
    inputs: Sequence[PathLike],
    out_dir: PathLike,
    *,
    site: str = stats.DEFAULT_SITE,
    convention: str = "sv",
    centering: str = "uncentered",
    gamma_site: str = gamma_analysis.DEFAULT_GAMMA_SITE,
    simple_data: Iterable[str] = (),
    complex_data: Iterable[str] = (),
    n_resamples: int = stats.N_RESAMPLES,
    seed: int = stats.BOOTSTRAP_SEED,
) -> Path:
    """Write the report over ``inputs`` into ``out_dir``; returns the path of ``report.html``.

    Parameters
    ----------
    inputs
        Run directories, directories of run directories, or cube files (see :func:`resolve_inputs`).
    out_dir
        Created if missing. If it exists, only the report's own files are replaced: ``report.html``,
        ``report.md``, ``report-files.json``, and the files under ``figures/`` and ``tables/`` that this or a
        previous report listed in ``report-files.json``; anything else in it is left alone.
    site, convention, centering
        The headline measurement: read-out site of the keys, participation-ratio convention and centring.
        The sensitivity table varies all three regardless.
    gamma_site
        Where the gamma analysis reads the coordinate energy: ``unit`` (before gamma) or ``normed``.
    simple_data, complex_data
        Dataset names forced into the simple / complex class (see :func:`spectra.stats.data_class`).
    n_resamples, seed
        Bootstrap resamples and the seed of their generator.

    Examples
    --------
    >>> build_report(["runs/A1-s0", "runs/A2-s0"], "report")  # doctest: +SKIP
    PosixPath('report/report.html')
    """
    stats._check_choice("site", site, stats.SITES)
    stats._check_choice("convention", convention, stats.CONVENTIONS)
    stats._check_choice("centering", centering, stats.CENTERINGS)
    if gamma_site not in gamma_analysis.GAMMA_SITES:
        raise SpectraError(
            f"gamma site must be one of {list(gamma_analysis.GAMMA_SITES)}, got {gamma_site!r}"
        )
    simple_data, complex_data = list(simple_data), list(complex_data)
    labels_kw = {"simple_data": simple_data, "complex_data": complex_data}
    measure = {"site": site, "convention": convention, "centering": centering}

    runs_in = resolve_inputs(inputs)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise SpectraError(f"{out}: exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    previous = _read_manifest(out)

    cubes = [open_cube(r.cube) for r in runs_in]
    ds = open_cubes([r.cube for r in runs_in])
    run_names = [str(r) for r in ds["run"].values]
    surgeries = {
        name: load_surgery(r.surgery) for name, r in zip(run_names, runs_in) if r.surgery is not None
    }

    w = _Writer(out)
    blocks: list[Block] = []
    runs = stats.run_table(ds, **labels_kw)
    coverage = stats.plan_coverage(runs)
    summaries = stats.run_summaries(ds, **measure, **labels_kw, n_resamples=n_resamples, seed=seed)
    configs = stats.configuration_summaries(summaries, n_resamples=n_resamples, seed=seed)
    comparisons = stats.compare_configurations(summaries, n_resamples=n_resamples, seed=seed)
    sensitivity = stats.sensitivity_table(ds, **labels_kw)
    checkpoints = stats.checkpoint_table(ds, site=site, centering=centering, **labels_kw)
    measurement = (
        f"keys at site `{site}`, {centering.replace('centered', 'centred')}, participation ratio in the "
        f"{stats.CONVENTION_NAMES[convention]}"
    )

    # ---- overview
    now = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    blocks += [
        Paragraph(
            f"Generated {now} by collapse {_version()} over {len(run_names)} run(s). Headline measurement: "
            f"{measurement}, the mean over layers and key/value heads at each run's final checkpoint."
        ),
        Paragraph(
            "The participation ratio (PR) counts how many directions the keys of a head spread over: "
            "from 1 (all on one direction) to head_dim (spread evenly). Singular-value convention: "
            "(Σσ)²/Σσ², the source documents' formula; eigenvalue convention: (Σσ²)²/Σσ⁴, the usual one "
            "in the literature, always lower. Each number below says which it is."
        ),
    ]
    # a surgery.nc in a run directory that belongs to another run: shown, but flagged
    foreign = {
        name: str(surgeries[name].attrs.get("run_name"))
        for name, cube in zip(run_names, cubes)
        if name in surgeries and surgeries[name].attrs.get("run_name") != cube.attrs.get("run_name")
    }
    blocks += _caveats(cubes, ds, runs, configs, coverage, surgeries, foreign, site)

    # ---- runs and the plan
    blocks.append(Heading(1, "Runs and the plan's matrix"))
    blocks.append(
        Paragraph(
            "The plan (seed 002) crosses QK-norm (learned / none), optimizer (Muon+AdamW / AdamW) and data "
            "(standard / simple / complex) in six configurations, A1 … C2. Data classes come from the dataset "
            "names (`bbe`/`simple` → simple, `kjv`/`complex` → complex, else standard) unless named with "
            "--simple-data / --complex-data. A configuration outside the matrix (e.g. a frozen gamma) is "
            "listed as extra."
        )
    )
    blocks.append(
        Table(
            coverage,
            "Configurations of the plan: present, missing, extra",
            csv=w.csv("plan_matrix.csv", coverage),
        )
    )
    run_cols = [
        "run",
        "label",
        "qk_norm",
        "optimizer",
        "seed",
        "data",
        "data_class",
        "n_checkpoints",
        "final_step",
        "final_tokens",
    ]
    blocks.append(Table(runs[run_cols], "Runs", csv=w.csv("runs.csv", runs)))

    # ---- headline and comparisons
    blocks.append(Heading(1, "Headline: mean key PR at the final checkpoint"))
    blocks.append(
        Paragraph(
            f"Per run: the mean of the PR of every (layer, key/value head) at the run's last checkpoint "
            f"({measurement}), with a {stats.CONFIDENCE:.0%} percentile-bootstrap interval over heads "
            f"({n_resamples} resamples, seed {seed}). That interval describes the spread between heads of one "
            "model, not how much the number would change with another training seed."
        )
    )
    fmt2 = {"mean": ".2f", "ci_low": ".2f", "ci_high": ".2f", "sd": ".2f"}
    blocks.append(
        Table(
            summaries[["run", "label", "seed", "step", "tokens", "n_heads", "mean", "ci_low", "ci_high"]],
            "Per run: mean PR and its bootstrap CI over heads",
            fmt2,
            csv=w.csv("run_summaries.csv", summaries),
        )
    )
    blocks.append(
        Table(
            configs,
            "Per configuration: mean over seeds, bootstrap CI over seeds",
            fmt2,
            csv=w.csv("configurations.csv", configs),
        )
    )
    blocks.append(Heading(1, "Comparisons between configurations"))
    blocks.append(
        Paragraph(
            "The plan's comparisons (section 4: A1 vs A2, A1 vs B1, C1 vs C2) and the double control B1 vs B2, "
            "each as the first configuration minus the second, on the "
            "per-seed headline values. With at least two seeds on each side: Welch's t-test "
            "(scipy.stats.ttest_ind, equal_var=False) and a bootstrap CI of the difference over seeds; with "
            "at least three, also the two-sided Mann-Whitney U test. The seed is the unit of replication."
        )
    )
    comp_cols = [
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
    blocks.append(
        Table(
            comparisons[comp_cols],
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
            csv=w.csv("comparisons.csv", comparisons),
        )
    )

    # ---- sensitivity
    blocks.append(Heading(1, "Sensitivity to the measurement"))
    blocks.append(
        Paragraph(
            "The same comparison recomputed for every read-out site (proj: raw projection; unit: after the "
            "RMS normalisation, before gamma; normed: after QK-norm with gamma; rope: after the rotary "
            "embedding), PR convention and centring. The source documents' numbers come from one of these "
            "16 variants; if the sign of a difference changes between rows, the conclusion depends on the "
            "measurement choice and should not be stated without it. — means undefined (the unit site of "
            "a run without QK-norm)."
        )
    )
    value_cols = [c for c in sensitivity.columns if c not in ("site", "convention", "centering")]
    blocks.append(
        Table(
            sensitivity,
            "Headline differences (or configuration means when no planned pair is present) per measurement variant",
            {c: "+.2f" if " vs " in c else ".2f" for c in value_cols},
            csv=w.csv("sensitivity.csv", sensitivity),
        )
    )
    blocks.append(Bullets(_sign_summary(sensitivity, value_cols)))

    # ---- trajectories
    blocks.append(Heading(1, "Trajectories"))
    w.figure(
        blocks,
        "trajectory",
        f"Mean key PR against training tokens, one line per configuration, band = range over seeds ({measurement}).",
        "PR trajectory",
        lambda: plots.trajectory(ds, **measure, **labels_kw),
    )
    cp = checkpoints.rename(columns={"pr_sv": "PR (sv convention)", "pr_eig": "PR (eig convention)"})
    blocks.append(
        Table(
            cp,
            f"Mean key PR over layers and heads at every checkpoint, both conventions (site `{site}`, {centering})",
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
    for i, name in enumerate(run_names):
        stem = f"heatmap_{_slug(name)}"
        if any(_slug(other) == _slug(name) for other in run_names[:i]):
            stem += f"_{i}"  # run names that differ only in characters a file name cannot hold
        w.figure(
            blocks,
            stem,
            f"Run {name}: key PR per layer (rows) at each checkpoint (columns), mean over heads.",
            f"Heatmap of run {name}",
            lambda name=name: plots.heatmap(ds, run=name, **measure, **labels_kw),
        )

    # ---- spectra, data complexity, loss
    blocks.append(Heading(1, "Spectral shape at the final checkpoint"))
    w.figure(
        blocks,
        "waterfall",
        "σ_i/σ_1 against i, each head normalised by its largest singular value, mean over heads and layers.",
        "Singular-value waterfall",
        lambda: plots.waterfall(ds, site=site, centering=centering, **labels_kw),
    )
    blocks.append(Heading(1, "Data complexity (C1 vs C2)"))
    w.figure(
        blocks,
        "data_complexity",
        "Per-layer key PR at the final checkpoint for simple (C1) and complex (C2) data.",
        "Data-complexity figure",
        lambda: plots.data_complexity(ds, **measure, **labels_kw),
    )
    blocks.append(Heading(1, "Loss"))
    w.figure(
        blocks,
        "loss",
        "Training and validation loss against tokens.",
        "Loss curves",
        lambda: plots.loss_curves(ds, **labels_kw),
    )
    w.figure(
        blocks,
        "pr_vs_loss",
        "Mean key PR against validation loss, one line per run through its checkpoints.",
        "PR against validation loss",
        lambda: plots.pr_vs_loss(ds, **measure, **labels_kw),
    )

    # ---- gamma
    blocks += _gamma_section(ds, w, gamma_site, labels_kw)

    # ---- surgery
    blocks += _surgery_section(run_names, surgeries, w)

    # ---- provenance
    blocks += _provenance(runs_in, cubes, run_names, surgeries)

    title = "Key-collapse report"
    w.text(REPORT_MD, to_markdown(title, blocks))
    html_path = w.text(REPORT_HTML, to_html(title, blocks, w.images))
    _write_manifest(out, w.written, previous)
    return html_path


def _sign_summary(sensitivity: pd.DataFrame, columns: Sequence[str]) -> list[str]:
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


def _gamma_section(ds: xr.Dataset, w: _Writer, gamma_site: str, labels_kw: dict) -> list[Block]:
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
    runs = stats.run_table(ds, **labels_kw).set_index("run")
    rows = []
    for run, frame in per_layer.groupby("run", sort=False):
        heads = per_head[(per_head["run"] == run) & (per_head["step"] == frame["step"].iloc[0])]
        ok = heads[heads["status"] == gamma_analysis.STATUS_OK]
        rows.append(
            {
                "run": run,
                "label": runs.loc[run, "label"],
                "qk_norm": runs.loc[run, "qk_norm"],
                "tokens": stats.token_count(frame["tokens"].iloc[0]),
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
        lambda: plots.gamma_scatter(ds, which="k", site=gamma_site, **labels_kw),
    )
    return blocks


def _surgery_section(run_names: Sequence[str], surgeries: dict[str, xr.Dataset], w: _Writer) -> list[Block]:
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
            "source documents' method), by smallest singular directions of the keys, or at random (mean and "
            "95% Student-t interval over seeds). If gamma ≈ SVD and both beat random, gamma is a usable proxy "
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
        lambda: plots.surgery_curves(items),
    )
    rows = []
    for run in run_names:
        if run not in surgeries:
            continue
        s = surgeries[run]
        for strategy in s["strategy"].values:
            curve = plots.surgery_curve(s, str(strategy))
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


def _provenance(
    runs_in: Sequence[RunInput], cubes: Sequence[xr.Dataset], run_names: Sequence[str], surgeries: dict
) -> list[Block]:
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


def _caveats(
    cubes: Sequence[xr.Dataset],
    ds: xr.Dataset,
    runs: pd.DataFrame,
    configs: pd.DataFrame,
    coverage: pd.DataFrame,
    surgeries: dict,
    foreign_surgeries: dict[str, str],
    site: str,
) -> list[Block]:
    items = []
    if foreign_surgeries:
        items.append(
            "**Surgery results of another run**: "
            + ", ".join(f"{n} holds the surgery of {r}" for n, r in foreign_surgeries.items())
            + "; check that the right surgery.nc is in each run directory."
        )
    single = configs[configs["n_seeds"] < 2]["label"].tolist()
    if single:
        items.append(
            f"One seed only for {', '.join(single)}. With n=1 seed per configuration no test across seeds is "
            "possible; the head-level CI describes within-model spread, not run-to-run variability, and a "
            "difference between two single-seed configurations can be seed-to-seed noise."
        )
    for key, what in (
        ("eval_batch_sha256", "fixed batches"),
        ("drop_first", "numbers of dropped positions"),
        ("n_tokens", "numbers of token vectors per SVD"),
    ):
        values = {str(c.attrs.get(key)) for c in cubes}
        if len(values) > 1:
            items.append(
                f"**The cubes use different {what}** ({key}: {', '.join(sorted(values))}): differences between runs mix model and measurement."
            )
    n_tokens = [int(c.attrs["n_tokens"]) for c in cubes if str(c.attrs.get("n_tokens", "")).isdigit()]
    head_dim = ds.sizes["sv"]
    if n_tokens and min(n_tokens) < 10 * head_dim:
        items.append(
            f"The spectra come from {min(n_tokens)} token vectors per head for head_dim {head_dim}: with fewer than "
            "about ten vectors per dimension the sample spectrum is noisy and its PR is biased; compare runs measured on "
            "the same batch only."
        )
    missing = coverage[coverage["status"] == "missing"]["label"].tolist()
    if missing:
        items.append(
            f"Configurations of the plan without runs: {', '.join(missing)}; comparisons involving them are not made."
        )
    if site == "unit" and (runs["qk_norm"] == "none").any():
        items.append(
            "The headline site `unit` does not exist for runs without QK-norm: their headline values are undefined."
        )
    items.append(
        "The source documents report PR in the singular-value convention on uncentred keys read after the norm "
        "(an earlier version after RoPE); their 88M-parameter runs and a later 1.5B-parameter run disagree on the "
        "ordering of the configurations. A comparison here holds for this model size, data and measurement; see the "
        "sensitivity table before generalising."
    )
    if not surgeries:
        items.append(
            "No pruning surgery results: whether gamma tracks what the keys use is not tested causally here."
        )
    return [Heading(1, "Caveats"), Bullets(items)]


# --------------------------------------------------------------------------------------------------
# Manifest: which files in out_dir belong to the report
# --------------------------------------------------------------------------------------------------


def _read_manifest(out: Path) -> list[str]:
    path = out / MANIFEST
    if not path.is_file():
        return []
    try:
        files = json.loads(path.read_text(encoding="utf-8"))["files"]
    except (ValueError, KeyError, TypeError) as e:
        raise SpectraError(
            f"{path}: not a report manifest ({e}); remove it or choose another output directory"
        ) from e
    return [f for f in files if isinstance(f, str)]


def _write_manifest(out: Path, written: Sequence[str], previous: Sequence[str]) -> None:
    current = set(written) | {MANIFEST}
    atomic_write(
        out / MANIFEST, lambda tmp: tmp.write_text(json.dumps({"files": sorted(current)}, indent=1) + "\n")
    )
    root = out.resolve()
    for rel in previous:
        if rel in current:
            continue
        stale = (out / rel).resolve()
        # only the report's own sub-folders, and never outside out_dir, whatever the manifest says
        if stale.parent.parent == root and stale.parent.name in ("figures", "tables"):
            stale.unlink(missing_ok=True)
