"""Fixtures shared by the test modules; the plain builders behind them are in ``helpers.py``."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from helpers import make_tiny_dataset

from trainer.data import TokenDataset


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One torch thread for the whole module that asks for it, restored afterwards.

    Tiny models gain nothing from threads and the test machine's cores are shared. A module opts in with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``. It is not for every module: test_extract checks
    how spectra.svd splits work over ``torch.get_num_threads()`` threads, which one thread would skip.
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
