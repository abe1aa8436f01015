"""Public models end to end: tiny random models of every family, saved as revisions, extracted into cubes
whose every site agrees with an independent numpy recomputation; the family-specific layouts pinned."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from helpers import make_cube, write_cube
from hf_helpers import THETA_FULL, THETA_SLIDING, heads_matrices, numpy_sites, rotate_half
from safetensors import safe_open
from safetensors.torch import load_file, save_file

pytest.importorskip("transformers")

from spectra.cube import open_cube, open_cubes  # noqa: E402
from spectra.errors import SpectraError  # noqa: E402
from spectra.extract.load import load_eval_batch  # noqa: E402
from spectra.hf.capture import CAPTURE_ATTENTION, capture_public_qk  # noqa: E402
from spectra.hf.extract import extract_public  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

FAMILIES = ["llama", "mistral", "qwen3", "olmo2", "gemma3", "gpt_neox", "smollm3"]
SITES = ("proj", "unit", "normed", "rope")
QK_NORM = {"qwen3", "olmo2", "gemma3"}


def _cube(family, hf_revisions, hf_data_dir, tmp_path, **kwargs):
    out = tmp_path / f"{family}.nc"
    result = extract_public(hf_revisions(family), batch=hf_data_dir, out=out, progress=False, **kwargs)
    return result, open_cube(out)


def _eager_model(path):
    """The revision as transformers loads it by itself: the causal LM, eager attention, nothing of spectra."""
    import transformers

    transformers.logging.set_verbosity_error()
    return transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()


def _svd(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Uncentred and centred singular values of (H, N, D) matrices, float64."""
    return np.linalg.svd(x, compute_uv=False), np.linalg.svd(
        x - x.mean(axis=1, keepdims=True), compute_uv=False
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_every_site_matches_an_independent_recomputation(family, hf_revisions, hf_data_dir, tmp_path):
    drop = 1
    result, cube = _cube(family, hf_revisions, hf_data_dir, tmp_path, drop_first=drop)
    assert result.added == (0, 1000)
    ids = load_eval_batch(hf_data_dir)
    for step in (0, 1000):
        model = _eager_model(hf_revisions(family) / f"step{step}")
        for layer in (0, 1):
            sites = numpy_sites(family, model, ids, layer)
            for site in SITES:
                got_q = cube.q_sv.sel(step=step, layer=layer, site=site).values  # (H, centering, D)
                got_k = cube.k_sv.sel(step=step, layer=layer, site=site).values
                if site not in sites:  # no QK-norm: no unit site
                    assert np.isnan(got_q).all() and np.isnan(got_k).all()
                    continue
                for got, x in ((got_q, sites[site][0]), (got_k, sites[site][1])):
                    mats = heads_matrices(x, drop)
                    unc, cen = _svd(mats)
                    scale = unc.max()
                    np.testing.assert_allclose(
                        got[:, 0], unc, rtol=1e-4, atol=1e-5 * scale, err_msg=f"{site} uncentred"
                    )
                    np.testing.assert_allclose(
                        got[:, 1], cen, rtol=1e-4, atol=1e-5 * scale, err_msg=f"{site} centred"
                    )
                energy = cube.k_energy.sel(step=step, layer=layer, site=site).values
                np.testing.assert_allclose(
                    energy, (heads_matrices(sites[site][1], drop) ** 2).mean(axis=1), rtol=1e-4
                )


@pytest.mark.parametrize("family", FAMILIES)
def test_weight_spectra_and_gains_come_from_the_files(family, hf_revisions, hf_data_dir, tmp_path):
    _, cube = _cube(family, hf_revisions, hf_data_dir, tmp_path)
    file = hf_revisions(family) / "step1000" / "model.safetensors"
    weights = {k: v.double().numpy() for k, v in load_file(str(file)).items()}
    prefix = "gpt_neox.layers" if family == "gpt_neox" else "model.layers"
    H, Hkv, D = cube.sizes["head"], cube.sizes["kv_head"], cube.sizes["sv"]
    for layer in (0, 1):
        if family == "gpt_neox":  # fused, per head [q_h, k_h, v_h]
            w = weights[f"{prefix}.{layer}.attention.query_key_value.weight"].reshape(H, 3, D, -1)
            wq, wk = w[:, 0], w[:, 1]
        else:
            wq = weights[f"{prefix}.{layer}.self_attn.q_proj.weight"].reshape(H, D, -1)
            wk = weights[f"{prefix}.{layer}.self_attn.k_proj.weight"].reshape(Hkv, D, -1)
        at = {"step": 1000, "layer": layer}
        np.testing.assert_allclose(cube.wq_sv.sel(at).values, np.linalg.svd(wq, compute_uv=False), rtol=1e-10)
        np.testing.assert_allclose(cube.wk_sv.sel(at).values, np.linalg.svd(wk, compute_uv=False), rtol=1e-10)
        if family in QK_NORM:
            gain = weights[f"{prefix}.{layer}.self_attn.k_norm.weight"] + (1.0 if family == "gemma3" else 0.0)
            per_head = gain.reshape(Hkv, D) if family == "olmo2" else np.broadcast_to(gain, (Hkv, D))
            np.testing.assert_array_equal(cube.k_gamma_head.sel(at).values, per_head)
            if family == "olmo2":
                assert np.isnan(cube.k_gamma.sel(at).values).all()
            else:
                np.testing.assert_array_equal(cube.k_gamma.sel(at).values, gain)
        else:
            assert np.isnan(cube.k_gamma.values).all() and np.isnan(cube.k_gamma_head.values).all()


def test_gpt_neox_fused_projection_is_read_interleaved_per_head(hf_revisions, hf_data_dir, tmp_path):
    _, cube = _cube("gpt_neox", hf_revisions, hf_data_dir, tmp_path)
    file = hf_revisions("gpt_neox") / "step0" / "model.safetensors"
    w = load_file(str(file))["gpt_neox.layers.0.attention.query_key_value.weight"].double().numpy()
    H, D = cube.sizes["head"], cube.sizes["sv"]
    interleaved = np.linalg.svd(w.reshape(H, 3, D, -1)[:, 1], compute_uv=False)  # head h: rows h*3D + D ..
    contiguous = np.linalg.svd(w[H * D : 2 * H * D].reshape(H, D, -1), compute_uv=False)  # the wrong reading
    got = cube.wk_sv.sel(step=0, layer=0).values
    np.testing.assert_allclose(got, interleaved, rtol=1e-10)
    assert not np.allclose(got, contiguous, rtol=1e-3)


def test_gpt_neox_partial_rotary_leaves_the_last_coordinates_alone(hf_revisions, hf_data_dir, tmp_path):
    _, cube = _cube("gpt_neox", hf_revisions, hf_data_dir, tmp_path)
    assert json.loads(cube.attrs["rotary"])["rotary_dims"] == 4  # head_dim 16, rotary_pct 0.25
    rope = cube.k_energy.sel(site="rope").values  # (step, layer, head, dim)
    normed = cube.k_energy.sel(site="normed").values
    np.testing.assert_allclose(rope[..., 4:], normed[..., 4:], rtol=1e-10)  # passed through untouched
    assert not np.allclose(rope[..., :4], normed[..., :4], rtol=1e-3)  # rotated ...
    pairs = lambda e: e[..., [0, 1]] + e[..., [2, 3]]  # noqa: E731 - ... in rotate-half pairs (j, j + 2)
    np.testing.assert_allclose(pairs(rope), pairs(normed), rtol=1e-5)
    assert "only the first 4 coordinates" in json.loads(cube.attrs["site_notes"])["rope"]


def test_olmo2_norm_spans_all_heads_and_qwen3_each_head(hf_revisions, hf_data_dir, tmp_path):
    _, olmo = _cube("olmo2", hf_revisions, hf_data_dir, tmp_path)
    _, qwen = _cube("qwen3", hf_revisions, hf_data_dir, tmp_path)
    # mean over tokens of sum_j u_j^2: head_dim per head for a per-head norm; n_heads*head_dim over all heads
    # for OLMo-2's norm of the whole projection, whose per-head shares then differ. Layer 1, where the
    # activations are large enough for eps (1e-6 on the mean square) to stay below 1e-3 of the sums.
    per_head_olmo = olmo.q_energy.sel(site="unit", layer=1).sum("dim").values  # (step, head)
    D, H = olmo.sizes["dim"], olmo.sizes["head"]
    np.testing.assert_allclose(per_head_olmo.sum(axis=-1), H * D, rtol=1e-3)
    assert np.ptp(per_head_olmo, axis=-1).min() > 0.05 * D
    per_head_qwen = qwen.q_energy.sel(site="unit", layer=1).sum("dim").values
    np.testing.assert_allclose(per_head_qwen, qwen.sizes["dim"], rtol=1e-3)
    assert (
        olmo.attrs["qk_norm_scope"] == "full"
        and "mixes heads" in json.loads(olmo.attrs["site_notes"])["unit"]
    )
    assert "see q_gamma_head" in olmo.q_gamma.attrs["note"]


def test_gemma_gain_is_one_plus_weight(hf_revisions, hf_data_dir, tmp_path):
    _, cube = _cube("gemma3", hf_revisions, hf_data_dir, tmp_path)
    file = hf_revisions("gemma3") / "step1000" / "model.safetensors"
    with safe_open(str(file), "np") as f:
        weight = f.get_tensor("model.layers.1.self_attn.k_norm.weight").astype(np.float64)
    gamma = cube.k_gamma.sel(step=1000, layer=1).values
    np.testing.assert_array_equal(gamma, 1.0 + weight)
    unit = cube.k_energy.sel(step=1000, layer=1, site="unit").values  # (kv_head, dim)
    normed = cube.k_energy.sel(step=1000, layer=1, site="normed").values
    np.testing.assert_allclose(normed, (1.0 + weight) ** 2 * unit, rtol=1e-5)  # the gain scales coordinate j
    assert not np.allclose(normed, weight**2 * unit, rtol=1e-2)
    assert cube.attrs["qk_norm_gain"] == "1 + weight"


def test_gemma3_rope_base_per_layer_type(hf_revisions, hf_data_dir, tmp_path):
    _, cube = _cube("gemma3", hf_revisions, hf_data_dir, tmp_path)
    assert json.loads(cube.attrs["rotary"])["theta"] == [THETA_SLIDING, THETA_FULL]
    ids = load_eval_batch(hf_data_dir)
    model = _eager_model(hf_revisions("gemma3") / "step0")
    normed_k = numpy_sites("gemma3", model, ids, 1)["normed"][1]
    got = cube.k_sv.sel(step=0, layer=1, site="rope", centering="centered").values
    for theta, should_match in (
        (THETA_FULL, True),
        (THETA_SLIDING, False),
    ):  # layer 1 is a full-attention layer
        mats = heads_matrices(rotate_half(normed_k, 8, theta))
        ref = np.linalg.svd(mats - mats.mean(axis=1, keepdims=True), compute_uv=False)
        assert np.allclose(got, ref, rtol=1e-4) == should_match


def test_smollm3_layers_without_rope(hf_revisions, hf_data_dir, tmp_path):
    _, cube = _cube("smollm3", hf_revisions, hf_data_dir, tmp_path)
    k = cube.k_sv
    np.testing.assert_array_equal(k.sel(layer=1, site="rope").values, k.sel(layer=1, site="normed").values)
    assert not np.allclose(
        k.sel(layer=0, site="rope").values, k.sel(layer=0, site="normed").values, rtol=1e-3
    )
    assert json.loads(cube.attrs["rotary"])["theta"][1] is None
    assert "layers [1] have no RoPE" in json.loads(cube.attrs["site_notes"])["rope"]


# ----------------------------------------------------------------------------------------------------
# the cube's records and the readers


def test_cube_records_what_a_public_model_is_and_is_not(hf_revisions, hf_data_dir, tmp_path):
    _, cube = _cube("qwen3", hf_revisions, hf_data_dir, tmp_path)
    a = cube.attrs
    assert (a["family"], a["model_type"], a["qk_norm"], a["optimizer"], a["seed"]) == (
        "qwen3",
        "qwen3",
        "learned",
        "unknown",
        -1,
    )
    assert a["model_id"] == hf_revisions("qwen3").name == a["run_name"]
    assert a["data"] == f"pretraining data of {a['model_id']}"
    assert a["dtype"] == "float32" and a["tokenizer_check"].startswith("identical tokenizer.json")
    revisions = json.loads(a["revisions"])
    assert [(r["step"], r["revision"], r["commit"]) for r in revisions] == [
        (0, "step0", ""),
        (1000, "step1000", ""),
    ]
    assert np.isnan(cube.train_loss.values).all() and "no losses" in cube.val_loss.attrs["note"]
    assert np.isnan(cube.tokens.values).all() and "--tokens-per-step" in cube.tokens.attrs["note"]
    assert "transformers" in json.loads(a["versions"])
    assert "step0 (step 0), step1000 (step 1000)" in a["history"]


def test_tokens_rules(hf_revisions, hf_data_dir, tmp_path):
    pythia = tmp_path / "pythia-tiny"
    shutil.copytree(hf_revisions("gpt_neox"), pythia)
    extract_public(pythia, batch=hf_data_dir, out=tmp_path / "p.nc", progress=False)
    assert open_cube(tmp_path / "p.nc").tokens.values.tolist() == [0, 1000 * 2_097_152]
    olmo = tmp_path / "olmo"
    olmo.mkdir()
    shutil.copytree(hf_revisions("olmo2") / "step1000", olmo / "stage1-step1000-tokens5B")
    shutil.copytree(hf_revisions("olmo2") / "step0", olmo / "stage1-step0-tokens0B")
    extract_public(olmo, batch=hf_data_dir, out=tmp_path / "o.nc", progress=False)
    cube = open_cube(tmp_path / "o.nc")
    assert (cube.step.values.tolist(), cube.tokens.values.tolist()) == ([0, 1000], [0, 5_000_000_000])
    extract_public(
        hf_revisions("llama"), batch=hf_data_dir, out=tmp_path / "l.nc", tokens_per_step=4096, progress=False
    )
    assert open_cube(tmp_path / "l.nc").tokens.values.tolist() == [0, 4096 * 1000]


def test_incremental_extraction_equals_one_pass(hf_revisions, hf_data_dir, tmp_path):
    root = hf_revisions("olmo2")
    first = extract_public(
        root, batch=hf_data_dir, out=tmp_path / "c.nc", revisions=["step1000"], progress=False
    )
    second = extract_public(root, batch=hf_data_dir, out=tmp_path / "c.nc", progress=False)
    assert (first.added, second.added, second.skipped) == ((1000,), (0,), (1000,))
    again = extract_public(root, batch=hf_data_dir, out=tmp_path / "c.nc", progress=False)
    assert (again.added, again.skipped) == ((), (0, 1000))
    extract_public(root, batch=hf_data_dir, out=tmp_path / "one.nc", progress=False)
    a, b = open_cube(tmp_path / "c.nc"), open_cube(tmp_path / "one.nc")
    for var in ("q_sv", "k_sv", "wk_sv", "k_energy", "q_gamma_head"):
        np.testing.assert_array_equal(a[var].values, b[var].values)
    assert [r["step"] for r in json.loads(a.attrs["revisions"])] == [0, 1000]
    assert len(a.attrs["history"].splitlines()) == 2


def test_a_cube_holds_one_model_batch_and_precision(hf_revisions, hf_data_dir, tmp_path):
    out = tmp_path / "c.nc"
    extract_public(hf_revisions("llama"), batch=hf_data_dir, out=out, revisions=["step0"], progress=False)
    before = out.read_bytes()
    with pytest.raises(SpectraError, match="model_id"):
        extract_public(hf_revisions("qwen3"), batch=hf_data_dir, out=out, progress=False)
    with pytest.raises(SpectraError, match="drop_first"):
        extract_public(hf_revisions("llama"), batch=hf_data_dir, out=out, drop_first=2, progress=False)
    with pytest.raises(SpectraError, match="dtype"):
        extract_public(hf_revisions("llama"), batch=hf_data_dir, out=out, dtype="bfloat16", progress=False)
    with pytest.raises(SpectraError, match="holds revision 'step0', not 'step1000'"):
        extract_public(
            hf_revisions("llama"), batch=hf_data_dir, out=out, revisions=["step1000:0"], progress=False
        )
    assert out.read_bytes() == before
    ours = write_cube(tmp_path / "run" / "spectra.nc", make_cube())
    with pytest.raises(SpectraError, match="collapse run"):
        extract_public(hf_revisions("llama"), batch=hf_data_dir, out=ours, progress=False)


def test_bfloat16_forward_pass(hf_revisions, hf_data_dir, tmp_path):
    _, low = _cube("llama", hf_revisions, hf_data_dir, tmp_path, dtype="bfloat16", revisions=["step0"])
    _, full = _cube(
        "mistral", hf_revisions, hf_data_dir, tmp_path, revisions=["step0"]
    )  # same weights, float32
    assert low.attrs["dtype"] == "bfloat16"
    a, b = low.k_sv.sel(site="proj").values, full.k_sv.sel(site="proj").values  # (..., sv)
    # Mirsky: the singular values of K + E differ from K's by at most ||E||_F in the 2-norm over sv. The bfloat16
    # pass rounds about 24 times on the way to layer 1's keys (weights, norm outputs, matmul outputs, residual adds;
    # 5 to layer 0's), each within 2**-8 of what it rounds, normalised so that none is amplified: ||E||_F is at most
    # 24 * 2**-8 of ||K||_F = ||sigma||_2. Keys of another site or layer differ by about their whole size.
    bound = 24 * 2**-8 * np.linalg.norm(b, axis=-1)
    assert np.all(np.linalg.norm(a - b, axis=-1) <= bound)
    assert not np.array_equal(a, b)


def test_readers_take_public_cubes(hf_revisions, hf_data_dir, tmp_path):
    for family in ("llama", "olmo2", "gemma3"):  # head_dim 8 each, so they share one sv axis
        _cube(family, hf_revisions, hf_data_dir, tmp_path)
    ds = open_cubes([tmp_path / f"{f}.nc" for f in ("llama", "olmo2", "gemma3")])
    assert list(ds.optimizer.values) == ["unknown"] * 3
    assert ds.groupby("qk_norm").count()["k_sv"].sizes["qk_norm"] == 2


# ----------------------------------------------------------------------------------------------------
# capture and refusals


def test_capture_stops_after_the_last_requested_layer_and_restores_the_attention(hf_revisions, hf_data_dir):
    import transformers

    model = transformers.AutoModel.from_pretrained(hf_revisions("qwen3") / "step0").eval()
    before = model.config._attn_implementation
    calls = []
    model.layers[1].register_forward_pre_hook(lambda *_: calls.append(1))
    out = capture_public_qk(model, load_eval_batch(hf_data_dir), layers=[0])
    assert list(out) == [0] and out[0].sites == SITES and calls == []
    assert model.config._attn_implementation == before != CAPTURE_ATTENTION


def test_missing_weights_are_an_error_not_random_spectra(hf_revisions, hf_data_dir, tmp_path):
    root = tmp_path / "broken"
    shutil.copytree(hf_revisions("llama"), root)
    file = root / "step0" / "model.safetensors"
    state = load_file(str(file))
    del state["model.layers.1.self_attn.k_proj.weight"]
    save_file(state, str(file), metadata={"format": "pt"})
    with pytest.raises(SpectraError, match=r"1 weights missing .*k_proj"):
        extract_public(root, batch=hf_data_dir, out=tmp_path / "c.nc", progress=False)


def test_pickle_only_weights_are_refused(hf_revisions, hf_data_dir, tmp_path):
    root = tmp_path / "pickled"
    shutil.copytree(hf_revisions("llama"), root)
    file = root / "step0" / "model.safetensors"
    torch.save(load_file(str(file)), root / "step0" / "pytorch_model.bin")  # our own tensors, never loaded
    file.unlink()
    with pytest.raises(SpectraError, match="pytorch_model.bin: pickle weights, which are never loaded"):
        extract_public(root, batch=hf_data_dir, out=tmp_path / "c.nc", progress=False)
    assert not (tmp_path / "c.nc").exists()


def test_unknown_architecture_lists_the_supported_ones(hf_data_dir, tmp_path, hf_tokenizer):
    import transformers

    cfg = transformers.GPT2Config(vocab_size=320, n_embd=32, n_layer=1, n_head=4)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(tmp_path / "gpt2")
    shutil.copy(hf_tokenizer, tmp_path / "gpt2" / "tokenizer.json")
    with pytest.raises(
        SpectraError, match="'gpt2' is not supported; supported model types: gemma3_text, gpt_neox"
    ):
        extract_public(
            tmp_path / "gpt2", batch=hf_data_dir, out=tmp_path / "c.nc", revisions=[".:0"], progress=False
        )


def test_a_batch_in_another_vocabulary_is_refused(hf_revisions, tiny_data_dir, tmp_path):
    with pytest.raises(SpectraError, match="another tokenizer than the model's.*vocabulary"):
        extract_public(hf_revisions("llama"), batch=tiny_data_dir, out=tmp_path / "c.nc", progress=False)
    assert not (tmp_path / "c.nc").exists()
    extract_public(
        hf_revisions("llama"), batch=tiny_data_dir, out=tmp_path / "c.nc", force=True, progress=False
    )
    assert open_cube(tmp_path / "c.nc").attrs["tokenizer_check"].startswith("DIFFERENT (forced)")
