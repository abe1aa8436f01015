"""Dataset preparation: text sources -> token memmaps, a tokenizer and a fixed eval batch.

:func:`prepare_data` builds a dataset directory (:mod:`trainer.data.dataset` is its contract) from the
embedded Bible corpus, local files or Hugging Face datasets. Documents are assigned to splits by a hash of a
stable key (the chapter for the Bible, the text otherwise; :func:`trainer.data.filters.split_of`), so the
assignment does not depend on the seed, the order of the sources or the token budget: datasets prepared from
overlapping sources agree on which documents are held out.
"""

from __future__ import annotations

import collections
import glob
import itertools
import os
import secrets
import shutil
import sys
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer
from tqdm import tqdm

from trainer.data.dataset import (
    EOT_TOKEN,
    EVAL_BATCH_FILE,
    META_FILE,
    SPLITS,
    TOKENIZER_FILE,
    DataError,
    write_eval_batch,
    write_meta,
)
from trainer.data.filters import DocumentFilter, split_of
from trainer.data.sources import DEFAULT_SOURCE, SourceSpec, parse_source, source_records, token_budgets
from trainer.data.tokenizer import load_tokenizer, tokenizer_info, train_bpe
from trainer.fileio import (
    DiskFullError,
    ExclusiveLock,
    check_writable,
    disk_is_full,
    fsync_dir,
    naming_a_full_disk,
    remove_stale_temporaries,
)
from trainer.provenance import provenance_record

# Before a BPE exists the token budget of a source can only be estimated in characters. Reading ahead
# this many characters per budgeted token is generous for English (a 4k-vocabulary BPE makes about 4
# characters per token); if it falls short the source is simply read further once the tokenizer exists.
READ_AHEAD_CHARS_PER_TOKEN = 5
ENCODE_BATCH_DOCS = 256  # documents per encode_batch call (tokenizers parallelises within a batch)
COPY_CHUNK_DOCS = 4096  # documents per write when the staged splits are shuffled into their final files
PREPARE_DISTRIBUTIONS = ("datasets", "tokenizers", "textstat", "pythonbible")
"""Distributions meta.json names besides the core ones (:data:`trainer.provenance.CORE_DISTRIBUTIONS`)."""


class _SourceReader:
    """Documents of one source, with read-ahead (for BPE training) and counts for meta.json."""

    def __init__(
        self, spec: SourceSpec, text_field: str, doc_filter: DocumentFilter, val_frac: float, test_frac: float
    ):
        self.spec = spec
        self._records, self.info = source_records(spec, text_field)
        self._filter = doc_filter
        self._fracs = (val_frac, test_frac)
        self._pending: collections.deque[tuple[str, str]] = collections.deque()
        self.pending_chars = 0
        self.read = self.empty = self.filtered = 0

    def _next(self) -> tuple[str, str] | None:
        for rec, text, key in self._records:
            self.read += 1
            if not text:
                self.empty += 1
                continue
            if not self._filter.keep(rec, text, self.spec.spec):
                self.filtered += 1
                continue
            return text, split_of(key or "text:" + text, *self._fracs)
        return None

    def read_ahead(self, max_chars: int | None, bar: tqdm) -> None:
        while max_chars is None or self.pending_chars < max_chars:
            doc = self._next()
            if doc is None:
                return
            self._pending.append(doc)
            self.pending_chars += len(doc[0])
            bar.update(1)

    def pending_train_texts(self) -> Iterator[str]:
        return (text for text, split in self._pending if split == "train")

    def documents(self) -> Iterator[tuple[str, str]]:
        while self._pending:
            yield self._pending.popleft()
        while (doc := self._next()) is not None:
            yield doc


class _SplitWriter:
    """Stages each split's documents (EOT + ids) in arrival order, then writes them shuffled."""

    def __init__(self, directory: Path, dtype: np.dtype, eot_id: int):
        self.directory, self.dtype, self.eot_id = directory, dtype, eot_id
        self._staging = {s: directory / f".{s}.staging" for s in SPLITS}
        self._files = {s: open(p, "wb") for s, p in self._staging.items()}  # closed in finish() or abort()
        self.lengths: dict[str, list[int]] = {s: [] for s in SPLITS}

    def add(self, docs: Sequence[tuple[str, np.ndarray]]) -> None:
        """Append documents given as (split, token ids); each is written as EOT followed by its ids."""
        for split in SPLITS:
            arrays = [ids for s, ids in docs if s == split]
            if not arrays:
                continue
            out = np.empty(sum(len(a) + 1 for a in arrays), dtype=self.dtype)
            pos = 0
            for ids in arrays:
                out[pos] = self.eot_id
                out[pos + 1 : pos + 1 + len(ids)] = ids
                pos += len(ids) + 1
                self.lengths[split].append(len(ids) + 1)
            with naming_a_full_disk(self.directory / f"{split}.bin"):  # numpy's message names no file
                out.tofile(self._files[split])

    def finish(self, seed: int) -> dict[str, dict[str, Any]]:
        """Write ``{split}.bin`` with the documents in a seeded random order; return the split table."""
        table = {}
        for i, split in enumerate(SPLITS):
            self._files[split].close()
            lengths = np.asarray(self.lengths[split], dtype=np.int64)
            n_tokens = int(lengths.sum())
            final = self.directory / f"{split}.bin"
            # Shuffled so that any contiguous slice (the fixed validation slice, the test loss) samples
            # every source, instead of whichever came first.
            order = np.random.default_rng([seed, i]).permutation(len(lengths))
            starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]) if len(lengths) else lengths
            with naming_a_full_disk(final), open(final, "wb") as f:
                if n_tokens:
                    staged = np.memmap(self._staging[split], dtype=self.dtype, mode="r", shape=(n_tokens,))
                    for chunk in np.array_split(order, -(-len(order) // COPY_CHUNK_DOCS)):
                        np.concatenate([staged[starts[j] : starts[j] + lengths[j]] for j in chunk]).tofile(f)
                    del staged
                f.flush()
                os.fsync(f.fileno())
            self._staging[split].unlink()
            table[split] = {"file": final.name, "tokens": n_tokens, "documents": len(lengths)}
        return table

    def abort(self) -> None:
        for f in self._files.values():
            f.close()


def _batches(items: Iterable[Any], n: int) -> Iterator[list[Any]]:
    it = iter(items)
    while batch := list(itertools.islice(it, n)):
        yield batch


def _tokenize_source(
    reader: _SourceReader, tok: Tokenizer, budget: int | None, writer: _SplitWriter, bar: tqdm
) -> dict[str, Any]:
    """Encode a source's documents into the writer until its budget (EOTs included) is spent."""
    used, truncated, budget_spent = 0, False, False
    by_split = {s: {"tokens": 0, "documents": 0} for s in SPLITS}
    for batch in _batches(reader.documents(), ENCODE_BATCH_DOCS):
        encodings = tok.encode_batch_fast([text for text, _ in batch], add_special_tokens=False)
        docs = []
        for (_, split), enc in zip(batch, encodings):
            ids = np.asarray(enc.ids, dtype=np.int64)
            if budget is not None:
                room = budget - used - 1  # one token goes to the document's EOT
                if room < 1:
                    break
                if len(ids) > room:
                    ids, truncated = ids[:room], True
            if len(ids) == 0:  # e.g. text that the tokenizer maps to nothing
                continue
            docs.append((split, ids))
            used += len(ids) + 1
            by_split[split]["tokens"] += len(ids) + 1
            by_split[split]["documents"] += 1
            bar.update(len(ids) + 1)
        writer.add(docs)
        if budget is not None and used >= budget - 1:
            budget_spent = True
            break
    return {
        "budget_tokens": budget,
        "tokens": used,
        "splits": by_split,
        "records_read": reader.read,  # read-ahead included
        "records_empty": reader.empty,
        "records_filtered_out": reader.filtered,
        "last_document_truncated": truncated,
        "exhausted": not budget_spent,  # read to its end before the budget was spent
    }


def _eval_windows(n_tokens: int, n_seqs: int, seq_len: int, seed: int) -> np.ndarray:
    """Start offsets of ``n_seqs`` non-overlapping windows: one random start inside each of ``n_seqs``
    equal strata of the split, so the batch spans the whole split."""
    if n_seqs <= 0 or seq_len <= 0:
        raise DataError(f"--eval-seqs and --eval-seq-len must be positive, got {n_seqs} and {seq_len}")
    if n_tokens < n_seqs * seq_len:
        raise DataError(
            f"the val split has {n_tokens} tokens but the eval batch needs --eval-seqs x --eval-seq-len = "
            f"{n_seqs} x {seq_len} = {n_seqs * seq_len}: use more data, a larger --val-frac or a smaller batch"
        )
    stride = n_tokens // n_seqs
    rng = np.random.default_rng([seed, len(SPLITS)])  # a stream distinct from the split shuffles
    return np.arange(n_seqs, dtype=np.int64) * stride + rng.integers(0, stride - seq_len + 1, size=n_seqs)


def _check_out_free(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(
            f"{out} already exists and is not an empty directory; choose another --out or remove it"
        )


def prepare_data(
    out: str | os.PathLike,
    sources: Sequence[str] = (),
    *,
    vocab_size: int = 4096,
    tokenizer: str | None = None,
    eot_token: str | None = None,
    text_field: str = "text",
    filters: Sequence[str] = (),
    min_grade: float | None = None,
    max_grade: float | None = None,
    max_tokens: int | None = None,
    val_frac: float = 0.05,
    test_frac: float = 0.05,
    eval_seqs: int = 8,
    eval_seq_len: int = 512,
    seed: int = 0,
    progress: bool = True,
) -> Path:
    """Prepare a dataset directory (see docs/data.md) from text sources and return its path.

    Parameters
    ----------
    out
        The dataset directory to create. It must not exist (or be empty); the dataset is built in a
        hidden sibling directory and renamed into place, so ``out`` never holds a partial dataset.
    sources
        ``--source`` specs: ``bible:bbe|kjv|mix``, ``hf:NAME[:CONFIG][@SPLIT]``, or a local .txt /
        .jsonl / .json / .parquet file or a directory of them, each optionally ending in ``*WEIGHT``.
        Empty means ``bible:mix``.
    vocab_size
        Vocabulary of the byte-level BPE trained on the train split (ignored with ``tokenizer``).
    tokenizer
        Use an existing tokenizer instead: a tokenizer.json file, a dataset directory (its tokenizer,
        byte for byte) or a hub name.
    eot_token
        End-of-text token; default ``<|endoftext|>`` (or the one of the dataset named by ``tokenizer``).
    text_field
        Field holding the text in .jsonl / .json / .parquet / hf records.
    filters
        ``FIELD=VALUE`` conditions on records (same field: any value; different fields: all).
    min_grade, max_grade
        Bounds on ``textstat.flesch_kincaid_grade`` of each document.
    max_tokens
        Total token budget (all splits, EOT separators included), shared among the sources in
        proportion to their weights (equally without weights). ``None`` reads every source to its end.
    val_frac, test_frac
        Fractions of the documents (by hash) held out for validation and test.
    eval_seqs, eval_seq_len
        Shape of the fixed eval batch taken from the val split.
    seed
        Orders the documents within each split and places the eval windows; the split assignment
        does not depend on it.
    progress
        Show tqdm progress bars on stderr.

    Returns
    -------
    Path
        ``out``.

    Examples
    --------
    >>> path = prepare_data("data/bible-mix")  # doctest: +SKIP
    >>> TokenDataset.open(path).meta["splits"]["train"]["tokens"]  # doctest: +SKIP
    """
    out = Path(out).expanduser()
    _check_out_free(out)
    specs = tuple(parse_source(s) for s in (sources or (DEFAULT_SOURCE,)))
    recipe = _Recipe(
        specs=specs,
        budgets=tuple(token_budgets(specs, max_tokens)),
        doc_filter=DocumentFilter.parse(filters, min_grade, max_grade),
        vocab_size=vocab_size,
        tokenizer=tokenizer,
        eot_token=eot_token,
        text_field=text_field,
        max_tokens=max_tokens,
        val_frac=val_frac,
        test_frac=test_frac,
        eval_seqs=eval_seqs,
        eval_seq_len=eval_seq_len,
        seed=seed,
        progress=progress,
    )
    recipe.doc_filter.check_grade_available()

    check_writable(out, "dataset directory")  # built beside it, then renamed into place
    out.parent.mkdir(parents=True, exist_ok=True)
    # one prepare-data per target at a time; under the lock, a hidden build directory of this target is
    # the debris of a killed run of this command, never a live one's
    with ExclusiveLock(out.parent / f".{out.name}.lock", f"dataset directory {out}"):
        remove_stale_temporaries(out.parent, [f".{glob.escape(out.name)}.*.tmp"])
        _check_out_free(out)
        _build_dataset(out, recipe)
    return out


@dataclass(frozen=True, kw_only=True)
class _Recipe:
    """The options of :func:`prepare_data`, parsed and checked (on construction) before anything is read."""

    specs: tuple[SourceSpec, ...]
    budgets: tuple[int | None, ...]
    """Each source's token budget (:func:`~trainer.data.sources.token_budgets`)."""
    doc_filter: DocumentFilter
    vocab_size: int
    tokenizer: str | None
    eot_token: str | None
    text_field: str
    max_tokens: int | None
    val_frac: float
    test_frac: float
    eval_seqs: int
    eval_seq_len: int
    seed: int
    progress: bool

    def __post_init__(self) -> None:
        val_frac, test_frac = self.val_frac, self.test_frac
        if not (0 <= val_frac < 1 and 0 <= test_frac < 1 and val_frac + test_frac < 1):
            raise DataError(
                f"--val-frac {val_frac} and --test-frac {test_frac} must be >= 0 and add up to less than 1"
            )
        if self.seed < 0:
            raise DataError(f"--seed must be non-negative, got {self.seed}")
        if self.eval_seqs <= 0 or self.eval_seq_len <= 0:
            raise DataError(
                f"--eval-seqs and --eval-seq-len must be positive, got {self.eval_seqs} and {self.eval_seq_len}"
            )
        if self.tokenizer is None and self.vocab_size < 257:
            raise DataError(
                f"--vocab-size must be at least 257 (256 bytes + end-of-text), got {self.vocab_size}"
            )


def _build_dataset(out: Path, recipe: _Recipe) -> None:
    """Build the dataset in a hidden sibling directory of ``out``, then rename it into place."""
    tmp = out.parent / f".{out.name}.{secrets.token_hex(4)}.tmp"
    tmp.mkdir()
    writer = None
    try:
        r = recipe
        readers = [_SourceReader(s, r.text_field, r.doc_filter, r.val_frac, r.test_frac) for s in r.specs]
        if r.tokenizer is None:
            tok, raw, tok_info = _train_tokenizer(
                readers, r.budgets, r.vocab_size, r.eot_token or EOT_TOKEN, r.progress
            )
        else:
            tok, raw, tok_info = load_tokenizer(r.tokenizer, r.eot_token)
        with naming_a_full_disk(tmp / TOKENIZER_FILE):
            (tmp / TOKENIZER_FILE).write_bytes(raw)
        # A literal "<|endoftext|>" inside a document is text, not a document boundary.
        tok.encode_special_tokens = True
        dtype = np.dtype(np.uint16 if tok_info["vocab_size"] <= 2**16 else np.uint32)

        writer = _SplitWriter(tmp, dtype, tok_info["eot_id"])
        source_meta = [
            _tokenize_into(writer, reader, tok, budget, r.progress)
            for reader, budget in zip(readers, r.budgets)
        ]
        splits = writer.finish(r.seed)
        writer = None
        if splits["train"]["tokens"] == 0:
            names = ", ".join(s.spec for s in r.specs)
            raise DataError(
                f"no training tokens: every document was filtered out or held out (sources: {names})"
            )
        eval_meta = _write_eval_batch(
            tmp, dtype, splits["val"]["tokens"], r.eval_seqs, r.eval_seq_len, r.seed
        )
        write_meta(tmp, _meta(out.name, r, source_meta, tok_info, dtype, splits, eval_meta))
        _move_into_place(tmp, out)
    except BaseException as e:
        full = _full_disk_in_build(e, tmp, out)  # asked before the removal frees the space
        if writer is not None:
            writer.abort()
        shutil.rmtree(tmp, ignore_errors=True)  # best effort: the original error is the one to report
        if full is not None:
            raise full from e.__cause__ if isinstance(e, DiskFullError) else e
        raise


def _tokenize_into(
    writer: _SplitWriter, reader: _SourceReader, tok: Tokenizer, budget: int | None, progress: bool
) -> dict[str, Any]:
    """Tokenize one source into the splits; return its meta.json entry (warning when it ran out early)."""
    spec = reader.spec
    with _bar(progress, f"tokenize {spec.spec}", "tok", total=budget) as bar:
        stats = _tokenize_source(reader, tok, budget, writer, bar)
    if budget is not None and stats["exhausted"] and stats["tokens"] < budget:
        warnings.warn(
            f"source {spec.spec!r} ran out after {stats['tokens']} of its {budget} budgeted tokens; "
            "the mix proportions recorded in meta.json differ from the weights",
            stacklevel=2,
        )
    return {**reader.info, "weight": spec.weight, **stats}


def _meta(
    name: str,
    recipe: _Recipe,
    source_meta: list[dict[str, Any]],
    tok_info: dict[str, Any],
    dtype: np.dtype,
    splits: dict[str, dict[str, Any]],
    eval_meta: dict[str, Any],
) -> dict[str, Any]:
    """meta.json's entries (docs/data.md) after its format tag, which :func:`write_meta` puts first."""
    total = sum(s["tokens"] for s in source_meta)
    for s in source_meta:
        s["share"] = s["tokens"] / total if total else 0.0
    val_frac, test_frac = recipe.val_frac, recipe.test_frac
    return {
        "name": name,
        "sources": source_meta,
        "filters": recipe.doc_filter.describe(),
        "tokenizer": tok_info,
        "dtype": dtype.name,
        "splits": splits,
        "split_fractions": {"train": 1 - val_frac - test_frac, "val": val_frac, "test": test_frac},
        "split_by": "blake2b-64 of each document's key (Bible: book:chapter; otherwise its text) as a "
        "fraction of 2**64: below val_frac -> val, below val_frac + test_frac -> test, else train",
        "max_tokens": recipe.max_tokens,
        "seed": recipe.seed,
        "eval_batch": eval_meta,
        **provenance_record(*PREPARE_DISTRIBUTIONS),  # versions, git revision, created
    }


def _full_disk_in_build(error: BaseException, tmp: Path, out: Path) -> DiskFullError | None:
    """A full disk while building ``out`` in ``tmp``, as an error naming the file by its place in ``out``.

    None for any other error, and for a :class:`DiskFullError` that already names a file outside ``tmp``.
    """
    if isinstance(error, DiskFullError):
        return DiskFullError(out / error.path.relative_to(tmp)) if error.path.is_relative_to(tmp) else None
    if isinstance(error, Exception) and disk_is_full(error, tmp):
        return DiskFullError(out)
    return None


def _train_tokenizer(
    readers: Sequence[_SourceReader],
    budgets: Sequence[int | None],
    vocab_size: int,
    eot_token: str,
    progress: bool,
) -> tuple[Tokenizer, bytes, dict[str, Any]]:
    """Read ahead in every source (about its budget's worth of text) and train the BPE on the train split."""
    for reader, budget in zip(readers, budgets):
        limit = None if budget is None else budget * READ_AHEAD_CHARS_PER_TOKEN
        with _bar(progress, f"read {reader.spec.spec}", "doc") as bar:
            reader.read_ahead(limit, bar)
    n_train = sum(1 for r in readers for _ in r.pending_train_texts())
    if n_train == 0:
        names = ", ".join(r.spec.spec for r in readers)
        raise DataError(f"no training documents to train the tokenizer on (sources: {names})")
    texts = itertools.chain.from_iterable(r.pending_train_texts() for r in readers)
    tok = train_bpe(texts, vocab_size, eot_token, length=n_train)
    raw = tok.to_str().encode("utf-8")
    info = {
        "kind": "bpe-trained",
        "source": "byte-level BPE trained on this dataset's train split",
        "requested_vocab_size": vocab_size,
        "trained_on_documents": n_train,
        "trained_on_chars": sum(len(t) for r in readers for t in r.pending_train_texts()),
    }
    return tok, raw, tokenizer_info(tok, raw, eot_token, info)


def _write_eval_batch(
    directory: Path, dtype: np.dtype, n_val: int, n_seqs: int, seq_len: int, seed: int
) -> dict[str, Any]:
    """Cut the eval batch out of ``val.bin``, save it, and return its meta.json entry."""
    starts = _eval_windows(n_val, n_seqs, seq_len, seed)
    val = np.memmap(directory / "val.bin", dtype=dtype, mode="r", shape=(n_val,))
    input_ids = torch.from_numpy(val[starts[:, None] + np.arange(seq_len)].astype(np.int64))  # (N, T)
    del val
    digest = write_eval_batch(directory, input_ids)
    return {"n_seqs": n_seqs, "seq_len": seq_len, "split": "val", "starts": starts.tolist(), "sha256": digest}


def _move_into_place(tmp: Path, out: Path) -> None:
    """fsync the prepared files, then rename the directory to ``out`` (one atomic step on POSIX)."""
    for name in (TOKENIZER_FILE, EVAL_BATCH_FILE, META_FILE):  # the split files were synced when written
        with open(tmp / name, "rb") as f:
            os.fsync(f.fileno())
    fsync_dir(tmp)
    _check_out_free(out)
    try:
        os.rename(tmp, out)  # also replaces an empty directory
    except OSError as e:
        raise DataError(f"cannot move the prepared dataset into {out}: {e.strerror}") from e
    fsync_dir(out.parent)


def _bar(progress: bool, desc: str, unit: str, total: int | None = None) -> tqdm:
    return tqdm(
        desc=desc, unit=unit, total=total, unit_scale=True, file=sys.stderr, disable=not progress, leave=False
    )
