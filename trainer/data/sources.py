"""Text sources: parsing ``--source`` specs, sharing the token budget, and reading records from each source.

A source is the embedded Bible corpus (:mod:`trainer.data.bible`), a Hugging Face dataset (streamed through
the ``datasets`` library) or local .txt / .jsonl / .json / .parquet files.
"""

from __future__ import annotations

import collections
import math
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from trainer.data.bible import BIBLE_SOURCES, BIBLE_TRANSLATIONS, bible_chapters
from trainer.data.dataset import DataError
from trainer.provenance import package_version

DEFAULT_SOURCE = "bible:mix"
# Local file suffix -> `datasets` builder.
LOCAL_BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
Record = tuple[dict[str, Any], str, str]  # (the record's fields, its text, its split key or "" for the text)


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


def token_budgets(specs: Sequence[SourceSpec], max_tokens: int | None) -> list[int | None]:
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


def source_records(spec: SourceSpec, text_field: str) -> tuple[Iterator[Record], dict[str, Any]]:
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
