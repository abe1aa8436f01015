"""Datasets: the dataset directory's contract and how one is prepared from text.

- :mod:`trainer.data.dataset`: the contract (files, ``meta.json``), :class:`~trainer.data.dataset.TokenDataset`,
  and the batches cut from a split (:func:`~trainer.data.dataset.batch_at`,
  :func:`~trainer.data.dataset.fixed_batches`). The trainer reads datasets through this module only.
- :mod:`trainer.data.prepare`: ``collapse-train prepare-data``, from sources to a dataset directory, built
  beside its target and renamed into place.
- :mod:`trainer.data.sources`: ``--source`` specs and reading records from them;
  :mod:`trainer.data.bible` the embedded corpus.
- :mod:`trainer.data.filters`: which documents are kept and which split each lands in.
- :mod:`trainer.data.tokenizer`: a BPE trained on the data, or an existing tokenizer.
"""
