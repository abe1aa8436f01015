"""``collapse-train run`` and ``collapse-train presets`` through click's CliRunner."""

from __future__ import annotations

import json
import re
import shutil
import tomllib
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from helpers import read_jsonl, tiny_overrides
from safetensors import safe_open
from safetensors.torch import load_file

import trainer.train as train_mod
from cli.train import main
from cli.train.run import count_parameters, run
from trainer.checkpoint import list_checkpoints
from trainer.config import load_config, model_config_from_dict, preset_names
from trainer.model import LLM

DOCS = Path(__file__).resolve().parent.parent / "docs" / "training.md"

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_args(tiny_data_dir, tiny_vocab) -> list[str]:
    sets = tiny_overrides(tiny_vocab, log_every=2)
    return ["--data", str(tiny_data_dir), "--tokens", "768", "--no-progress", *(f"--set={s}" for s in sets)]


def invoke(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def listing(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_args) -> tuple[Path, LLM]:
    """A CLI run, and the model object it trained (captured by wrapping the class the loop builds)."""
    built: list[LLM] = []

    class CapturedLLM(LLM):
        def __init__(self, cfg, **kwargs):
            super().__init__(cfg, **kwargs)
            built.append(self)

    mp = pytest.MonkeyPatch()
    mp.setattr(train_mod, "LLM", CapturedLLM)
    try:
        out = tmp_path_factory.mktemp("cli-runs") / "my-run"
        result = invoke("run", "tiny", *tiny_args, "--out", str(out), "--seed", "7")
    finally:
        mp.undo()
    assert result.exit_code == 0, result.output
    assert f"trained my-run: {out}" in result.output
    return out, built[0]


# ----------------------------------------------------------------------------------------------------
# run


def test_run_writes_the_run_directory(trained):
    out, _ = trained
    assert sorted(p.name for p in out.iterdir()) == [
        "checkpoints",
        "config.toml",
        "metrics.jsonl",
        "resume",
        "run.json",
    ]
    cfg = tomllib.loads((out / "config.toml").read_text())
    assert cfg["name"] == "my-run"  # the run directory names the run
    assert cfg["train"]["tokens"] == 768 and cfg["train"]["seed"] == 7  # --tokens and --seed
    assert cfg["preset"] == "tiny"
    assert json.loads((out / "run.json").read_text())["status"] == "completed"
    # the plan's 0, 0.5/25, ..., 25/25 of 768 tokens, each at the first 128-token step reaching it
    assert [t for t, _ in list_checkpoints(out / "checkpoints")] == [0, 128, 256, 384, 512, 640, 768]
    lines = read_jsonl(out / "metrics.jsonl")
    assert {r["kind"] for r in lines} == {"train", "val"}


def test_checkpoint_alone_rebuilds_the_trained_model(trained):
    out, model = trained
    path = list_checkpoints(out / "checkpoints")[-1][1]
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    rebuilt = LLM(model_config_from_dict(json.loads(meta["model_config"])))
    rebuilt.load_state_dict(load_file(str(path)), strict=True)
    idx = torch.randint(0, model.cfg.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    model.eval(), rebuilt.eval()
    with torch.no_grad():
        assert torch.equal(rebuilt(idx), model(idx))


def test_set_name_wins_over_the_directory_name(tmp_path, tiny_args):
    out = tmp_path / "dir-name"
    result = invoke("run", "tiny", *tiny_args, "--out", str(out), "--set", "name=custom", "--tokens", "128")
    assert result.exit_code == 0, result.output
    assert tomllib.loads((out / "config.toml").read_text())["name"] == "custom"


def test_a_toml_file_works_like_a_preset(tmp_path, tiny_args, trained):
    out = tmp_path / "from-toml"
    result = invoke("run", str(trained[0] / "config.toml"), *tiny_args, "--out", str(out), "--tokens", "128")
    assert result.exit_code == 0, result.output
    assert (out / "checkpoints" / "tokens_000000000128.safetensors").exists()


def test_unknown_set_key_is_named(tmp_path, tiny_args):
    result = invoke("run", "tiny", *tiny_args, "--out", str(tmp_path / "r"), "--set", "optim.learning_rate=1")
    assert result.exit_code == 1
    assert "optim.learning_rate" in result.output
    assert not (tmp_path / "r").exists()


def test_wrong_type_is_named(tmp_path, tiny_args):
    result = invoke("run", "tiny", *tiny_args, "--out", str(tmp_path / "r"), "--set", "train.batch_size=many")
    assert result.exit_code == 1
    assert "train.batch_size" in result.output and "many" in result.output


def test_unknown_preset(tmp_path, tiny_args):
    result = invoke("run", "huge", *tiny_args, "--out", str(tmp_path / "r"))
    assert result.exit_code == 1 and "'huge'" in result.output


@pytest.mark.parametrize("command", ["run", "study"])
@pytest.mark.parametrize("kind", ["binary", "directory"])
def test_a_binary_file_or_a_directory_as_config_is_one_line(tmp_path, tiny_args, command, kind):
    if kind == "binary":  # a PNG's signature: 0x89 is no UTF-8 start byte
        given = tmp_path / "image.toml"
        given.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
        expected = f"{given}: not a TOML file (TOML is UTF-8 text; byte 0x89 at offset 0 is not UTF-8"
    else:  # a run directory passed where its config file was meant
        given = tmp_path / "some-run"
        (given / "checkpoints").mkdir(parents=True)
        expected = f"{given} is a directory, not a TOML file"
    out = tmp_path / "out"
    args = [command, str(given), "--out", str(out)] + (tiny_args if command == "run" else [])
    result = invoke(*args)
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"Error: {expected}"), result.output
    assert not out.exists()


def test_existing_run_dir_is_refused_and_untouched(tmp_path, tiny_args, trained):
    out = tmp_path / "copy"
    shutil.copytree(trained[0], out)
    before = listing(out)
    result = invoke("run", "tiny", *tiny_args, "--out", str(out))
    assert result.exit_code == 1
    assert str(out) in result.output and "--resume" in result.output
    assert listing(out) == before


def test_missing_dataset(tmp_path, tiny_args):
    args = [a if a != tiny_args[1] else str(tmp_path / "no-data") for a in tiny_args]
    result = invoke("run", "tiny", *args, "--out", str(tmp_path / "r"))
    assert result.exit_code == 1 and "no-data" in result.output


def test_corrupt_dataset_names_the_file(tmp_path, tiny_args, tiny_data_dir):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_data_dir, broken)
    train_bin = broken / "train.bin"
    train_bin.write_bytes(train_bin.read_bytes()[:-2])  # one token short
    args = [a if a != str(tiny_data_dir) else str(broken) for a in tiny_args]
    result = invoke("run", "tiny", *args, "--out", str(tmp_path / "r"))
    assert result.exit_code == 1 and str(train_bin) in result.output
    assert not (tmp_path / "r").exists()


def test_eval_batch_longer_than_the_context(tmp_path, tiny_args, tiny_data_dir):
    # tiny_data_dir's eval batch is 2 x 32 tokens
    out = tmp_path / "r"
    sets = ["--set", "model.context_length=16", "--set", "train.seq_len=16"]
    result = invoke("run", "tiny", *tiny_args, "--out", str(out), *sets)
    assert result.exit_code == 1
    assert "eval batch" in result.output and "32 tokens but model.context_length=16" in result.output
    assert "--eval-seq-len 16" in result.output and not out.exists()


def test_vocab_mismatch(tmp_path, tiny_args, tiny_data_dir, tiny_vocab):
    result = invoke("run", "tiny", *tiny_args, "--out", str(tmp_path / "r"), "--set", "model.vocab_size=4096")
    assert result.exit_code == 1
    assert f"model.vocab_size=4096 but dataset {tiny_data_dir} has {tiny_vocab} tokens" in result.output
    assert f"--set model.vocab_size={tiny_vocab}" in result.output


def test_unwritable_output(tmp_path, tiny_args):
    # we run as root here, so a read-only directory would not stop us: a regular file in the path does
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    result = invoke("run", "tiny", *tiny_args, "--out", str(blocker / "run"))
    assert result.exit_code == 1
    assert "cannot write the run directory" in result.output and str(blocker / "run") in result.output


def test_output_that_is_a_file(tmp_path, tiny_args):
    blocker = tmp_path / "file"
    blocker.write_text("keep")
    result = invoke("run", "tiny", *tiny_args, "--out", str(blocker))
    assert result.exit_code == 1 and "not a directory" in result.output
    assert blocker.read_text() == "keep"


def test_divergence_stops_with_a_message_and_keeps_checkpoints(tmp_path, tiny_args):
    out = tmp_path / "boom"
    result = invoke(
        "run", "tiny", *tiny_args, "--out", str(out), "--set", "optim.lr=1e30", "--set", "optim.muon_lr=1e30"
    )
    assert result.exit_code == 1
    m = re.search(r"non-finite (?:loss|gradient norm) at step (\d+)", result.output)
    assert m, result.output
    kept = list_checkpoints(out / "checkpoints")
    assert kept and kept[0][0] == 0
    assert f"last good checkpoint: {kept[-1][1]}" in result.output
    assert all(t < int(m.group(1)) * 128 for t, _ in kept)  # nothing at or after the bad step
    assert all(torch.isfinite(v).all() for _, p in kept for v in load_file(str(p)).values())
    assert json.loads((out / "run.json").read_text())["status"] == "diverged"


def test_resume_flag_on_an_empty_directory_starts_the_run(tmp_path, tiny_args):
    (tmp_path / "empty").mkdir()
    result = invoke("run", "tiny", *tiny_args, "--out", str(tmp_path / "empty"), "--resume")
    assert result.exit_code == 0, result.output
    assert "yet: starting at step 0" in result.output and "trained empty" in result.output


def test_resume_flag_on_a_completed_run_does_nothing(tmp_path, tiny_args, trained):
    out = tmp_path / "again"
    shutil.copytree(trained[0], out)
    # the copy's directory name differs from the run's name, which is part of the config
    result = invoke(
        "run",
        str(out / "config.toml"),
        *tiny_args,
        "--out",
        str(out),
        "--resume",
        "--seed",
        "7",
        "--set",
        "name=my-run",
    )
    assert result.exit_code == 0, result.output
    assert "already completed at step 6: nothing to do" in result.output and "trained" not in result.output
    run_json = json.loads((out / "run.json").read_text())
    assert len(run_json["segments"]) == 1 and run_json["status"] == "completed"


def test_resume_with_a_changed_config_names_the_key(tmp_path, tiny_args, trained):
    out = tmp_path / "changed"
    shutil.copytree(trained[0], out)
    result = invoke("run", "tiny", *tiny_args, "--out", str(out), "--resume", "--seed", "8")
    assert result.exit_code == 1 and "train.seed: 7 (saved) != 8 (now)" in result.output


# ----------------------------------------------------------------------------------------------------
# presets, help, docs


def test_presets_lists_every_preset_with_its_size():
    result = invoke("presets")
    assert result.exit_code == 0
    lines = result.output.strip().splitlines()
    assert [line.split()[0] for line in lines] == preset_names()
    tiny = next(line for line in lines if line.startswith("tiny"))
    assert "1.2M" in tiny and "seconds per thousand tokens" in tiny
    paper = next(line for line in lines if line.startswith("paper-88m"))
    assert "88.6M" in paper


def test_parameter_count_matches_a_built_model():
    assert count_parameters("tiny") == LLM(load_config("tiny").model).num_params()


def test_every_run_option_is_documented():
    text = DOCS.read_text()
    assert "collapse-train run" in text and "collapse-train presets" in text
    for param in run.params:
        for opt in getattr(param, "opts", []):
            if opt.startswith("--"):
                assert opt in text, f"{opt} is not documented in {DOCS}"
