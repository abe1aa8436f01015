"""Local lm-eval tasks cut from a dataset's held-out text: a LAMBADA-style cloze and a HellaSwag-style choice.

Offline there is no HellaSwag or LAMBADA; what a tiny model trained on the embedded Bible corpus can be asked
is the same two questions on text of its own kind, never seen in training. ``write_dataset_tasks(data_dir,
out)`` decodes the dataset's **test** split (held out from training, and from every SVD) with its own tokenizer,
cuts it into sentences, and writes two lm-eval tasks as YAML files over local JSON-lines data, the format
``TaskManager(include_path=out)`` reads:

- ``<name>_cloze``, like ``lambada_openai``: a passage (the sentence and up to two before it) with its last word
  removed; the score is the greedy accuracy on that word (``acc``: every token of it must be the model's argmax)
  and the perplexity of it. Only sentences whose last word is at least :data:`MIN_TARGET_CHARS` letters count,
  so that the word carries content;
- ``<name>_choice``, like ``hellaswag``: the first part of a sentence (with the sentence before it), and four
  endings, the true one and three endings of other sentences of the same document and about the same length
  (within three words), drawn with a seeded generator; ``acc`` and the length-normalised ``acc_norm``. Chance
  is 1/4.

Few-shot examples come from the **validation** split, cut the same way (``fewshot_split: validation``), so no
example is also a test document. The same dataset, seed and counts give byte-identical files. These are tasks for
comparing runs with each other, not with published HellaSwag or LAMBADA numbers.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from spectra.dataset import META_FILE, TOKENIZER_FILE, read_meta, read_split
from spectra.errors import SpectraError
from spectra.fileio import atomic_write, check_writable

__all__ = [
    "MIN_SENTENCE_WORDS",
    "MIN_TARGET_CHARS",
    "N_CHOICES",
    "read_split_documents",
    "sentences",
    "write_dataset_tasks",
]

N_CHOICES = 4
"""Endings per choice question, the true one included."""
MIN_TARGET_CHARS = 3
"""Shortest last word (in letters) a cloze passage may end on."""
MIN_SENTENCE_WORDS = 8
"""Sentences shorter than this are not used as questions (they may still be the context of one)."""

_SENTENCE_END = re.compile(r"(?<=[.!?;])\s+")
_WORD = re.compile(r"^[A-Za-z]+$")
PathLike = str | os.PathLike[str]


def _meta(data_dir: Path, splits: tuple[str, ...]) -> dict[str, Any]:
    """The dataset's ``meta.json`` (:func:`spectra.dataset.read_meta`) with what the tasks need: its name, its
    tokenizer's end-of-text id, and ``splits``."""
    meta = read_meta(data_dir, splits=splits)
    for key in ("tokenizer", "name"):
        if key not in meta:
            raise SpectraError(f"{data_dir / META_FILE}: no {key!r} entry")
    return meta


def read_split_documents(data_dir: PathLike, split: str) -> list[str]:
    """The documents of one split of a dataset directory, decoded with its tokenizer, in file order.

    Every document in a split file is preceded by the end-of-text id (docs/data.md), so the documents are the
    runs of ids between those.
    """
    from tokenizers import Tokenizer

    data_dir = Path(data_dir)
    meta = _meta(data_dir, (split,))
    ids = read_split(data_dir, split, meta)
    eot = int(meta["tokenizer"]["eot_id"])
    tok = Tokenizer.from_file(str(data_dir / TOKENIZER_FILE))
    starts = np.flatnonzero(ids == eot)
    ends = np.r_[starts[1:], len(ids)]
    return [tok.decode(ids[s + 1 : e].tolist()) for s, e in zip(starts, ends) if e > s + 1]


def sentences(document: str) -> list[str]:
    """A document split after ``.``, ``!``, ``?`` and ``;``, whitespace collapsed."""
    text = " ".join(document.split())
    return [s for s in _SENTENCE_END.split(text) if s]


def _cloze_docs(documents: list[str], min_words: int) -> list[dict[str, str]]:
    docs = []
    for document in documents:
        parts = sentences(document)
        for i, sentence in enumerate(parts):
            words = sentence.rstrip(".!?;:,'\")").split(" ")
            if len(words) < min_words or not _WORD.match(words[-1]) or len(words[-1]) < MIN_TARGET_CHARS:
                continue
            passage = " ".join([*parts[max(0, i - 2) : i], " ".join(words)])
            docs.append({"text": passage})
    return docs


def _choice_docs(documents: list[str], rng: np.random.Generator, min_words: int) -> list[dict[str, Any]]:
    docs = []
    for document in documents:
        parts = sentences(document)
        items = []  # (context, true ending, ending length in words) of this document
        for i, sentence in enumerate(parts):
            words = sentence.split(" ")
            if len(words) < min_words:
                continue
            cut = int(round(0.6 * len(words)))
            context = " ".join([*parts[max(0, i - 1) : i], " ".join(words[:cut])])
            items.append((context, " ".join(words[cut:]), len(words) - cut))
        for context, ending, n in items:
            # distractors from the same document, of about the same length: the same register and topic, so
            # that neither style (Basic English against King James) nor length gives the answer away
            others = sorted({e for _, e, m in items if abs(m - n) <= 3} - {ending})
            if len(others) < N_CHOICES - 1:
                continue
            wrong = list(rng.choice(others, size=N_CHOICES - 1, replace=False))
            label = int(rng.integers(N_CHOICES))
            docs.append(
                {"query": context, "choices": [*wrong[:label], ending, *wrong[label:]], "label": label}
            )
    return docs


def _subsample(docs: list[Any], n: int | None, rng: np.random.Generator) -> list[Any]:
    if n is None or len(docs) <= n:
        return docs
    keep = np.sort(rng.choice(len(docs), size=n, replace=False))
    return [docs[i] for i in keep]


def _task_name(name: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")
    return slug or "dataset"


_CLOZE_YAML = """\
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {test}
    validation: {validation}
output_type: loglikelihood
test_split: test
validation_split: validation
fewshot_split: validation
doc_to_text: "{{{{text.split(' ')[:-1]|join(' ')}}}}"
doc_to_target: "{{{{' '+text.split(' ')[-1]}}}}"
metric_list:
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
  source: {source}
"""

_CHOICE_YAML = """\
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {test}
    validation: {validation}
output_type: multiple_choice
test_split: test
validation_split: validation
fewshot_split: validation
doc_to_text: "{{{{query}}}}"
doc_to_target: "{{{{label}}}}"
doc_to_choice: "{{{{choices}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
  source: {source}
"""


def write_dataset_tasks(
    data_dir: PathLike,
    out_dir: PathLike,
    *,
    n_docs: int | None = 500,
    seed: int = 0,
    min_words: int = MIN_SENTENCE_WORDS,
) -> dict[str, Path]:
    """Write the cloze and choice tasks of a dataset into ``out_dir``; returns ``{task name: YAML path}``.

    Parameters
    ----------
    data_dir
        A prepared dataset directory (``meta.json``, ``tokenizer.json``, ``val.bin``, ``test.bin``).
    out_dir
        Created if needed; the task files are (re)written there, each atomically: ``<task>.yaml``,
        ``<task>.test.jsonl``, ``<task>.validation.jsonl``.
    n_docs
        At most this many test documents per task (a seeded subsample), and as many few-shot candidates;
        ``None`` keeps every one.
    seed
        Seed of the distractor endings, the answer positions and the subsample.
    min_words
        Shortest sentence (in words) a question is made of.

    Raises
    ------
    SpectraError
        Not a dataset directory, or a test split too small for either task.

    Examples
    --------
    >>> write_dataset_tasks("data/bible-mix", "tasks/bible-mix")  # doctest: +SKIP
    {'bible_mix_cloze': PosixPath('tasks/bible-mix/bible_mix_cloze.yaml'), 'bible_mix_choice': ...}
    """
    data_dir, out = Path(data_dir), Path(out_dir)
    meta = _meta(data_dir, ("test", "val"))  # both splits checked before any file is written
    if n_docs is not None and n_docs < 1:
        raise SpectraError(f"n_docs must be positive or None, got {n_docs}")
    name = _task_name(str(meta["name"]))
    check_writable(out / f"{name}_cloze.yaml", "task file")  # every task file goes beside it
    source = json.dumps(
        f"{data_dir.resolve()} (eval batch sha256 {meta.get('eval_batch', {}).get('sha256')}), seed {seed}"
    )
    written = {}
    for kind, template in (("cloze", _CLOZE_YAML), ("choice", _CHOICE_YAML)):
        task = f"{name}_{kind}"
        files = {}
        for split, split_file in (("test", "test"), ("validation", "val")):
            rng = np.random.default_rng([seed, 0 if kind == "cloze" else 1, 0 if split == "test" else 1])
            documents = read_split_documents(data_dir, split_file)
            docs = (
                _cloze_docs(documents, min_words)
                if kind == "cloze"
                else _choice_docs(documents, rng, min_words)
            )
            docs = _subsample(docs, n_docs, rng)
            if len(docs) < 2:
                raise SpectraError(
                    f"{data_dir}: the {split_file} split gives {len(docs)} {kind} questions; it is too small"
                )
            path = out / f"{task}.{split}.jsonl"
            text = "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs)
            atomic_write(path, lambda tmp, text=text: tmp.write_text(text, encoding="utf-8"))
            files[split] = json.dumps(str(path.resolve()))
        yaml_text = template.format(
            task=task, test=files["test"], validation=files["validation"], source=source
        )
        written[task] = atomic_write(out / f"{task}.yaml", lambda tmp, t=yaml_text: tmp.write_text(t))
    return written
