"""Tokenizers: a byte-level BPE trained on the data, or an existing one (a file, a dataset's, a hub name)."""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from trainer.data.dataset import EOT_TOKEN, META_FILE, TOKENIZER_FILE, DataError, read_meta


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


def load_tokenizer(spec: str, eot_token: str | None) -> tuple[Tokenizer, bytes, dict[str, Any]]:
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
            origin = read_meta(meta_path).get("tokenizer", {})
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
    return tok, raw, tokenizer_info(tok, raw, eot_token, info)


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


def tokenizer_info(tok: Tokenizer, raw: bytes, eot_token: str, info: dict[str, Any]) -> dict[str, Any]:
    """meta.json's ``tokenizer`` entry: ``info`` (where the tokenizer came from), its vocabulary, end-of-text
    token and id, and the sha256 of ``raw`` (the ``tokenizer.json`` bytes written)."""
    return {
        **info,
        "vocab_size": tok.get_vocab_size(with_added_tokens=True),
        "eot_token": eot_token,
        "eot_id": tok.token_to_id(eot_token),
        "sha256": hashlib.sha256(raw).hexdigest(),  # equal hashes: the datasets share a tokenizer
    }
