"""Spectra of public models, read through ``transformers`` (the optional ``hf`` extra).

- :mod:`spectra.hf.adapters`: the per-family table of where queries, keys, QK-norm and RoPE live;
- :mod:`spectra.hf.revisions`: hub names and local directories, revisions, steps and tokens;
- :mod:`spectra.hf.tokenizer`: the eval batch's tokenizer compared with the model's, by content;
- :mod:`spectra.hf.capture`: the forward pass that records every read-out site;
- :mod:`spectra.hf.extract`: cubes in the schema of ``docs/cube.md``, one step per revision.

Importing this package does not import ``transformers``; the functions that need it say which extra
installs it when it is missing. See ``docs/public-models.md``.
"""
