"""Downstream evals through lm-eval: tiny local tasks built here, scores checked against log-likelihoods computed
directly with the model, the results file, incrementality, and the errors."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import perturbed_llm, tiny_model_config

pytest.importorskip("lm_eval", reason="the optional 'eval' extra (scripts/test.sh installs it)")

from tokenizers import Tokenizer  # noqa: E402

from spectra.errors import SpectraError  # noqa: E402
from spectra.evals import results as evals_io  # noqa: E402
from spectra.evals import run as spectra_evals  # noqa: E402
from spectra.evals.run import (  # noqa: E402
    evaluate,
    evaluate_checkpoint,
    parse_num_fewshot,
    resolve_eval_inputs,
    task_manager_for,
)
from spectra.extract.load import load_checkpoint  # noqa: E402
from trainer.checkpoint import save_checkpoint  # noqa: E402
from trainer.config import OptimConfig, RunConfig, TrainConfig  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

CONTEXT = 32  # short, so that some task contexts must be truncated from the left

MC_DOCS = [
    {"query": "The big cat sees", "choices": ["the dog.", "the small red fish.", "a cow."], "label": 0},
    {"query": "The old horse", "choices": ["chases the goat.", "likes.", "sees the tiger."], "label": 2},
    {
        "query": "The quick fox meets",
        "choices": ["the owl.", "the happy duck.", "the slow bear."],
        "label": 1,
    },
    {"query": "A sad frog", "choices": ["feeds the lion.", "calls the wolf.", "helps."], "label": 0},
    {
        "query": " ".join(["The young sheep follows the green bird."] * 6) + " The cow",  # > CONTEXT tokens
        "choices": ["watches the fish.", "finds the dog."],
        "label": 1,
    },
]
CLOZE_DOCS = [
    {"text": "The small dog sees the big cat"},
    {"text": "The red bird chases the slow fish"},
    {"text": "The happy lion meets the old wolf"},
    {
        "text": " ".join(["The green frog helps the duck."] * 8) + " The owl calls the goat"
    },  # > CONTEXT tokens
]
ROLLING_DOCS = [
    {"text": "The cat sees the dog."},
    {"text": " ".join(["The big horse likes the small sheep."] * 12)},  # several windows of CONTEXT tokens
]


def write_task(directory: Path, name: str, docs: list[dict], body: str) -> None:
    """A task YAML whose dataset is a local JSON-lines file, lm-eval's own mechanism for local data."""
    data = directory / f"{name}.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    (directory / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        f"test_split: test\n{body}\nmetadata:\n  version: 2.0\n"
    )


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("tasks")
    write_task(
        directory,
        "tiny_mc",
        MC_DOCS,
        'output_type: multiple_choice\ndoc_to_text: "{{query}}"\ndoc_to_target: "{{label}}"\n'
        'doc_to_choice: "{{choices}}"\nmetric_list:\n  - metric: acc\n  - metric: acc_norm',
    )
    write_task(
        directory,
        "tiny_cloze",
        CLOZE_DOCS,
        "output_type: loglikelihood\ndoc_to_text: \"{{text.split(' ')[:-1]|join(' ')}}\"\n"
        "doc_to_target: \"{{' '+text.split(' ')[-1]}}\"\nmetric_list:\n"
        "  - metric: perplexity\n    aggregation: perplexity\n    higher_is_better: false\n"
        "  - metric: acc\n    aggregation: mean\n    higher_is_better: true",
    )
    write_task(
        directory,
        "tiny_rolling",
        ROLLING_DOCS,
        'output_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: "{{text}}"\n'
        "metric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte",
    )
    write_task(
        directory,
        "tiny_generate",
        CLOZE_DOCS,
        'output_type: generate_until\ndoc_to_text: "{{text}}"\ndoc_to_target: "{{text}}"\n'
        "metric_list:\n  - metric: exact_match",
    )
    (directory / "tiny_group.yaml").write_text("group: tiny_group\ntask:\n  - tiny_mc\n  - tiny_cloze\n")
    return directory


@pytest.fixture(scope="module")
def eval_run(tmp_path_factory, tiny_data_dir: Path, tiny_vocab: int) -> Path:
    """A run directory with two checkpoints of a perturbed model over the tiny dataset's tokenizer."""
    cfg = tiny_model_config(vocab_size=tiny_vocab, context_length=CONTEXT)
    meta = json.loads((tiny_data_dir / "meta.json").read_text())
    run_cfg = RunConfig(
        name="eval-run",
        model=cfg,
        optim=OptimConfig(name="adamw"),
        train=TrainConfig(tokens=4096, batch_size=2, seq_len=CONTEXT, seed=3),
    ).validate()
    run = tmp_path_factory.mktemp("runs") / "eval-run"
    for step in (0, 10):
        save_checkpoint(
            run / "checkpoints" / f"tokens_{step * 64:012d}.safetensors",
            perturbed_llm(cfg, seed=50 + step).eval(),
            {
                "model_config": dataclasses.asdict(cfg),
                "run_config": run_cfg.to_dict(),
                "run_name": "eval-run",
                "step": step,
                "tokens": step * 64,
                "eval_batch_sha256": meta["eval_batch"]["sha256"],
                "data_dir": str(tiny_data_dir),
                "dataset": {
                    "name": "tiny",
                    "tokenizer": meta["tokenizer"],
                    "eot_id": meta["tokenizer"]["eot_id"],
                },
            },
        )
    return run


# --------------------------------------------------------------------------------------------------
# scores against the model's own log-likelihoods
# --------------------------------------------------------------------------------------------------


class Direct:
    """Log-likelihoods computed straight from the model, in float64, with lm-eval's context/continuation split."""

    def __init__(self, checkpoint: Path, data_dir: Path):
        self.model = load_checkpoint(checkpoint).model
        self.tok = Tokenizer.from_file(str(data_dir / "tokenizer.json"))
        self.eot = json.loads((data_dir / "meta.json").read_text())["tokenizer"]["eot_id"]

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    @torch.no_grad()
    def token_logprobs(self, ids: list[int]) -> np.ndarray:
        """log p(ids[i + 1] | ids[: i + 1]) for every i: one forward pass, at most CONTEXT tokens in."""
        assert len(ids) - 1 <= CONTEXT
        logits = self.model(torch.tensor(ids[:-1])[None]).double()[0]  # (T, V)
        logp = torch.log_softmax(logits, dim=-1)
        return logp.gather(-1, torch.tensor(ids[1:])[:, None])[:, 0].numpy()

    def pair(self, context: str, continuation: str) -> tuple[float, bool]:
        whole, n_ctx = self.encode(context + continuation), len(self.encode(context))
        n_cont = len(whole) - n_ctx
        kept = whole[-(CONTEXT + 1) :]  # the nearest CONTEXT + 1 tokens: truncated from the left
        logp = self.token_logprobs(kept)[-n_cont:]
        with torch.no_grad():
            logits = self.model(torch.tensor(kept[:-1])[None])[0, -n_cont:]
        greedy = bool((logits.argmax(-1) == torch.tensor(kept[-n_cont:])).all())
        return float(logp.sum()), greedy

    def rolling(self, text: str) -> float:
        """Every token once: the first CONTEXT after the end-of-text token, then windows of CONTEXT tokens each
        conditioned on the one token before it, the last window on as many as fit (lm-eval's scheme)."""
        ids = self.encode(text)
        total, done = self.token_logprobs([self.eot] + ids[:CONTEXT]).sum(), min(CONTEXT, len(ids))
        while done < len(ids):
            end = min(done + CONTEXT, len(ids))
            window = ids[max(end - CONTEXT - 1, 0) : end]
            total += self.token_logprobs(window)[-(end - done) :].sum()
            done = end
        return float(total)


@pytest.fixture(scope="module")
def direct(eval_run: Path, tiny_data_dir: Path) -> Direct:
    return Direct(sorted((eval_run / "checkpoints").iterdir())[-1], tiny_data_dir)


@pytest.fixture(scope="module")
def records(eval_run: Path, tasks_dir: Path) -> dict[str, dict]:
    final = sorted((eval_run / "checkpoints").iterdir())[-1]
    out = evaluate_checkpoint(
        final, ["tiny_mc", "tiny_cloze", "tiny_rolling"], include_path=[tasks_dir], batch_size=3
    )
    return {r["task"]: r for r in out}


def test_every_request_matches_the_direct_log_likelihood(
    eval_run: Path, tiny_data_dir: Path, direct: Direct
) -> None:
    from types import SimpleNamespace

    from spectra.evals.lm_eval_model import CollapseLM
    from spectra.evals.run import load_dataset_tokenizer

    ckpt = load_checkpoint(sorted((eval_run / "checkpoints").iterdir())[-1])
    tok, eot, _, _ = load_dataset_tokenizer(ckpt)
    lm = CollapseLM(ckpt.model, tok, eot, batch_size=2)
    pairs = [(d["query"], " " + c) for d in MC_DOCS for c in d["choices"]]
    pairs += [(" ".join(d["text"].split()[:-1]), " " + d["text"].split()[-1]) for d in CLOZE_DOCS]
    got = lm.loglikelihood([SimpleNamespace(args=pair) for pair in pairs], disable_tqdm=True)
    assert any(len(direct.encode(c + x)) > CONTEXT + 1 for c, x in pairs)  # some are truncated
    for pair, (ll, greedy) in zip(pairs, got):
        want_ll, want_greedy = direct.pair(*pair)
        assert ll == pytest.approx(want_ll, abs=1e-4), pair
        assert greedy == want_greedy, pair
    # an empty context is the end-of-text token, as every training document was preceded by it
    ((ll, _),) = lm.loglikelihood([SimpleNamespace(args=("", "The cat"))], disable_tqdm=True)
    assert ll == pytest.approx(direct.token_logprobs([eot, *direct.encode("The cat")]).sum(), abs=1e-4)
    with pytest.raises(SpectraError, match="exceeds the model's context length"):
        lm.loglikelihood([SimpleNamespace(args=("The", " cat" * 40))], disable_tqdm=True)


def test_multiple_choice_accuracy_matches_direct_log_likelihoods(records, direct: Direct) -> None:
    correct, correct_norm = [], []
    for doc in MC_DOCS:
        lls = np.array([direct.pair(doc["query"], " " + c)[0] for c in doc["choices"]])
        lengths = np.array([len(c) for c in doc["choices"]], dtype=float)
        correct.append(int(np.argmax(lls)) == doc["label"])
        correct_norm.append(int(np.argmax(lls / lengths)) == doc["label"])
    r = records["tiny_mc"]
    assert r["metrics"]["acc"]["value"] == pytest.approx(np.mean(correct))
    assert r["metrics"]["acc_norm"]["value"] == pytest.approx(np.mean(correct_norm))
    assert r["metrics"]["acc"]["stderr"] == pytest.approx(np.std(correct, ddof=1) / np.sqrt(len(MC_DOCS)))
    assert r["chance"] == pytest.approx(np.mean([1 / len(d["choices"]) for d in MC_DOCS]))
    assert r["n_samples"] == len(MC_DOCS) and r["output_type"] == "multiple_choice"


def test_cloze_accuracy_is_greedy_and_perplexity_matches(records, direct: Direct) -> None:
    lls, greedy = [], []
    for doc in CLOZE_DOCS:
        words = doc["text"].split(" ")
        ll, is_greedy = direct.pair(" ".join(words[:-1]), " " + words[-1])
        lls.append(ll)
        greedy.append(is_greedy)
    r = records["tiny_cloze"]
    assert r["metrics"]["acc"]["value"] == pytest.approx(np.mean(greedy))
    assert r["metrics"]["perplexity"]["value"] == pytest.approx(math.exp(-np.mean(lls)), rel=1e-5)
    assert r["metrics"]["perplexity"]["higher_is_better"] is False
    assert r["chance"] is None  # an exact-word task has no uniform-guess level worth stating


def test_rolling_log_likelihood_matches_direct_windows(records, direct: Direct) -> None:
    total_ll = sum(direct.rolling(d["text"]) for d in ROLLING_DOCS)
    words = sum(len(d["text"].split()) for d in ROLLING_DOCS)
    assert len(direct.encode(ROLLING_DOCS[1]["text"])) > 2 * CONTEXT  # the long document needs windows
    got = records["tiny_rolling"]["metrics"]["word_perplexity"]["value"]
    assert got == pytest.approx(math.exp(-total_ll / words), rel=1e-5)


def test_records_say_how_the_scores_were_made(records, eval_run: Path) -> None:
    r = records["tiny_mc"]
    import lm_eval

    assert r["lm_eval_version"] == lm_eval.__version__ and r["task_version"] == 2.0
    assert r["num_fewshot"] == 0 and r["requested_num_fewshot"] is None and r["limit"] is None
    assert r["checkpoint"] == "tokens_000000000640.safetensors" and (r["step"], r["tokens"]) == (10, 640)
    assert len(r["checkpoint_sha256"]) == 64 and len(r["tokenizer_sha256"]) == 64
    assert r["device"] == "cpu" and r["batch_size"] == 3 and r["seeds"]["fewshot_seed"] == 1234


def test_generation_is_refused_clearly(eval_run: Path, tasks_dir: Path) -> None:
    with pytest.raises(SpectraError, match="generation tasks are not supported"):
        evaluate_checkpoint(
            sorted((eval_run / "checkpoints").iterdir())[-1], ["tiny_generate"], include_path=[tasks_dir]
        )


# --------------------------------------------------------------------------------------------------
# the run-level call, its file and its increments
# --------------------------------------------------------------------------------------------------


def test_evaluate_writes_one_file_per_run_incrementally(
    tmp_path: Path, eval_run: Path, tasks_dir: Path
) -> None:
    run = tmp_path / "eval-run"
    run.mkdir()
    (run / "checkpoints").symlink_to(eval_run / "checkpoints")
    lines: list[str] = []
    (first,) = evaluate(run, ["tiny_mc"], include_path=[tasks_dir], limit=2, echo=lines.append)
    assert first.path == run / "evals.json" and first.added == (
        ("tokens_000000000640.safetensors", "tiny_mc"),
    )
    data = evals_io.read_eval_results(run)
    assert data["run_name"] == "eval-run" and len(data["records"]) == 1
    assert data["records"][0]["n_samples"] == 2 and data["records"][0]["limit"] == 2
    assert "tiny_mc (0-shot, n=2): acc" in lines[0]

    # the same request again: nothing is computed, the file is untouched
    before = (run / "evals.json").read_bytes()
    (again,) = evaluate(run, ["tiny_mc"], include_path=[tasks_dir], limit=2)
    assert again.added == () and again.skipped == (("tokens_000000000640.safetensors", "tiny_mc"),)
    assert (run / "evals.json").read_bytes() == before

    # every checkpoint, and one more task: only what is missing
    (more,) = evaluate(
        run, ["tiny_mc", "tiny_cloze"], include_path=[tasks_dir], limit=2, all_checkpoints=True
    )
    assert sorted(more.added) == [
        ("tokens_000000000000.safetensors", "tiny_cloze"),
        ("tokens_000000000000.safetensors", "tiny_mc"),
        ("tokens_000000000640.safetensors", "tiny_cloze"),
    ]
    table = evals_io.eval_table([evals_io.read_eval_results(run)])
    assert sorted(set(zip(table["step"], table["task"]))) == [
        (0, "tiny_cloze"),
        (0, "tiny_mc"),
        (10, "tiny_cloze"),
        (10, "tiny_mc"),
    ]


def test_few_shot_counts_per_task_are_recorded(tmp_path: Path, eval_run: Path, tasks_dir: Path) -> None:
    run = tmp_path / "eval-run"
    run.mkdir()
    (run / "checkpoints").symlink_to(eval_run / "checkpoints")
    evaluate(run, ["tiny_mc", "tiny_cloze"], num_fewshot="tiny_mc=2", include_path=[tasks_dir], limit=2)
    by_task = {r["task"]: r for r in evals_io.read_eval_results(run)["records"]}
    assert by_task["tiny_mc"]["num_fewshot"] == 2 and by_task["tiny_mc"]["requested_num_fewshot"] == 2
    assert (
        by_task["tiny_cloze"]["num_fewshot"] == 0 and by_task["tiny_cloze"]["requested_num_fewshot"] is None
    )


def test_inputs_resolve_to_runs_and_checkpoints(tmp_path: Path, eval_run: Path) -> None:
    files = sorted((eval_run / "checkpoints").iterdir())
    (one,) = resolve_eval_inputs(eval_run)
    assert one.run_dir == eval_run and one.checkpoints == (files[-1],)
    assert resolve_eval_inputs(eval_run, all_checkpoints=True)[0].checkpoints == tuple(files)
    assert resolve_eval_inputs(files[0])[0] == one.__class__(eval_run, (files[0],))
    assert [t.run_dir for t in resolve_eval_inputs(eval_run.parent)] == [eval_run]
    with pytest.raises(SpectraError, match="no such checkpoint"):
        resolve_eval_inputs(tmp_path / "missing")
    with pytest.raises(SpectraError, match="neither a run directory"):
        resolve_eval_inputs(tmp_path)


class FakeIndex:
    """Stands in for lm-eval's index of its own ~15,000 task files, which takes up to a minute to build."""

    all_tasks = ["hellaswag", "lambada_openai"]


def test_local_tasks_never_index_lm_evals_own(monkeypatch, tasks_dir: Path) -> None:
    built = []
    real = spectra_evals._cached_task_manager.__wrapped__

    def spy(include, include_defaults):
        built.append(include_defaults)
        return FakeIndex() if include_defaults else real(include, include_defaults)

    monkeypatch.setattr(spectra_evals, "_cached_task_manager", spy)
    assert "tiny_mc" in task_manager_for(["tiny_mc"], [tasks_dir]).all_tasks and built == [False]
    assert task_manager_for(["hellaswag"], [tasks_dir]) is not None and built == [False, False, True]
    with pytest.raises(
        SpectraError, match="unknown lm-eval task.*tiny_nope.*local tasks need --include-path"
    ):
        task_manager_for(["tiny_nope"])
    with pytest.raises(SpectraError, match=f"tiny_nope.*or in {tasks_dir}"):
        task_manager_for(["tiny_nope"], [tasks_dir])


def test_an_unreachable_hub_is_one_line(monkeypatch, eval_run: Path, tasks_dir: Path) -> None:
    import lm_eval

    def offline(**kwargs):
        raise ConnectionError("Couldn't reach 'Rowan/hellaswag' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(lm_eval, "simple_evaluate", offline)
    final = sorted((eval_run / "checkpoints").iterdir())[-1]
    with pytest.raises(SpectraError, match="could not be fetched.*offline, evaluate local tasks"):
        evaluate_checkpoint(final, ["tiny_mc"], include_path=[tasks_dir])


def test_bad_requests_fail_with_one_line(
    tmp_path: Path, eval_run: Path, tasks_dir: Path, tiny_data_dir: Path
) -> None:
    final = sorted((eval_run / "checkpoints").iterdir())[-1]
    with pytest.raises(SpectraError, match="no such directory of task files"):
        evaluate_checkpoint(final, ["tiny_mc"], include_path=[tmp_path / "none"])
    with pytest.raises(SpectraError, match="tiny_group: an lm-eval group or tag, not a task"):
        evaluate_checkpoint(final, ["tiny_group"], include_path=[tasks_dir])
    with pytest.raises(SpectraError, match="limit"):
        evaluate_checkpoint(final, ["tiny_mc"], include_path=[tasks_dir], limit=0)
    other = tmp_path / "other-data"
    other.mkdir()
    (other / "tokenizer.json").write_text(
        (tiny_data_dir / "tokenizer.json").read_text().replace('"<|endoftext|>"', '"<|eot|>"')
    )
    with pytest.raises(SpectraError, match="differs from the tokenizer"):
        evaluate_checkpoint(final, ["tiny_mc"], include_path=[tasks_dir], data_dir=other)
    bad = tmp_path / "run" / "evals.json"
    bad.parent.mkdir()
    (bad.parent / "checkpoints").symlink_to(eval_run / "checkpoints")
    bad.write_text("{}")
    with pytest.raises(SpectraError, match="not an evals file"):
        evaluate(bad.parent, ["tiny_mc"], include_path=[tasks_dir])
    assert bad.read_text() == "{}"  # left as it was


def test_num_fewshot_parsing() -> None:
    tasks = ["hellaswag", "lambada_openai"]
    assert parse_num_fewshot(None, tasks) == {"hellaswag": None, "lambada_openai": None}
    assert parse_num_fewshot("5", tasks) == {"hellaswag": 5, "lambada_openai": 5}
    assert parse_num_fewshot("hellaswag=10,lambada_openai=0", tasks) == {"hellaswag": 10, "lambada_openai": 0}
    for bad, message in (("ten", "a number"), ("hellaswag=x", "task=number"), ("piqa=1", "not evaluated")):
        with pytest.raises(SpectraError, match=message):
            parse_num_fewshot(bad, tasks)


# --------------------------------------------------------------------------------------------------
# the command
# --------------------------------------------------------------------------------------------------


def test_command_scores_a_directory_of_runs(tmp_path: Path, eval_run: Path, tasks_dir: Path) -> None:
    from click.testing import CliRunner

    from cli.spectra import main

    run = tmp_path / "runs" / "eval-run"
    run.mkdir(parents=True)
    (run / "checkpoints").symlink_to(eval_run / "checkpoints")
    args = ["eval", str(tmp_path / "runs"), "--tasks", "tiny_mc,tiny_cloze", "--include-path", str(tasks_dir)]
    result = CliRunner().invoke(main, [*args, "--limit", "3", "--num-fewshot", "tiny_mc=1"])
    assert result.exit_code == 0, result.output
    assert f"{run / 'evals.json'}: 2 added, 0 already there" in result.output
    table = evals_io.eval_table([evals_io.read_eval_results(run)])
    assert set(table["task"]) == {"tiny_mc", "tiny_cloze"} and (table["n_samples"] == 3).all()
    assert table.set_index(["task", "metric"]).loc[("tiny_mc", "acc"), "num_fewshot"] == 1
    again = CliRunner().invoke(main, [*args, "--limit", "3", "--num-fewshot", "tiny_mc=1"])
    assert again.exit_code == 0 and "0 added, 2 already there" in again.output
    bad = CliRunner().invoke(main, ["eval", str(run), "--tasks", "tiny_mc", "--num-fewshot", "x=1"])
    assert bad.exit_code == 1 and "not evaluated" in bad.output and "Traceback" not in bad.output


# --------------------------------------------------------------------------------------------------
# local tasks cut from a dataset
# --------------------------------------------------------------------------------------------------


def test_dataset_tasks_are_held_out_seeded_and_scored(
    tmp_path: Path, tiny_data_dir: Path, eval_run: Path
) -> None:
    from spectra.evals.tasks import N_CHOICES, read_split_documents, write_dataset_tasks

    written = write_dataset_tasks(tiny_data_dir, tmp_path / "a", n_docs=20, seed=1, min_words=5)
    assert sorted(written) == ["tiny_choice", "tiny_cloze"]
    write_dataset_tasks(tiny_data_dir, tmp_path / "b", n_docs=20, seed=1, min_words=5)
    for name in ("tiny_choice.test.jsonl", "tiny_cloze.validation.jsonl"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()  # deterministic
    test_text = " ".join(" ".join(d.split()) for d in read_split_documents(tiny_data_dir, "test"))
    choice = [
        json.loads(line) for line in (tmp_path / "a" / "tiny_choice.test.jsonl").read_text().splitlines()
    ]
    cloze = [json.loads(line) for line in (tmp_path / "a" / "tiny_cloze.test.jsonl").read_text().splitlines()]
    assert len(choice) == len(cloze) == 20
    for doc in choice:
        assert len(doc["choices"]) == N_CHOICES and len(set(doc["choices"])) == N_CHOICES
        assert (
            f"{doc['query']} {doc['choices'][doc['label']]}" in test_text
        )  # the true ending, from the test split
    for doc in cloze:
        assert doc["text"] in test_text and doc["text"].split()[-1].isalpha()
    few_shot_pool = (tmp_path / "a" / "tiny_choice.validation.jsonl").read_text()
    val_text = " ".join(" ".join(d.split()) for d in read_split_documents(tiny_data_dir, "val"))
    assert all(json.loads(line)["query"] in val_text for line in few_shot_pool.splitlines())
    # the files are lm-eval tasks: evaluated through the same call as any other
    final = sorted((eval_run / "checkpoints").iterdir())[-1]
    records = evaluate_checkpoint(
        final, ["tiny_cloze", "tiny_choice"], include_path=[tmp_path / "a"], limit=6
    )
    by_task = {r["task"]: r for r in records}
    assert by_task["tiny_choice"]["chance"] == pytest.approx(1 / N_CHOICES)
    assert 0.0 <= by_task["tiny_cloze"]["metrics"]["acc"]["value"] <= 1.0
    few = evaluate_checkpoint(final, ["tiny_choice"], include_path=[tmp_path / "a"], limit=2, num_fewshot=2)
    assert few[0]["num_fewshot"] == 2  # examples drawn from the validation split
