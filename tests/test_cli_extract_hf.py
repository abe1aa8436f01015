"""``collapse-spectra extract`` on public models, then ``metrics`` and ``report`` on the cubes it wrote."""

from __future__ import annotations

import csv
import io

import pytest
import xarray as xr
from click.testing import CliRunner

pytest.importorskip("transformers")

from cli.spectra import main  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_extract_metrics_report(hf_revisions, hf_data_dir, tmp_path):
    cubes = []
    for family in ("olmo2", "llama"):
        out = tmp_path / f"{family}.nc"
        result = invoke(
            "extract",
            hf_revisions(family),
            "--batch",
            hf_data_dir,
            "--out",
            out,
            "--revisions",
            "step0,step1000",
            "--no-progress",
        )
        assert result.exit_code == 0, result.output
        assert result.output.splitlines() == [
            str(out),
            "added steps: 0, 1000",
            "skipped steps (already in the cube): none",
        ]
        cubes.append(out)
    again = invoke(
        "extract", hf_revisions("olmo2"), "--batch", hf_data_dir, "--out", cubes[0], "--revisions", "step1000"
    )
    assert again.exit_code == 0 and "skipped steps (already in the cube): 1000" in again.output
    # one revision directory on its own is a model of its own name: it does not go into olmo2's cube
    alone = invoke("extract", hf_revisions("olmo2") / "step1000", "--batch", hf_data_dir, "--out", cubes[0])
    assert alone.exit_code == 1 and "this extraction has model_id='step1000'" in alone.output
    result = invoke("metrics", *cubes, "--site", "unit", "--format", "csv")
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(io.StringIO(result.output)))
    names = [hf_revisions(f).name for f in ("olmo2", "llama")]
    assert {(r["run"], r["step"]) for r in rows} == {(n, s) for n in names for s in ("0", "1000")}
    assert all(r["tokens"] == "" or r["tokens"] == "nan" for r in rows)  # unknown: no rule for these names
    assert {r["heads"] for r in rows if r["run"] == names[1]} == {"0"}  # no QK-norm: no unit site
    result = invoke("report", *cubes, "-o", tmp_path / "report")
    assert result.exit_code == 0, result.output
    text = (tmp_path / "report" / "report.md").read_text()
    assert f"pretraining data of {hf_revisions('olmo2').name}" in text and "unknown" in text


def test_public_model_options_and_errors(hf_revisions, hf_data_dir, tmp_path):
    root = hf_revisions("llama")
    result = invoke("extract", root, "--batch", hf_data_dir)
    assert result.exit_code == 2 and "needs --batch DATA_DIR and --out CUBE.nc" in result.output
    result = invoke("extract", tmp_path, "--revisions", "step0", "--dtype", "float16")
    assert result.exit_code == 2 and "--revisions, --dtype: only for public models" in result.output
    result = invoke("extract", "hf:", "--batch", hf_data_dir, "--out", tmp_path / "c.nc")
    assert result.exit_code == 1 and "not a hub model name" in result.output
    out = tmp_path / "c.nc"
    result = invoke(
        "extract",
        root,
        "--batch",
        hf_data_dir,
        "--out",
        out,
        "--revisions",
        "step1000",
        "--dtype",
        "bfloat16",
        "--tokens-per-step",
        "64",
        "--drop-first",
        "1",
        "--no-progress",
    )
    assert result.exit_code == 0, result.output
    cube = xr.load_dataset(out)
    assert (cube.attrs["dtype"], cube.attrs["drop_first"], cube.tokens.values.tolist()) == (
        "bfloat16",
        1,
        [64000],
    )
