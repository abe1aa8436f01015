"""Is the eval batch in the model's vocabulary? Compare two ``tokenizer.json`` files by content.

An eval batch prepared with another tokenizer is a sequence of valid ids that mean other strings to
the model: the forward pass runs and the spectra come out as numbers, but of garbage text. So the
dataset's ``tokenizer.json`` (``collapse-train prepare-data --tokenizer MODEL_DIR`` copies the model's
byte for byte) is compared with the model's before any forward pass.

Only what decides the ids of a text counts: the model section (type, vocabulary, merges and options),
the added tokens, the normaliser and the pre-tokeniser. The post-processor (the dataset is encoded
without special tokens), the decoder, padding and truncation do not, nor does the JSON's formatting: a
tokenizer loaded and saved again by another version of ``tokenizers`` still matches.

No torch here.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from spectra.errors import SpectraError

_MODEL_OPTIONS_IGNORED = ("vocab", "merges")


def _load(path: Path) -> tuple[dict[str, Any], str]:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise SpectraError(f"{path}: cannot read the tokenizer ({e.strerror or e})") from None
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SpectraError(f"{path}: not a tokenizer.json (invalid JSON: {e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        raise SpectraError(f"{path}: not a tokenizer.json (no 'model' section)")
    return data, hashlib.sha256(raw).hexdigest()


def _vocab(model: dict[str, Any]) -> dict[str, int]:
    vocab = model.get("vocab") or {}
    if isinstance(vocab, list):  # Unigram: [[piece, score], ...] in id order
        return {str(entry[0]): i for i, entry in enumerate(vocab)}
    return {str(k): int(v) for k, v in vocab.items()}


def _merges(model: dict[str, Any]) -> list[tuple[str, ...]]:
    # tokenizers writes merges as "a b" strings (older files) or [a, b] pairs (newer ones)
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model.get("merges") or []]


def _added(data: dict[str, Any]) -> dict[int, str]:
    return {int(t["id"]): str(t["content"]) for t in data.get("added_tokens") or []}


def _vocab_difference(a: dict[str, int], b: dict[str, int], names: tuple[str, str]) -> str | None:
    if a == b:
        return None
    other_id = sorted(t for t in a.keys() & b.keys() if a[t] != b[t])
    only_a, only_b = sorted(a.keys() - b.keys()), sorted(b.keys() - a.keys())
    parts = [f"the {names[0]}'s has {len(a)} tokens, the {names[1]}'s {len(b)}"]
    if other_id:
        t = other_id[0]
        parts.append(f"{len(other_id)} tokens have other ids (e.g. {t!r}: {a[t]} vs {b[t]})")
    if only_a:
        parts.append(f"{len(only_a)} only in the {names[0]}'s (e.g. {only_a[0]!r})")
    if only_b:
        parts.append(f"{len(only_b)} only in the {names[1]}'s (e.g. {only_b[0]!r})")
    return "vocabulary: " + ", ".join(parts)


def tokenizer_differences(
    a: dict[str, Any], b: dict[str, Any], names: tuple[str, str] = ("dataset", "model")
) -> list[str]:
    """What differs between two parsed ``tokenizer.json`` in what decides token ids; empty if nothing.

    Examples
    --------
    >>> tok = {"model": {"type": "BPE", "vocab": {"a": 0, "b": 1}, "merges": []}, "added_tokens": []}
    >>> tokenizer_differences(tok, tok)
    []
    >>> other = {"model": {"type": "BPE", "vocab": {"a": 1, "b": 0}, "merges": []}, "added_tokens": []}
    >>> tokenizer_differences(tok, other)
    ["vocabulary: the dataset's has 2 tokens, the model's 2, 2 tokens have other ids (e.g. 'a': 0 vs 1)"]
    """
    ma, mb = a["model"], b["model"]
    found = []
    if ma.get("type") != mb.get("type"):
        found.append(
            f"tokenizer model: {ma.get('type')!r} in the {names[0]}'s, {mb.get('type')!r} in the {names[1]}'s"
        )
    vocab = _vocab_difference(_vocab(ma), _vocab(mb), names)
    if vocab:
        found.append(vocab)
    merges_a, merges_b = _merges(ma), _merges(mb)
    if merges_a != merges_b:
        first = next(
            (i for i, (x, y) in enumerate(zip(merges_a, merges_b)) if x != y),
            min(len(merges_a), len(merges_b)),
        )
        found.append(f"merges: {len(merges_a)} vs {len(merges_b)}, first difference at rank {first}")
    options = sorted(
        k for k in (ma.keys() | mb.keys()) - set(_MODEL_OPTIONS_IGNORED) if ma.get(k) != mb.get(k)
    )
    if options:
        found.append(
            "model options differ: " + ", ".join(f"{k} ({ma.get(k)!r} vs {mb.get(k)!r})" for k in options)
        )
    added_a, added_b = _added(a), _added(b)
    if added_a != added_b:
        ids = sorted(i for i in added_a.keys() | added_b.keys() if added_a.get(i) != added_b.get(i))
        i = ids[0]
        found.append(
            f"added tokens: {len(ids)} differ (e.g. id {i}: {added_a.get(i)!r} vs {added_b.get(i)!r})"
        )
    for section in ("normalizer", "pre_tokenizer"):
        if a.get(section) != b.get(section):
            found.append(f"{section} differs")
    return found


def check_tokenizer(
    dataset_tokenizer: str | os.PathLike, model_tokenizer: str | os.PathLike | None, *, force: bool = False
) -> str:
    """Refuse an eval batch whose tokenizer is not the model's; return a line saying how they matched.

    Parameters
    ----------
    dataset_tokenizer
        The dataset's ``tokenizer.json``.
    model_tokenizer
        The model's ``tokenizer.json``, or None if the model ships none.
    force
        Return (with the differences in the line) instead of raising.

    Raises
    ------
    SpectraError
        The tokenizers differ, or the model has no ``tokenizer.json`` to compare with (unless ``force``).
    """
    ds_path = Path(dataset_tokenizer)
    data_a, sha_a = _load(ds_path)
    if model_tokenizer is None:
        if not force:
            raise SpectraError(
                "the model ships no tokenizer.json, so the eval batch's tokenizer cannot be checked against it "
                "(--force skips the check)"
            )
        return f"not checked (forced): the model ships no tokenizer.json; dataset tokenizer sha256 {sha_a}"
    data_b, sha_b = _load(Path(model_tokenizer))
    if sha_a == sha_b:
        return f"identical tokenizer.json (sha256 {sha_a})"
    found = tokenizer_differences(data_a, data_b)
    if not found:
        return (
            f"same vocabulary, merges, added tokens, normalizer and pre-tokenizer (sha256 {sha_a} vs {sha_b})"
        )
    what = "; ".join(found)
    if not force:
        raise SpectraError(
            f"the eval batch was tokenized with another tokenizer than the model's ({ds_path} vs "
            f"{model_tokenizer}): {what}. Prepare the batch with the model's tokenizer "
            "(collapse-train prepare-data --tokenizer MODEL_DIR), or --force to measure anyway"
        )
    return f"DIFFERENT (forced): {what}"


__all__ = ["check_tokenizer", "tokenizer_differences"]
