"""The eval batch's tokenizer against the model's, by content; prepare-data with a model directory's tokenizer."""

from __future__ import annotations

import json
import shutil

import pytest
from helpers import tiny_corpus
from hf_helpers import make_model_dataset

from spectra.errors import SpectraError
from spectra.hf.tokenizer import check_tokenizer, tokenizer_differences
from trainer.data.dataset import DataError, TokenDataset
from trainer.data.tokenizer import train_bpe


@pytest.fixture(scope="module")
def tokenizer_json(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    path.write_text(train_bpe(tiny_corpus(), 300, "<|endoftext|>").to_str())
    return path


def test_the_same_content_matches_whatever_the_formatting(tokenizer_json, tmp_path):
    data = json.loads(tokenizer_json.read_text())
    assert check_tokenizer(tokenizer_json, tokenizer_json).startswith("identical tokenizer.json (sha256 ")
    data["decoder"], data["post_processor"] = None, {"type": "TemplateProcessing"}  # no effect on the ids
    other = tmp_path / "tokenizer.json"
    other.write_text(json.dumps(data, indent=4, sort_keys=True))
    assert check_tokenizer(tokenizer_json, other).startswith("same vocabulary, merges, added tokens")


def test_every_id_deciding_difference_is_named(tokenizer_json):
    a = json.loads(tokenizer_json.read_text())
    b = json.loads(tokenizer_json.read_text())
    vocab = b["model"]["vocab"]
    first, second = sorted(vocab, key=vocab.get)[-2:]
    vocab[first], vocab[second] = vocab[second], vocab[first]
    b["model"]["merges"] = b["model"]["merges"][:-1]
    b["model"]["byte_fallback"] = not a["model"].get("byte_fallback", False)
    b["added_tokens"][0]["content"] = "<|other|>"
    b["normalizer"] = {"type": "NFKC"}
    found = tokenizer_differences(a, b)
    assert found[0].startswith(
        "vocabulary: the dataset's has 300 tokens, the model's 300, 2 tokens have other ids"
    )
    assert any(f.startswith("merges: ") for f in found)
    assert any("byte_fallback" in f for f in found)
    assert any(
        f.startswith("added tokens: 1 differ (e.g. id 0: '<|endoftext|>' vs '<|other|>')") for f in found
    )
    assert "normalizer differs" in found and "pre_tokenizer differs" not in found


def test_a_mismatch_is_an_error_unless_forced(tokenizer_json, tmp_path):
    other = tmp_path / "tokenizer.json"
    other.write_text(train_bpe(tiny_corpus(), 280, "<|endoftext|>").to_str())
    with pytest.raises(
        SpectraError, match=r"another tokenizer than the model's .*vocabulary: the dataset's has 300"
    ):
        check_tokenizer(tokenizer_json, other)
    assert check_tokenizer(tokenizer_json, other, force=True).startswith("DIFFERENT (forced): vocabulary")
    with pytest.raises(SpectraError, match="ships no tokenizer.json"):
        check_tokenizer(tokenizer_json, None)
    assert check_tokenizer(tokenizer_json, None, force=True).startswith("not checked (forced)")
    other.write_text("{not json")
    with pytest.raises(SpectraError, match="not a tokenizer.json"):
        check_tokenizer(tokenizer_json, other)


# ----------------------------------------------------------------------------------------------------
# collapse-train prepare-data --tokenizer MODEL_DIR


def test_prepare_data_with_a_model_directory_has_its_vocabulary_and_eot(hf_revisions, hf_data_dir):
    model_dir = hf_revisions("llama") / "step0"
    meta = TokenDataset.open(hf_data_dir).meta["tokenizer"]
    model_tok = json.loads((model_dir / "tokenizer.json").read_text())
    assert (hf_data_dir / "tokenizer.json").read_bytes() == (model_dir / "tokenizer.json").read_bytes()
    assert meta["vocab_size"] == len(model_tok["model"]["vocab"])
    assert (meta["eot_token"], meta["eot_id"]) == (
        "<|endoftext|>",
        model_tok["model"]["vocab"]["<|endoftext|>"],
    )


def _model_dir_with_eos(tmp_path, eos, config_value):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "tokenizer.json").write_text(train_bpe(tiny_corpus(), 290, eos).to_str())
    (model_dir / "tokenizer_config.json").write_text(json.dumps({"eos_token": config_value}))
    return model_dir


@pytest.mark.parametrize(
    "config_value", ["<eos>", {"content": "<eos>", "special": True, "__type": "AddedToken"}]
)
def test_prepare_data_takes_a_model_directorys_eos_when_it_has_no_endoftext(tmp_path, config_value):
    model_dir = _model_dir_with_eos(tmp_path, "<eos>", config_value)
    meta = TokenDataset.open(make_model_dataset(tmp_path / "d", model_dir)).meta["tokenizer"]
    assert meta["eot_token"] == "<eos>" and "tokenizer_config.json" in meta["eot_from"]


def test_prepare_data_refuses_a_model_directory_without_a_usable_eot(tmp_path):
    model_dir = _model_dir_with_eos(tmp_path, "<eos>", None)
    with pytest.raises(DataError, match="no end-of-text token '<|endoftext|>'; name it with --eot-token"):
        make_model_dataset(tmp_path / "d", model_dir)
    shutil.rmtree(tmp_path / "d")
    (model_dir / "tokenizer_config.json").write_text("{broken")
    with pytest.raises(DataError, match="not a valid tokenizer_config.json"):
        make_model_dataset(tmp_path / "d", model_dir)
