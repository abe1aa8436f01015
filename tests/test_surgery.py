"""Pruning surgery on tiny CPU models: exactness at fraction 0, the SVD rank property, the masks, the file."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import netCDF4
import numpy as np
import pytest
import torch
import xarray as xr
from click.testing import CliRunner
from helpers import tiny_model_config
from safetensors.torch import save_file
from scipy import stats

import cli.spectra.surgery
from spectra.errors import SpectraError
from spectra.extract.load import eval_batch_sha256, load_checkpoint
from spectra.surgery.loss import evaluate_loss, loss_windows
from spectra.surgery.pruning import (
    gamma_removal_orders,
    gamma_status,
    keep_masks,
    key_singular_vectors,
    parse_layers,
    pruned_keys,
    random_removal_order,
    removal_order,
    removed_count,
)
from spectra.surgery.run import DEFAULT_FRACTIONS, run_surgery, surgery
from trainer.checkpoint import checkpoint_name, save_checkpoint
from trainer.config import ModelConfig, RunConfig, TrainConfig
from trainer.model import LLM

VOCAB, SEQ, D = 64, 32, 8
STEPS = 100


pytestmark = pytest.mark.usefixtures("one_thread")


def model_config(qk_norm: str = "learned") -> ModelConfig:
    return tiny_model_config(qk_norm, vocab_size=VOCAB, head_dim=D, context_length=SEQ, init_std=0.1)


def period3_stream(rng: np.random.Generator, n_segments: int) -> np.ndarray:
    """Random triples each repeated 11 times: the next token is the one 3 back, so keys carry the task."""
    triples = rng.integers(0, VOCAB, size=(n_segments, 3))
    return np.tile(triples, (1, 11)).ravel()


def write_dataset(root: Path, seed: int = 1) -> Path:
    """A dataset directory as the data contract describes it: meta.json, test.bin, eval_batch.safetensors."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    test = period3_stream(rng, 40).astype(np.uint16)  # 1320 tokens
    test.tofile(root / "test.bin")
    eval_ids = torch.from_numpy(period3_stream(rng, 12)[: 12 * SEQ].reshape(12, SEQ).astype(np.int64))
    save_file({"input_ids": eval_ids}, str(root / "eval_batch.safetensors"))
    meta = {
        "dtype": "uint16",
        "splits": {"test": {"file": "test.bin", "tokens": int(test.size)}},
        "eval_batch": {
            "file": "eval_batch.safetensors",
            "shape": list(eval_ids.shape),
            "sha256": eval_batch_sha256(eval_ids),
        },
        "tokenizer": {"vocab_size": VOCAB, "eot_id": 0},
    }
    (root / "meta.json").write_text(json.dumps(meta))
    return root


def write_checkpoint(run_dir: Path, model: LLM, data_dir: Path, optimizer: str = "adamw") -> Path:
    cfg = model.cfg
    run = RunConfig(name=run_dir.name, model=cfg, train=TrainConfig(seq_len=SEQ, seed=7))
    run = dataclasses.replace(run, optim=dataclasses.replace(run.optim, name=optimizer))
    meta = json.loads((data_dir / "meta.json").read_text())
    return save_checkpoint(
        run_dir / "checkpoints" / checkpoint_name(STEPS * 16 * SEQ),
        model,
        {
            "model_config": dataclasses.asdict(cfg),
            "run_config": run.to_dict(),
            "run_name": run_dir.name,
            "step": STEPS,
            "tokens": STEPS * 16 * SEQ,
            "eval_batch_sha256": meta["eval_batch"]["sha256"],
            "data_dir": str(data_dir),
        },
    )


def train(cfg: ModelConfig, steps: int = STEPS) -> LLM:
    torch.manual_seed(0)
    model = LLM(cfg)
    rng = np.random.default_rng(0)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-2, weight_decay=0.0)
    for _ in range(steps):
        stream = period3_stream(rng, 17)
        starts = rng.integers(0, stream.size - SEQ - 1, 16)
        x = torch.from_numpy(np.stack([stream[a : a + SEQ + 1] for a in starts]).astype(np.int64))  # (B, T+1)
        loss = model(x[:, :-1], x[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("data") / "period3")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_dir) -> Path:
    """A learned-QK-norm model that solves the task with attention (its gamma is no longer flat)."""
    return write_checkpoint(tmp_path_factory.mktemp("runs") / "learned", train(model_config()), data_dir)


def fresh_checkpoint(tmp_path: Path, data_dir: Path, qk_norm: str) -> Path:
    torch.manual_seed(0)
    return write_checkpoint(tmp_path / f"run-{qk_norm}", LLM(model_config(qk_norm)), data_dir)


QUICK = {"test_tokens": 512, "batch_size": 4, "progress": False}


# ---------------------------------------------------------------------------------------------------- counting


def test_removed_count_rounds_to_pairs():
    assert [removed_count(f, 64) for f in DEFAULT_FRACTIONS] == [0, 8, 16, 24, 32, 40, 48, 56]
    assert removed_count(1.0, 8) == 8
    assert removed_count(0.125, 8) == 2  # one coordinate rounds half up to one pair
    assert removed_count(0.1, 8) == 0
    assert removed_count(0.125, 8, pair_rope=False) == 1
    with pytest.raises(SpectraError, match="outside"):
        removed_count(1.5, 8)


def test_parse_layers():
    assert parse_layers("0,2-4", 6) == (0, 2, 3, 4)
    assert parse_layers("all", 3) == (0, 1, 2)
    assert parse_layers([1, 1, 0], 3) == (0, 1)
    for bad in ("5", "a", "3-1", "0,-1"):
        with pytest.raises(SpectraError, match="layers"):
            parse_layers(bad, 4)


def test_removal_order_keeps_rotary_pairs_together():
    scores = np.array([5.0, 0.1, 3.0, 0.2, 1.0, 0.1, 0.1, 9.0])  # pairs (j, j+4): 6.0, 0.2, 3.1, 9.2
    order = removal_order(scores)
    assert order.tolist() == [1, 5, 2, 6, 0, 4, 3, 7]
    assert removal_order(scores, pair_rope=False).tolist() == [1, 5, 6, 3, 4, 2, 0, 7]
    for seed in range(5):
        for head_order in random_removal_order(seed, 0, 3, D):
            for n in range(0, D + 1, 2):
                removed = set(head_order[:n].tolist())
                assert removed == removed | {(j + D // 2) % D for j in removed}  # closed under j <-> j + D/2
    draws = [random_removal_order(seed, 0, 3, D).tolist() for seed in range(3)]
    assert draws[0] != draws[1] != draws[2] and draws[0][0] != draws[0][1]  # differ by seed and by head
    assert random_removal_order(1, 0, 3, D).tolist() == draws[1]  # and are reproducible


# ---------------------------------------------------------------------------------------------------- masks


def test_gamma_masks_remove_smallest_gamma_and_are_applied(trained):
    model = load_checkpoint(trained).model
    assert gamma_status(model, [0, 1]) == "ok"
    orders = gamma_removal_orders(model, [0, 1])
    masks = keep_masks(orders, 4)  # two rotary pairs per head
    for layer in (0, 1):
        gamma = model.blocks[layer].attn.k_norm.weight.detach().abs().double().numpy()
        pair_score = gamma[: D // 2] + gamma[D // 2 :]
        smallest = np.sort(np.argsort(pair_score)[:2])
        expected = sorted([*smallest, *(smallest + D // 2)])
        for head in range(model.cfg.n_kv_heads):
            assert np.flatnonzero(masks[layer][head].numpy() == 0).tolist() == expected
        single = keep_masks(gamma_removal_orders(model, [layer], pair_rope=False), 3)[layer]
        assert np.flatnonzero(single[0].numpy() == 0).tolist() == sorted(np.argsort(gamma)[:3])
    # the hook zeroes exactly those coordinates of the normalised keys and leaves the rest bit-identical
    # (layer 1 alone, so that its input is the same with and without the mask)
    seen = {}
    idx = torch.randint(0, VOCAB, (2, SEQ))
    norm = model.blocks[1].attn.k_norm
    with torch.no_grad():
        plain = norm.register_forward_hook(lambda m, i, o: seen.__setitem__("plain", o.clone()))
        model(idx)
        plain.remove()
        with pruned_keys(model, masks={1: masks[1]}):
            after = norm.register_forward_hook(lambda m, i, o: seen.__setitem__("pruned", o.clone()))
            model(idx)
            after.remove()
    keep = masks[1].bool()  # (Hkv, D)
    assert torch.all(seen["pruned"][..., ~keep] == 0)
    assert torch.equal(seen["pruned"][..., keep], seen["plain"][..., keep])
    assert not model.blocks[1].attn.k_norm._forward_hooks  # removed on exit


def test_rotary_pairs_follow_the_models_layout():
    # every even-length prefix of a removal order is a union of the layout's rotary pairs
    for layout, partner in (("half", lambda j: (j + 4) % 8), ("interleaved", lambda j: j ^ 1)):
        orders = random_removal_order(3, 0, 2, 8, True, layout)
        for order in orders:
            for k in range(0, 8, 2):
                assert partner(order[k]) == order[k + 1]


def test_gamma_status_without_qk_norm_and_frozen(tmp_path, data_dir):
    none = load_checkpoint(fresh_checkpoint(tmp_path, data_dir, "none")).model
    assert "no QK-norm" in gamma_status(none, [0, 1])
    frozen = load_checkpoint(fresh_checkpoint(tmp_path, data_dir, "frozen")).model
    assert "frozen" in gamma_status(frozen, [0, 1])
    frozen_k = load_checkpoint(fresh_checkpoint(tmp_path, data_dir, "frozen_k")).model
    assert "key norm's gain is frozen" in gamma_status(frozen_k, [0, 1])
    untrained = load_checkpoint(fresh_checkpoint(tmp_path, data_dir, "learned")).model
    assert "equal in layer(s) 0, 1" in gamma_status(untrained, [0, 1])


# ---------------------------------------------------------------------------------------------------- svd


def test_streamed_svd_matches_direct_svd(trained, data_dir):
    model = load_checkpoint(trained).model
    ids = torch.from_numpy(
        period3_stream(np.random.default_rng(3), 6)[: 6 * SEQ].reshape(6, SEQ).astype(np.int64)
    )
    seen = {}
    k_proj = model.blocks[1].attn.k_proj
    hook = k_proj.register_forward_hook(lambda m, i, o: seen.update(x=i[0].double(), k=o.double()))
    with torch.no_grad():
        model(ids)
    hook.remove()
    K = seen["k"].reshape(-1, 2, D).transpose(0, 1)  # (Hkv, N, D), float32 keys in float64
    V, S = key_singular_vectors(model, ids, [1], batch_size=2)[1]  # three streamed batches
    # The streamed keys are float64 products of the same float32 inputs; the hooked ones float32 products, each
    # within C * 2**-24 * sum_c |x_c w_c| <= C 2**-24 ||x|| ||w|| (C = d_model terms, Cauchy-Schwarz), so
    # ||K - K_streamed||_F <= C 2**-24 ||X||_F ||W_h||_F = err, doubled for a float32 input that another batch
    # shape rounds differently. Weyl: each singular value moves by at most err; the Gram matrix in V's basis by at
    # most 2 err S_1 + err^2. Another head's or layer's keys differ by their whole size.
    C = k_proj.weight.shape[1]
    w_norm = k_proj.weight.detach().double().view(2, D, C).norm(dim=(1, 2))  # (Hkv,) ||W_h||_F
    err = (2 * C * 2**-24 * seen["x"].reshape(-1, C).norm() * w_norm)[:, None]  # (Hkv, 1)
    assert torch.all((S - torch.linalg.svdvals(K)).abs() <= err)
    gram = V.mT @ K.mT @ K @ V  # V diagonalises K^T K: V^T K^T K V = diag(S^2)
    off = (gram - torch.diag_embed(S**2)).abs()
    assert torch.all(off <= (2 * err * S[:, :1] + err**2)[..., None])


def test_svd_pruning_of_rank_deficient_heads_loses_nothing_until_the_rank(tmp_path, trained, data_dir):
    ckpt = load_checkpoint(trained)
    rank = 4
    with torch.no_grad():
        for block in ckpt.model.blocks:
            W = block.attn.k_proj.weight.view(2, D, -1)  # (Hkv, D, C)
            U, S, Vh = torch.linalg.svd(W.double(), full_matrices=False)
            W.copy_(U[..., :rank] @ torch.diag_embed(S[..., :rank]) @ Vh[..., :rank, :])  # rank-4 blocks
    path = write_checkpoint(tmp_path / "rank4", ckpt.model, data_dir)
    model = load_checkpoint(path).model
    ids = torch.randint(0, VOCAB, (4, SEQ))
    _, S = key_singular_vectors(model, ids, [0, 1])[0]
    # the keys have rank 4 up to the float32 storage of the weights: rounding each entry of the rank-4 W_h by at most
    # 2**-24 of it leaves singular values of at most 2**-24 ||W_h||_F beyond the rank, and the keys X W_h^T at most
    # ||X||_2 times those (plus float64 rounding of the SVD); a head of full rank is 1e-2 of S_1 there or more
    seen = {}
    hook = model.blocks[0].attn.k_proj.register_forward_hook(lambda m, i, o: seen.update(x=i[0].double()))
    with torch.no_grad():
        model(ids)
    hook.remove()
    weight = model.blocks[0].attn.k_proj.weight.detach().double()
    x_norm = torch.linalg.matrix_norm(seen["x"].reshape(-1, weight.shape[1]), ord=2)
    beyond = 2**-24 * weight.view(2, D, -1).norm(dim=(1, 2)) * x_norm + 1e-14 * S[:, 0]  # (Hkv,)
    assert torch.all(S[:, rank:] <= beyond[:, None])
    fractions = [n / D for n in range(D)]  # remove 0 .. 7 single directions
    ds = run_surgery(
        path, data_dir, strategies=["svd"], fractions=fractions, pair_rope=False, seeds=1, **QUICK
    )
    delta = np.abs(ds.loss.sel(strategy="svd", seed=0).values - float(ds.baseline_loss))
    assert ds.removed_dims.values.tolist() == list(range(D))
    # up to D - rank directions only null directions go: float rounding (about 1e-8 here) and nothing else. The
    # projected weights are stored in float32, each entry within 2**-24 of its value, which moves every per-token
    # loss (below 8) by about 2**-24 of it and their float64 mean by no more: 8 * 2**-24 = 5e-7 < 1e-6
    assert np.all(delta[: D - rank + 1] < 1e-6), delta
    # beyond, real directions go (about 1e-3 here: RoPE still gives a rank-1 key its position, which this
    # look-back task mostly needs, so the change is small but far above the rounding)
    assert np.all(delta[D - rank + 1 :] > 1e-4), delta


# ---------------------------------------------------------------------------------------------------- the experiment


def test_fraction_zero_is_exactly_the_baseline_and_pruning_everything_hurts(trained, data_dir):
    ds = run_surgery(trained, data_dir, fractions=(0.0, 0.5, 1.0), seeds=3, **QUICK)
    baseline = float(ds.baseline_loss)
    assert ds.attrs["gamma_status"] == "ok"
    for strategy, seeds in (("gamma", [0]), ("svd", [0]), ("random", [0, 1, 2])):
        for seed in seeds:
            assert float(ds.loss.sel(strategy=strategy, fraction=0.0, seed=seed)) == baseline
        # every key zero: attention is uniform and the look-back-3 task fails
        assert float(ds.loss.sel(strategy=strategy, fraction=1.0, seed=0)) > baseline + 0.5
    # deterministic strategies fill only seed 0
    assert np.isnan(ds.loss.sel(strategy=["gamma", "svd"], seed=[1, 2])).all()
    assert not np.isnan(ds.loss.sel(strategy="random")).any()


def test_random_seeds_differ_and_the_interval_is_a_t_interval(trained, data_dir):
    ds = run_surgery(trained, data_dir, strategies=["random", "svd"], fractions=(0.0, 0.5), seeds=4, **QUICK)
    values = ds.loss.sel(strategy="random", fraction=0.5).values
    assert len(set(values.tolist())) == 4
    half = stats.t.ppf(0.975, 3) * values.std(ddof=1) / 2.0
    r = ds.sel(strategy="random", fraction=0.5)
    assert float(r.loss_mean) == pytest.approx(values.mean(), rel=1e-12)
    assert float(r.loss_ci_low) == pytest.approx(values.mean() - half, rel=1e-12)
    assert float(r.loss_ci_high) == pytest.approx(values.mean() + half, rel=1e-12)
    s = ds.sel(strategy="svd", fraction=0.5)
    assert float(s.loss_mean) == float(s.loss.sel(seed=0))
    assert np.isnan(float(s.loss_ci_low)) and np.isnan(float(s.loss_ci_high))
    # the same seed draws the same coordinates
    again = run_surgery(trained, data_dir, strategies=["random"], fractions=(0.5,), seeds=4, **QUICK)
    np.testing.assert_array_equal(again.loss.sel(strategy="random", fraction=0.5).values, values)


def test_layers_select_what_is_pruned(trained, data_dir):
    ds = run_surgery(trained, data_dir, strategies=["gamma"], fractions=(0.5,), layers="1", **QUICK)
    both = run_surgery(trained, data_dir, strategies=["gamma"], fractions=(0.5,), layers="0-1", **QUICK)
    assert ds.attrs["layers"] == "1" and both.attrs["layers"] == "0,1"
    # layer 1 alone is exactly the loss with layer 1's mask and nothing else
    model = load_checkpoint(trained).model
    windows = loss_windows(np.fromfile(data_dir / "test.bin", dtype=np.uint16), SEQ, 512, VOCAB)
    with pruned_keys(model, masks=keep_masks(gamma_removal_orders(model, [1]), 4)):
        expected = evaluate_loss(model, windows, batch_size=4)
    where = {"strategy": "gamma", "fraction": 0.5, "seed": 0}
    assert float(ds.loss.sel(where)) == expected
    assert float(both.loss.sel(where)) != expected


def test_gamma_without_qk_norm_is_a_status_not_a_crash(tmp_path, data_dir):
    path = fresh_checkpoint(tmp_path, data_dir, "none")
    notes = []
    ds = run_surgery(path, data_dir, fractions=(0.0, 0.5), seeds=2, echo=notes.append, **QUICK)
    assert np.isnan(ds.loss.sel(strategy="gamma")).all()
    assert "no QK-norm" in ds.attrs["gamma_status"] and "no QK-norm" in notes[0]
    assert float(ds.loss.sel(strategy="svd", fraction=0.0, seed=0)) == float(ds.baseline_loss)
    assert np.isfinite(ds.loss.sel(strategy="random")).all()


def test_surgery_file_schema(trained, data_dir):
    path = surgery(trained, data_dir, fractions=(0.0, 0.25), seeds=2, **QUICK)
    assert path == trained.parent.parent / "surgery.nc"
    with xr.open_dataset(path) as ds:
        assert list(ds.strategy.values) == ["gamma", "svd", "random"]
        assert ds.loss.dims == ("strategy", "fraction", "seed")
        assert ds.fraction.values.tolist() == [0.0, 0.25] and ds.seed.values.tolist() == [0, 1]
        assert ds.removed_dims.values.tolist() == [0, 2]
        for name in ("loss", "loss_mean", "loss_ci_low", "loss_ci_high", "baseline_loss"):
            assert ds[name].attrs["units"] == "nats/token" and ds[name].attrs["long_name"]
        attrs = ds.attrs
        assert attrs["Conventions"] == "CF-1.10" and attrs["format"] == "collapse-surgery"
        assert (attrs["run_name"], attrs["qk_norm"], attrs["optimizer"], attrs["seed"]) == (
            "learned",
            "learned",
            "adamw",
            7,
        )
        assert attrs["step"] == STEPS and attrs["tokens"] == STEPS * 16 * SEQ
        assert attrs["checkpoint"] == str(trained.resolve())
        assert attrs["layers"] == "0,1" and attrs["pair_rope"] == 1
        assert attrs["test_tokens"] == 512 and attrs["seq_len"] == SEQ
        assert (
            attrs["eval_batch_sha256"]
            == json.loads((data_dir / "meta.json").read_text())["eval_batch"]["sha256"]
        )
        assert "run_surgery" in attrs["history"] and "torch" in json.loads(attrs["versions"])
        assert float(ds.loss.sel(strategy="gamma", fraction=0.0, seed=0)) == float(ds.baseline_loss)
    with netCDF4.Dataset(path) as nc:
        assert nc["loss"].filters()["zlib"] and nc["loss_mean"].filters()["zlib"]
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]


# ---------------------------------------------------------------------------------------------------- bad input


def test_dataset_errors_name_the_file(tmp_path, trained, data_dir):
    with pytest.raises(SpectraError, match="dataset directory not found"):
        run_surgery(trained, tmp_path / "missing", **QUICK)
    broken = write_dataset(tmp_path / "short")
    (broken / "test.bin").write_bytes((broken / "test.bin").read_bytes()[:-2])
    with pytest.raises(SpectraError, match=r"test\.bin: 2638 bytes"):
        run_surgery(trained, broken, **QUICK)
    big_vocab = write_dataset(tmp_path / "vocab")
    meta = json.loads((big_vocab / "meta.json").read_text())
    meta["tokenizer"]["vocab_size"] = 2 * VOCAB
    (big_vocab / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(SpectraError, match="exceeds the model's vocab_size"):
        run_surgery(trained, big_vocab, **QUICK)
    from_test = write_dataset(tmp_path / "from-test")
    meta = json.loads((from_test / "meta.json").read_text())
    meta["eval_batch"]["split"] = "test"
    (from_test / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(SpectraError, match="cut from the test split"):
        run_surgery(trained, from_test, **QUICK)
    with pytest.raises(SpectraError, match="strategies"):
        run_surgery(trained, data_dir, strategies=["gamma", "l1"], **QUICK)


def test_cli_writes_the_file_and_reports_gamma_status(tmp_path, data_dir):
    path = fresh_checkpoint(tmp_path, data_dir, "none")
    out = tmp_path / "s.nc"
    args = [
        str(path),
        "--data",
        str(data_dir),
        "--fractions",
        "0,0.5",
        "--seeds",
        "2",
        "--test-tokens",
        "256",
    ]
    result = CliRunner().invoke(cli.spectra.surgery.surgery, [*args, "--no-progress", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "no QK-norm" in result.output and f"wrote {out}" in result.output
    with xr.open_dataset(out) as ds:
        assert ds.attrs["test_tokens"] == 256 and ds.attrs["qk_norm"] == "none"
    # without --data the checkpoint's recorded dataset is used; default output in the run directory
    result = CliRunner().invoke(
        cli.spectra.surgery.surgery, [str(path), "--strategies", "svd", "--fractions", "0", "--no-progress"]
    )
    assert result.exit_code == 0, result.output
    assert (path.parent.parent / "surgery.nc").is_file()


def test_cli_bad_inputs_exit_nonzero(tmp_path, data_dir):
    path = fresh_checkpoint(tmp_path, data_dir, "learned")
    runner = CliRunner()
    result = runner.invoke(
        cli.spectra.surgery.surgery, [str(path), "--data", str(tmp_path / "nope"), "--no-progress"]
    )
    assert result.exit_code == 1 and "dataset directory not found" in result.output
    other = write_dataset(tmp_path / "other", seed=5)  # a different dataset: different eval-batch hash
    args = [str(path), "--data", str(other), "--fractions", "0", "--strategies", "svd", "--no-progress"]
    result = runner.invoke(cli.spectra.surgery.surgery, args)
    assert result.exit_code == 1 and "differs from the checkpoint's" in result.output
    result = runner.invoke(
        cli.spectra.surgery.surgery, [*args, "--force", "--out", str(tmp_path / "forced.nc")]
    )
    assert result.exit_code == 0, result.output
    result = runner.invoke(
        cli.spectra.surgery.surgery, [str(tmp_path / "missing.safetensors"), "--no-progress"]
    )
    assert result.exit_code == 1 and "no such checkpoint file" in result.output
    result = runner.invoke(cli.spectra.surgery.surgery, [str(path), "--fractions", "0,x", "--no-progress"])
    assert result.exit_code == 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_surgery_on_cuda_matches_cpu(trained, data_dir):
    cpu = run_surgery(trained, data_dir, fractions=(0.0, 0.5), seeds=2, **QUICK)
    gpu = run_surgery(trained, data_dir, fractions=(0.0, 0.5), seeds=2, device="cuda", **QUICK)
    for strategy in ("gamma", "svd", "random"):
        assert float(gpu.loss.sel(strategy=strategy, fraction=0.0, seed=0)) == float(gpu.baseline_loss)
    np.testing.assert_allclose(gpu.loss.values, cpu.loss.values, rtol=1e-4)


# ---------------------------------------------------------------------------------------------------- recovery


def _listing(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("victim", ["spectra.nc", "metrics.jsonl", "notes.txt"])
def test_out_never_replaces_a_file_that_is_not_a_surgery_file(tmp_path, trained, data_dir, victim):
    from helpers import make_cube

    run = tmp_path / "run"
    run.mkdir()
    target = run / victim
    if victim == "spectra.nc":
        make_cube(qk_norm="learned").to_netcdf(target)
    else:
        target.write_text('{"step": 1}\n' if victim.endswith(".jsonl") else "my notes\n")
    before = _listing(run)
    result = CliRunner().invoke(
        cli.spectra.surgery.surgery,
        [str(trained), "--data", str(data_dir), "--strategies", "svd", "--fractions", "0,0.5", "--out", str(target),
         "--test-tokens", "512", "--no-progress"],
    )  # fmt: skip
    assert result.exit_code == 1 and "choose another --out" in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    assert _listing(run) == before


def test_a_second_call_adds_cells_and_keeps_the_first_ones(tmp_path, trained, data_dir):
    out = tmp_path / "surgery.nc"
    first = xr.load_dataset(surgery(trained, data_dir, out=out, fractions=(0.0, 0.5), seeds=2, **QUICK))
    calls = []
    import spectra.surgery.run as surgery_mod

    real = surgery_mod.evaluate_loss

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(surgery_mod, "evaluate_loss", counting)
        # a gamma-only call (which on its own would be a much smaller result) merges into the full file
        merged = xr.load_dataset(
            surgery(trained, data_dir, out=out, strategies=["gamma"], fractions=(0.25,), **QUICK)
        )
    assert len(calls) == 1  # only the one new cell: no baseline, nothing already measured
    assert list(merged.strategy.values) == ["gamma", "svd", "random"]
    assert merged.fraction.values.tolist() == [0.0, 0.25, 0.5]
    kept = merged.loss.sel(fraction=[0.0, 0.5])
    assert np.array_equal(kept.values, first.loss.values, equal_nan=True)
    assert float(merged.baseline_loss) == float(first.baseline_loss)
    assert merged.attrs["history"].count("run_surgery(") == 2
    again = _listing(tmp_path)
    surgery(trained, data_dir, out=out, strategies=["gamma"], fractions=(0.25,), **QUICK)  # nothing new to do
    assert xr.load_dataset(out).loss.equals(merged.loss) and set(_listing(tmp_path)) == set(again)


def test_another_experiment_in_the_same_file_is_refused(tmp_path, trained, data_dir):
    out = tmp_path / "surgery.nc"
    surgery(trained, data_dir, out=out, strategies=["svd"], fractions=(0.0,), **QUICK)
    before = out.read_bytes()
    with pytest.raises(
        SpectraError, match=r"holds another experiment \(test_tokens = 512, this one has 256\)"
    ):
        surgery(
            trained, data_dir, out=out, strategies=["svd"], fractions=(0.0,), **{**QUICK, "test_tokens": 256}
        )
    with pytest.raises(SpectraError, match=r"holds another experiment \(layers = 0,1, this one has 1\)"):
        surgery(trained, data_dir, out=out, strategies=["svd"], fractions=(0.0,), layers="1", **QUICK)
    assert out.read_bytes() == before


def test_an_unwritable_out_is_refused_before_computing(tmp_path, trained, data_dir, monkeypatch):
    import spectra.surgery.run as surgery_mod

    monkeypatch.setattr(
        surgery_mod, "run_surgery", lambda *a, **k: pytest.fail("computed before checking --out")
    )
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(
        SpectraError, match=rf"cannot write the surgery file {blocker}/s.nc: {blocker} is a file"
    ):
        surgery(trained, data_dir, out=blocker / "s.nc", **QUICK)


def test_stale_temporaries_of_this_file_are_removed_and_a_lock_is_respected(tmp_path, trained, data_dir):
    from spectra.fileio import ExclusiveLock

    out = tmp_path / "surgery.nc"
    ours, theirs = tmp_path / ".surgery.nc.k1ll3d.tmp", tmp_path / ".spectra.nc.k1ll3d.tmp"
    ours.write_bytes(b"half"), theirs.write_bytes(b"someone else's")
    with ExclusiveLock(out, "x"):
        with pytest.raises(SpectraError, match=rf"surgery file {out} is being written by process pid"):
            surgery(trained, data_dir, out=out, strategies=["svd"], fractions=(0.0,), **QUICK)
        assert ours.exists() and not out.exists()
    surgery(trained, data_dir, out=out, strategies=["svd"], fractions=(0.0,), **QUICK)
    assert not ours.exists() and theirs.read_bytes() == b"someone else's"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".spectra.nc.k1ll3d.tmp", "surgery.nc"]
