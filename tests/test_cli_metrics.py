"""``collapse-spectra metrics`` and the library summary behind it, on cubes with spectra of known metrics."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from helpers import CENTERINGS, N_TOKENS, SITES, make_cube, write_cube

import spectra
from cli.spectra.metrics import metrics as metrics_command
from spectra.analysis.summary import summary_table
from spectra.errors import SpectraError

STEPS = (0, 10, 20)
TOKENS_PER_STEP = 512
N_LAYERS, N_KV_HEADS, HEAD_DIM = 2, 3, 8


def known_rank(i: int, layer: int, head: int) -> int:
    """Rank r of the spectrum (1, ..., 1, 0, ..., 0) at step index i, layer and kv head: PR = r in both."""
    return 1 + (i + 2 * layer + 3 * head) % HEAD_DIM


def known_k_sv() -> np.ndarray:
    """Keys at (normed, uncentered) have rank known_rank; every other site and centring is flat (PR = D)."""
    k = np.ones((len(STEPS), N_LAYERS, N_KV_HEADS, len(SITES), len(CENTERINGS), HEAD_DIM))
    for i in range(len(STEPS)):
        for layer in range(N_LAYERS):
            for head in range(N_KV_HEADS):
                r = known_rank(i, layer, head)
                k[i, layer, head, SITES.index("normed"), CENTERINGS.index("uncentered"), r:] = 0.0
    return k


def expected_rows(run: str, steps=STEPS, step_indices=None) -> list[dict]:
    """The summary by hand: per layer over heads, then over every head of every layer."""
    rows = []
    for i, step in zip(step_indices or range(len(steps)), steps):
        ranks = {(layer, h): known_rank(i, layer, h) for layer in range(N_LAYERS) for h in range(N_KV_HEADS)}
        scopes = [(str(layer), [(layer, h) for h in range(N_KV_HEADS)]) for layer in range(N_LAYERS)]
        scopes.append(("all", list(ranks)))
        for label, keys in scopes:
            values = [ranks[key] for key in keys]
            low = keys[values.index(min(values))]
            high = keys[values.index(max(values))]
            rows.append(
                {
                    "run": run,
                    "step": step,
                    "tokens": step * TOKENS_PER_STEP,
                    "layer": label,
                    "mean": sum(values) / len(values),
                    "min": min(values),
                    "min_layer": low[0],
                    "min_head": low[1],
                    "max": max(values),
                    "max_layer": high[0],
                    "max_head": high[1],
                    "heads": len(values),
                }
            )
    return rows


@pytest.fixture
def cube(tmp_path: Path) -> Path:
    ds = make_cube(
        run_name="A1",
        steps=STEPS,
        tokens_per_step=TOKENS_PER_STEP,
        n_layers=N_LAYERS,
        n_heads=6,
        n_kv_heads=N_KV_HEADS,
        head_dim=HEAD_DIM,
        k_sv=known_k_sv(),
    )
    return write_cube(tmp_path / "runs" / "A1" / "spectra.nc", ds)


def run_cli(*args: str | Path):
    return CliRunner().invoke(metrics_command, [str(a) for a in args])


def read_csv(output: str) -> pd.DataFrame:
    return pd.read_csv(io.StringIO(output), dtype={"layer": str})


def assert_rows(df: pd.DataFrame, rows: list[dict]) -> None:
    expected = pd.DataFrame(rows)
    got = df[expected.columns].reset_index(drop=True)
    got = got.astype({"layer": str, "min_layer": int, "min_head": int, "max_layer": int, "max_head": int})
    pd.testing.assert_frame_equal(got, expected, check_dtype=False, rtol=1e-12)


# --------------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("metric", ["pr_sv", "pr_eig", "effective_rank"])
def test_csv_holds_the_known_values(cube: Path, metric: str) -> None:
    result = run_cli(cube, "--metric", metric, "--format", "csv")
    assert result.exit_code == 0, result.output
    df = read_csv(result.output)
    assert_rows(df, expected_rows("A1"))
    assert set(df["metric"]) == {metric} and set(df["var"]) == {"k_sv"}
    assert set(df["site"]) == {"normed"} and set(df["centering"]) == {"uncentered"}


def test_csv_energy_rank_and_other_sites(cube: Path) -> None:
    result = run_cli(cube, "--metric", "energy_rank_90", "--format", "csv")
    df = read_csv(result.output)
    ranks = np.array([known_rank(i, 0, h) for i in range(len(STEPS)) for h in range(N_KV_HEADS)])
    layer0 = df[df.layer == "0"]
    np.testing.assert_allclose(layer0["mean"], np.ceil(0.9 * ranks).reshape(len(STEPS), -1).mean(axis=1))
    # every other site is flat at full rank
    for site, centering in (("rope", "uncentered"), ("normed", "centered")):
        result = run_cli(cube, "--site", site, "--centering", centering, "--format", "csv")
        df = read_csv(result.output)
        assert (df["mean"] == HEAD_DIM).all() and (df["min"] == HEAD_DIM).all(), (site, centering)


def test_table_is_aligned_and_titled(cube: Path) -> None:
    result = run_cli(cube)
    assert result.exit_code == 0, result.output
    title, header, *rows = result.output.rstrip("\n").split("\n")
    assert title == (
        "pr_sv of k_sv at site normed, uncentered (N = 24 tokens per head, head_dim 8): "
        "mean, min and max over heads"
    )
    columns = "run step tokens layer mean min min_layer min_head max max_layer max_head heads"
    assert header.split() == columns.split()
    assert len(rows) == len(STEPS) * (N_LAYERS + 1)
    assert len({len(line) for line in [header, *rows]}) == 1  # columns aligned
    # step 10, layer 1: ranks 1 + (1 + 2 + 3h) % 8 = 4, 7, 2 -> mean 13/3, min 2 at head 2, max 7 at head 1
    assert rows[4].split() == ["A1", "10", "5120", "1", "4.33333", "2", "1", "2", "7", "1", "1", "3"]
    assert rows[5].split()[3] == "all"


def test_several_cubes_with_different_steps(cube: Path, tmp_path: Path) -> None:
    other = make_cube(
        run_name="B1",
        optimizer="adamw",
        steps=(0, 20),
        tokens_per_step=TOKENS_PER_STEP,
        n_layers=N_LAYERS,
        n_heads=6,
        n_kv_heads=N_KV_HEADS,
        head_dim=HEAD_DIM,
        k_sv=known_k_sv()[[0, 2]],
    )
    second = write_cube(tmp_path / "runs" / "B1" / "spectra.nc", other)
    result = run_cli(cube, second.parent, "--format", "csv")
    assert result.exit_code == 0, result.output
    df = read_csv(result.output)
    assert df["run"].tolist() == ["A1"] * 9 + ["B1"] * 6  # B1 has no step 10: no rows for it
    assert (df["n_tokens"] == N_TOKENS).all() and (df["head_dim"] == HEAD_DIM).all()
    assert_rows(df[df.run == "B1"], expected_rows("B1", steps=(0, 20), step_indices=[0, 2]))
    # a directory of runs gives the same
    assert run_cli(tmp_path / "runs", "--format", "csv").output == result.output


def test_weights_have_no_site(cube: Path) -> None:
    result = run_cli(cube, "--var", "wk_sv", "--metric", "stable_rank", "--format", "csv")
    assert result.exit_code == 0, result.output
    df = read_csv(result.output)
    assert df["site"].isna().all() and df["centering"].isna().all()
    assert df["n_tokens"].isna().all() and (df["head_dim"] == HEAD_DIM).all()  # a weight has no tokens
    assert (df["heads"] == np.r_[[N_KV_HEADS] * N_LAYERS, N_LAYERS * N_KV_HEADS].tolist() * len(STEPS)).all()
    table = run_cli(cube, "--var", "wq_sv")
    assert table.exit_code == 0 and table.output.startswith("pr_sv of wq_sv (head_dim 8): mean")
    bad = run_cli(cube, "--var", "wk_sv", "--site", "rope")
    assert bad.exit_code == 1 and "wk_sv has no 'site' dimension" in bad.output


def test_runs_of_different_n_tokens_show_it_per_row(cube: Path, tmp_path: Path) -> None:
    other = make_cube(run_name="B1", n_heads=6, n_kv_heads=N_KV_HEADS, head_dim=HEAD_DIM, n_layers=N_LAYERS)
    other.attrs["n_tokens"] = 4 * N_TOKENS
    second = write_cube(tmp_path / "runs" / "B1" / "spectra.nc", other)
    table = run_cli(cube, second)
    assert table.exit_code == 0, table.output
    title, header, *rows = table.output.rstrip("\n").split("\n")
    assert "(head_dim 8)" in title and "N =" not in title
    assert header.split()[-1] == "n_tokens"
    assert {row.split()[-1] for row in rows} == {str(N_TOKENS), str(4 * N_TOKENS)}


def test_undefined_site_shows_nan_and_no_heads(tmp_path: Path) -> None:
    path = write_cube(tmp_path / "A2" / "spectra.nc", make_cube(run_name="A2", qk_norm="none"))
    df = read_csv(run_cli(path, "--site", "unit", "--format", "csv").output)
    assert df["mean"].isna().all() and (df["heads"] == 0).all() and df["min_head"].isna().all()
    table = run_cli(path, "--site", "unit")
    assert table.exit_code == 0 and "NaN" in table.output and "<NA>" in table.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["{missing}"], "no such cube file"),
        (["{text}"], "not a readable NetCDF file"),
        (["{cube}", "--metric", "pr"], "unknown metric 'pr'"),
        (
            ["{cube}", "--site", "after"],
            "unknown site 'after' for k_sv; the cube has proj, unit, normed, rope",
        ),
        (["{cube}", "--centering", "both"], "unknown centering 'both'"),
    ],
)
def test_errors_exit_1_with_a_message(cube: Path, tmp_path: Path, args: list[str], message: str) -> None:
    text = tmp_path / "notes.nc"
    text.write_text("hello")
    paths = {"missing": tmp_path / "missing.nc", "text": text, "cube": cube}
    result = run_cli(*[a.format(**paths) for a in args])
    assert result.exit_code == 1
    assert message in result.output and "Traceback" not in result.output


# --------------------------------------------------------------------------------------------------------
# the library function
# --------------------------------------------------------------------------------------------------------


def test_summary_of_one_cube_equals_summary_of_the_combination(cube: Path) -> None:
    one = summary_table(spectra.open_cube(cube))
    combined = spectra.open_cubes([cube]).spectra.summary_table()
    pd.testing.assert_frame_equal(one, combined)
    assert one.attrs == {"metric": "pr_sv", "var": "k_sv", "site": "normed", "centering": "uncentered"}


def test_summary_skips_undefined_heads_and_counts_them(cube: Path) -> None:
    ds = spectra.open_cube(cube)
    k = ds.k_sv.values.copy()
    k[1, 0, 2] = 0.0  # step 10, layer 0, head 2: an all-zero spectrum has no participation ratio
    df = summary_table(ds.assign(k_sv=(ds.k_sv.dims, k)))
    row = df[(df.step == 10) & (df.layer == 0)].iloc[0]
    ranks = [known_rank(1, 0, h) for h in range(2)]  # heads 0 and 1
    assert row["heads"] == 2 and row["mean"] == pytest.approx(np.mean(ranks))
    assert row["min"] == min(ranks) and row["max"] == max(ranks)
    assert df[(df.step == 10) & (df.layer == "all")].iloc[0]["heads"] == N_LAYERS * N_KV_HEADS - 1


def test_summary_rejects_unknown_variables(cube: Path) -> None:
    with pytest.raises(SpectraError, match="no variable 'v_sv'.*q_sv, k_sv, wq_sv, wk_sv"):
        summary_table(spectra.open_cube(cube), var="v_sv")
    with pytest.raises(SpectraError, match="expected step, layer and head"):
        summary_table(spectra.open_cube(cube), var="k_gamma")
