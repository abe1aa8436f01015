"""``collapse-train prepare-data``: a thin skin over :func:`trainer.data.prepare.prepare_data`."""

from __future__ import annotations

from pathlib import Path

import click

from cli.common import reports_errors
from trainer.data.dataset import SPLITS, TokenDataset
from trainer.data.prepare import prepare_data as prepare_dataset


@click.command("prepare-data")
@click.option(
    "-o",
    "--out",
    "out_dir",
    required=True,
    type=click.Path(path_type=Path),
    help="Dataset directory to create.",
)
@click.option(
    "--source",
    "sources",
    multiple=True,
    metavar="SPEC",
    help="bible:bbe|kjv|mix, hf:NAME[:CONFIG][@SPLIT], or a .txt/.jsonl/.json/.parquet file or directory; "
    "append *WEIGHT for a share of --max-tokens (repeatable; default bible:mix).",
)
@click.option(
    "--vocab-size", type=int, default=4096, show_default=True, help="Vocabulary of the BPE trained on train."
)
@click.option(
    "--tokenizer",
    default=None,
    metavar="PATH_OR_NAME",
    help="Use this tokenizer instead of training one: a tokenizer.json, a dataset directory, a model "
    "directory, or a hub name.",
)
@click.option(
    "--eot-token",
    default=None,
    help="End-of-text token [default: <|endoftext|>, or the reused dataset's; for a model directory whose "
    "tokenizer lacks <|endoftext|>, its tokenizer_config.json eos_token].",
)
@click.option(
    "--text-field", default="text", show_default=True, help="Text field of .jsonl/.json/.parquet/hf records."
)
@click.option(
    "--filter",
    "filters",
    multiple=True,
    metavar="FIELD=VALUE",
    help="Keep records whose FIELD equals VALUE (repeatable: one field's values are alternatives, fields must all match).",
)
@click.option(
    "--min-grade", type=float, default=None, help="Keep documents with Flesch-Kincaid grade >= this."
)
@click.option(
    "--max-grade", type=float, default=None, help="Keep documents with Flesch-Kincaid grade <= this."
)
@click.option(
    "--max-tokens",
    type=int,
    default=None,
    help="Total tokens (all splits), shared among sources by weight [default: read every source whole].",
)
@click.option(
    "--val-frac",
    type=float,
    default=0.05,
    show_default=True,
    help="Fraction of documents held out for validation.",
)
@click.option(
    "--test-frac",
    type=float,
    default=0.05,
    show_default=True,
    help="Fraction of documents held out for test.",
)
@click.option(
    "--eval-seqs", type=int, default=8, show_default=True, help="Sequences in the fixed eval batch."
)
@click.option(
    "--eval-seq-len", type=int, default=512, show_default=True, help="Tokens per eval-batch sequence."
)
@click.option(
    "--seed", type=int, default=0, show_default=True, help="Document order within splits and eval windows."
)
@click.option("--no-progress", is_flag=True, help="Hide the progress bars.")
@reports_errors
def prepare_data(
    out_dir: Path,
    sources: tuple[str, ...],
    vocab_size: int,
    tokenizer: str | None,
    eot_token: str | None,
    text_field: str,
    filters: tuple[str, ...],
    min_grade: float | None,
    max_grade: float | None,
    max_tokens: int | None,
    val_frac: float,
    test_frac: float,
    eval_seqs: int,
    eval_seq_len: int,
    seed: int,
    no_progress: bool,
) -> None:
    """Prepare a dataset directory: token memmaps split by document, a tokenizer and a fixed eval batch."""
    path = prepare_dataset(
        out_dir,
        sources,
        vocab_size=vocab_size,
        tokenizer=tokenizer,
        eot_token=eot_token,
        text_field=text_field,
        filters=filters,
        min_grade=min_grade,
        max_grade=max_grade,
        max_tokens=max_tokens,
        val_frac=val_frac,
        test_frac=test_frac,
        eval_seqs=eval_seqs,
        eval_seq_len=eval_seq_len,
        seed=seed,
        progress=not no_progress,
    )
    meta = TokenDataset.open(path).meta
    click.echo(f"prepared {path} (vocab {meta['tokenizer']['vocab_size']}, {meta['dtype']})")
    for split in SPLITS:
        s = meta["splits"][split]
        click.echo(f"  {split:5s} {s['tokens']:>13,} tokens  {s['documents']:>9,} documents")
