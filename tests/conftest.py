"""Fixtures shared by the test modules; the plain builders behind them are in ``helpers.py``."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from helpers import make_tiny_dataset

from trainer.data.dataset import TokenDataset


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One torch thread for the whole module that asks for it, restored afterwards.

    Tiny models gain nothing from threads and the test machine's cores are shared. A module opts in with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``. It is not for every module: test_extract checks
    how spectra.extract.svd splits work over ``torch.get_num_threads()`` threads, which one thread would skip.
    Session-scoped fixtures are set up before it and run with the default count; a module-scoped fixture
    that must run on one thread asks for ``one_thread`` itself.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory) -> Path:
    """One prepared dataset for the training tests: vocab 300, eval batch 2 x 32, about 18k train tokens.

    Shared by the whole session, so a test that damages a dataset copies this one first. test_ddp keeps a
    corpus of its own (its module comment says why).
    """
    return make_tiny_dataset(
        tmp_path_factory.mktemp("tiny-data"), vocab_size=300, eval_seqs=2, eval_seq_len=32
    )


@pytest.fixture(scope="session")
def tiny_vocab(tiny_data_dir) -> int:
    """The vocabulary size of :func:`tiny_data_dir`'s tokenizer (what ``model.vocab_size`` must be)."""
    return TokenDataset.open(tiny_data_dir).vocab_size


# ----------------------------------------------------------------------------------------------------
# public models (spectra.hf): tiny transformers models of every family, saved as local revisions


@pytest.fixture(scope="session")
def hf_tokenizer(tmp_path_factory) -> Path:
    """The tokenizer.json every tiny public model ships (a 300-token BPE with <|endoftext|>)."""
    pytest.importorskip("transformers")
    from hf_helpers import write_tokenizer

    return write_tokenizer(tmp_path_factory.mktemp("hf-tokenizer") / "tokenizer.json")


@pytest.fixture(scope="session")
def hf_revisions(tmp_path_factory, hf_tokenizer):
    """``hf_revisions(family)``: a directory of ``step0/`` and ``step1000/`` revisions of that family, built once."""
    from hf_helpers import save_revisions

    built: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in built:
            built[family] = save_revisions(
                family, tmp_path_factory.mktemp(f"hf-{family}"), [0, 1000], hf_tokenizer
            )
        return built[family]

    return get


@pytest.fixture(scope="session")
def hf_data_dir(tmp_path_factory, hf_revisions) -> Path:
    """A dataset prepared with ``--tokenizer`` a tiny model's directory: eval batch 4 x 64 in its vocabulary."""
    from hf_helpers import make_model_dataset

    return make_model_dataset(tmp_path_factory.mktemp("hf-data"), hf_revisions("llama") / "step0")


PYTHIA_STYLE = ["step0", "step1", "step2", "step4", "step8", "step16", "step512", "step1000", "step2000",
                "step3000", "step5000", "step6000", "step7000", "main"]  # fmt: skip
"""Pythia's naming: step0, log-spaced steps, then every 1000 (4000 missing: a gap), and main (no step)."""
OLMO2_STYLE = [
    "main",
    "stage1-step0-tokens0B",
    "stage1-step300-tokens1B",
    "stage1-step10000-tokens21B",
    "stage1-step20000-tokens42B",
    "stage1-step40000-tokens84B",
    "stage1-step50000-tokens105B",
    "step60000-tokens126B",
    "stage2-ingredient1-step1000-tokens3B",
    "stage2-ingredient1-step2000-tokens5B",
    "stage2-ingredient2-step1000-tokens3B",
]
"""OLMo-2's naming: stage1-stepN-tokensMB (30000 missing), one without the stage1- prefix, annealing
stage2-ingredientK-... whose steps restart, and main."""


@pytest.fixture(scope="session")
def hf_pythia_dir(tmp_path_factory, hf_tokenizer) -> Path:
    """A revisions directory named as Pythia's branches (:data:`PYTHIA_STYLE`): tiny GPT-NeoX models, three
    different ones under the fourteen names."""
    from hf_helpers import save_named_revisions

    root = tmp_path_factory.mktemp("hf-pythia") / "pythia-tiny"
    return save_named_revisions("gpt_neox", root, PYTHIA_STYLE, hf_tokenizer, distinct=3)


@pytest.fixture(scope="session")
def hf_olmo_dir(tmp_path_factory, hf_tokenizer) -> Path:
    """A revisions directory named as OLMo-2's branches (:data:`OLMO2_STYLE`): tiny OLMo-2 models, two different
    ones under the eleven names."""
    from hf_helpers import save_named_revisions

    root = tmp_path_factory.mktemp("hf-olmo") / "olmo2-tiny"
    return save_named_revisions("olmo2", root, OLMO2_STYLE, hf_tokenizer, distinct=2)
