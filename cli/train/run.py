"""``collapse-train run`` and ``collapse-train presets``: thin skins over :func:`trainer.train.train`
and the preset list."""

from __future__ import annotations

import json
import os
from pathlib import Path

import click
import torch

from cli.common import device_option, reports_errors
from trainer.config import load_config, preset_description, preset_names
from trainer.model import LLM
from trainer.train import train


def run_overrides(
    out_dir: Path,
    overrides: tuple[str, ...],
    tokens: int | None,
    seed: int | None,
    device: str | None = None,
) -> list[str]:
    """The ``key=value`` overrides of one ``run`` invocation, lowest priority first.

    The run name defaults to the run directory's name (``--set name=...`` wins); ``--tokens``,
    ``--seed`` and ``--device`` are spelled-out overrides of ``train.tokens``, ``train.seed`` and
    ``train.device`` and win over ``--set``.

    >>> run_overrides(Path("runs/a1"), ("optim.lr=1e-3",), 20000, None)
    ['name="a1"', 'optim.lr=1e-3', 'train.tokens=20000']
    """
    # json.dumps gives a quoted string that TOML also reads, whatever characters the name has
    out = [f"name={json.dumps(out_dir.resolve().name)}", *overrides]
    if tokens is not None:
        out.append(f"train.tokens={tokens}")
    if seed is not None:
        out.append(f"train.seed={seed}")
    if device is not None:
        out.append(f"train.device={json.dumps(device)}")
    return out


@click.command("run")
@click.argument("preset_or_toml")
@click.option(
    "--data",
    "data_dir",
    required=True,
    type=click.Path(path_type=Path),
    help="Dataset directory (prepare-data).",
)
@click.option(
    "-o", "--out", "out_dir", required=True, type=click.Path(path_type=Path), help="Run directory to create."
)
@click.option("--tokens", type=int, default=None, help="Training tokens (overrides train.tokens).")
@click.option("--seed", type=int, default=None, help="Seed for init and data order (overrides train.seed).")
@click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override a config field, e.g. --set optim.lr=3e-3 (repeatable; types are checked).",
)
@device_option(default=None, help="Where to train (overrides train.device). [default: the config's, auto]")
@click.option(
    "--resume",
    is_flag=True,
    help="Continue the run in --out: from its newest resume state, from step 0 if it was killed before "
    "its first one; nothing to do if it completed.",
)
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
@reports_errors
def run(
    preset_or_toml: str,
    data_dir: Path,
    out_dir: Path,
    tokens: int | None,
    seed: int | None,
    overrides: tuple[str, ...],
    device: str | None,
    resume: bool,
    no_progress: bool,
) -> None:
    """Train PRESET_OR_TOML (a preset name or a TOML file) on --data, writing checkpoints to --out.

    Under torchrun the same command trains with DDP, one process per device. Ctrl-C (or SIGTERM) stops
    after the step in progress with a resume state written; `--resume` continues from there.
    """
    cfg = load_config(preset_or_toml, run_overrides(out_dir, overrides, tokens, seed, device))
    main = os.environ.get("RANK", "0") == "0"  # under torchrun, one report for the job
    result = train(
        cfg, data_dir, out_dir, resume=resume, progress=not no_progress, echo=click.echo if main else None
    )
    if main and result.status == "completed":
        click.echo(f"trained {cfg.name}: {result.path}")


def count_parameters(preset: str) -> int:
    """Parameters of a preset's model, counted on the meta device (no memory, no init cost)."""
    with torch.device("meta"):
        return LLM(load_config(preset).model).num_params()


def _human(n: int) -> str:
    return f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}k"


@click.command("presets")
@reports_errors
def presets() -> None:
    """List the shipped presets: name, parameter count, description."""
    names = preset_names()
    width = max(map(len, names), default=0)
    for name in names:
        click.echo(f"{name:<{width}}  {_human(count_parameters(name)):>7}  {preset_description(name)}")
