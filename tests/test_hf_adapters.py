"""The architecture table: every family's row, its rotary layout read from real configs, unknown types."""

from __future__ import annotations

import pytest

from spectra.errors import SpectraError
from spectra.hf.adapters import ARCHITECTURES, architecture_for, head_layout, rotary_layout, site_notes


def test_one_row_per_family_and_no_model_type_twice():
    types = [t for arch in ARCHITECTURES for t in arch.model_types]
    assert len(types) == len(set(types))
    assert {a.family for a in ARCHITECTURES} == {"llama", "qwen3", "olmo2", "gemma3", "gpt_neox", "smollm3"}
    assert {a.family for a in ARCHITECTURES if a.has_qk_norm} == {"qwen3", "olmo2", "gemma3"}


def test_unknown_or_multimodal_types_are_errors_listing_the_supported_ones():
    with pytest.raises(
        SpectraError, match="'phi3' is not supported; supported model types: gemma3_text, gpt_neox"
    ):
        architecture_for("phi3")
    with pytest.raises(SpectraError, match="only the text models, model_type gemma3_text"):
        architecture_for("gemma3")


def test_rotary_layouts_from_the_families_configs():
    pytest.importorskip("transformers")
    from hf_helpers import THETA_FULL, THETA_SLIDING, family_configs

    configs = {name: build() for name, build in family_configs().items()}
    neox = rotary_layout(architecture_for("gpt_neox"), configs["gpt_neox"])
    assert (neox.rotary_dims, neox.theta) == (4, (1000.0, 1000.0))
    gemma = rotary_layout(architecture_for("gemma3_text"), configs["gemma3"])
    assert (gemma.rotary_dims, gemma.theta) == (8, (THETA_SLIDING, THETA_FULL))
    smol = rotary_layout(architecture_for("smollm3"), configs["smollm3"])
    assert smol.theta == (1000.0, None) and smol.rope_type == ("default", None)
    qwen = configs["qwen3"]
    assert head_layout(qwen).head_dim == 16 != qwen.hidden_size // qwen.num_attention_heads
    notes = site_notes(architecture_for("qwen3"), rotary_layout(architecture_for("qwen3"), qwen), 16)
    assert "only the first" not in notes["rope"] and "shared by the heads" in notes["normed"]
