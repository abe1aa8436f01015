"""``collapse-spectra surgery``: prune key dimensions by gamma, SVD or at random and measure the test loss."""

from __future__ import annotations

from pathlib import Path

import click

from cli.common import device_option, no_progress_option, out_option, reports_errors
from spectra.surgery import run as lib


def _split(ctx: click.Context, param: click.Parameter, value: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in value.split(",") if part.strip())


def _fractions(ctx: click.Context, param: click.Parameter, value: str) -> tuple[float, ...]:
    try:
        return tuple(float(part) for part in _split(ctx, param, value))
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of numbers") from None


@click.command("surgery")
@click.argument("checkpoint", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--data",
    "data_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Dataset directory the run was trained on (its test split is evaluated). "
    "[default: the one recorded in the checkpoint]",
)
@click.option(
    "--strategies",
    default=",".join(lib.STRATEGIES),
    callback=_split,
    help="Comma-separated pruning strategies: gamma (smallest |gamma|), svd (top key singular directions), random.",
)
@click.option(
    "--fractions",
    default=",".join(str(f) for f in lib.DEFAULT_FRACTIONS),
    callback=_fractions,
    help="Comma-separated fractions of each key head's dimensions to remove, in [0, 1].",
)
@click.option("--seeds", type=click.IntRange(min=1), default=lib.DEFAULT_SEEDS, help="Random-pruning draws.")
@click.option("--layers", default="all", help='Layers to prune: "all", "0,1", "0-3" or "0,2-4".')
@click.option(
    "--pair-rope/--no-pair-rope",
    default=True,
    help="Remove whole rotary pairs (j, j + head_dim/2); --no-pair-rope removes single coordinates.",
)
@click.option(
    "--test-tokens",
    type=click.IntRange(min=1),
    default=lib.DEFAULT_TEST_TOKENS,
    help="Predicted tokens of the test split to evaluate (capped by the split).",
)
@click.option(
    "--seq-len",
    type=click.IntRange(min=1),
    default=None,
    help="Window length of the test loss. [default: the run's train.seq_len]",
)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=lib.DEFAULT_BATCH_SIZE,
    help="Sequences per forward pass.",
)
@device_option(help="Where the model runs.")
@click.option(
    "--force",
    is_flag=True,
    help="Proceed although the dataset's eval-batch hash differs from the checkpoint's.",
)
@no_progress_option
@out_option(
    "Surgery file to create or extend (it must be one of the same experiment). "
    "[default: RUN/surgery.nc for RUN/checkpoints/tokens_X.safetensors]",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
)
@reports_errors
def surgery(
    checkpoint: Path,
    data_dir: Path | None,
    strategies: tuple[str, ...],
    fractions: tuple[float, ...],
    seeds: int,
    layers: str,
    pair_rope: bool,
    test_tokens: int,
    seq_len: int | None,
    batch_size: int,
    device: str,
    force: bool,
    no_progress: bool,
    out: Path | None,
) -> None:
    """Prune key dimensions of CHECKPOINT and write the test loss per strategy and fraction to surgery.nc.

    Every pruned key head loses the same number of dimensions under each strategy; the loss is measured
    on the dataset's held-out test split, never used for any SVD. A strategy that does not apply (gamma
    on a model without a learned QK-norm gain) is reported and left NaN in the file. An existing --out must
    hold the surgery of the same experiment: its results are kept and only the cells this call adds are
    measured; any other file is left as it is and refused.
    """
    path = lib.surgery(
        checkpoint,
        data_dir,
        out=out,
        strategies=strategies,
        fractions=fractions,
        seeds=seeds,
        layers=layers,
        pair_rope=pair_rope,
        test_tokens=test_tokens,
        seq_len=seq_len,
        batch_size=batch_size,
        device=device,
        force=force,
        progress=not no_progress,
        echo=click.echo,
    )
    click.echo(f"wrote {path}")
