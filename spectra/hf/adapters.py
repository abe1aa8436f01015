"""Architecture adapters: where each public family keeps its queries, keys, QK-norm and rotary embedding.

One small table, :data:`ARCHITECTURES`, one row per family of ``transformers`` models, says where the
read-out sites of ``docs/sites.md`` are in that family's attention module (names as in the installed
``transformers`` modeling files):

| family | ``model_type`` | q / k come from | QK-norm (scope, gain) | rotary embedding |
| --- | --- | --- | --- | --- |
| ``llama`` | ``llama``, ``mistral`` (SmolLM, SmolLM2) | ``q_proj``, ``k_proj`` | none | full |
| ``qwen3`` | ``qwen3`` | ``q_proj``, ``k_proj`` | per head, before RoPE; ``weight`` | full |
| ``olmo2`` | ``olmo2`` | ``q_proj``, ``k_proj`` | whole projection (all heads) before the head split; ``weight`` | full |
| ``gemma3`` | ``gemma3_text`` | ``q_proj``, ``k_proj`` | per head, before RoPE; ``1 + weight`` | full; base per layer type |
| ``gpt_neox`` | ``gpt_neox`` (Pythia) | fused ``query_key_value``, per head ``[q, k, v]`` | none | partial (``rotary_pct``) |
| ``smollm3`` | ``smollm3`` | ``q_proj``, ``k_proj`` | none | full, none in the ``no_rope_layers`` |

Grouped-query attention is read from the config (``num_key_value_heads``); keys keep their key/value
heads. The vectors at the ``rope`` site are taken where the family's attention hands them to the
attention kernel (``spectra.hf.capture``), so the table does not need to reimplement any rotary
embedding; :func:`rotary_layout` only describes it for the cube's attributes and the docs.

No torch here: the table and its helpers are plain data, importable without the ``hf`` extra.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from spectra.errors import SpectraError

QKNormScope = Literal["none", "head", "full"]


@dataclass(frozen=True, kw_only=True)
class Architecture:
    """Where one family's attention keeps what the read-out sites need (attribute names of its modules)."""

    family: str
    """Our name for the family, recorded in the cube's ``family`` attribute."""
    model_types: tuple[str, ...]
    """``config.model_type`` values the row covers."""
    attention: str = "self_attn"
    """Attribute of a decoder layer (``base_model.layers[i]``) holding the attention module."""
    q_proj: str | None = "q_proj"
    """Query projection (``nn.Linear``, output ``n_heads * head_dim``), or None when fused."""
    k_proj: str | None = "k_proj"
    """Key projection (output ``n_kv_heads * head_dim``), or None when fused."""
    qkv_proj: str | None = None
    """Fused projection whose output splits per head into ``[q, k, v]`` (GPT-NeoX), else None."""
    qk_norm: QKNormScope = "none"
    """``none``; ``head``: RMSNorm over each head's ``head_dim``; ``full``: RMSNorm over the whole
    projection (``n_heads * head_dim`` coordinates, all heads at once) before the head split."""
    norm_input: Literal["bthd", "bhtd"] = "bthd"
    """Layout of the QK-norm's input: (batch, token, head, dim), with ``head, dim`` possibly flattened, or
    (batch, head, token, dim)."""
    norm_eps: str = "variance_epsilon"
    """Attribute of the QK-norm module holding its epsilon."""
    gain_offset: float = 0.0
    """The QK-norm multiplies by ``gain_offset + weight``: 0 for the usual RMSNorm, 1 for Gemma's."""
    nope_layers: str | None = None
    """Config attribute listing per layer whether it applies RoPE (1) or not (0), else None (all do)."""

    @property
    def has_qk_norm(self) -> bool:
        """Whether the family normalises queries and keys."""
        return self.qk_norm != "none"


ARCHITECTURES: tuple[Architecture, ...] = (
    Architecture(family="llama", model_types=("llama", "mistral")),
    Architecture(family="qwen3", model_types=("qwen3",), qk_norm="head"),
    Architecture(family="olmo2", model_types=("olmo2",), qk_norm="full"),
    Architecture(
        family="gemma3",
        model_types=("gemma3_text",),
        qk_norm="head",
        norm_input="bhtd",
        norm_eps="eps",
        gain_offset=1.0,
    ),
    Architecture(
        family="gpt_neox",
        model_types=("gpt_neox",),
        attention="attention",
        q_proj=None,
        k_proj=None,
        qkv_proj="query_key_value",
    ),
    Architecture(family="smollm3", model_types=("smollm3",), nope_layers="no_rope_layers"),
)
"""The supported families, one row each."""


def supported_model_types() -> list[str]:
    """Every ``model_type`` an adapter covers, sorted."""
    return sorted(t for arch in ARCHITECTURES for t in arch.model_types)


def architecture_for(model_type: str) -> Architecture:
    """The adapter of a ``config.model_type``.

    Raises
    ------
    SpectraError
        For a model type no adapter covers, listing the supported ones.

    Examples
    --------
    >>> architecture_for("mistral").family
    'llama'
    >>> architecture_for("gemma3_text").gain_offset
    1.0
    """
    for arch in ARCHITECTURES:
        if model_type in arch.model_types:
            return arch
    hint = (
        " (a multimodal Gemma-3 checkpoint: only the text models, model_type gemma3_text, are supported)"
        if model_type == "gemma3"
        else ""
    )
    raise SpectraError(
        f"architecture {model_type!r} is not supported{hint}; supported model types: "
        + ", ".join(supported_model_types())
    )


@dataclass(frozen=True)
class HeadLayout:
    """Query heads, key/value heads and head dimension of a model."""

    n_heads: int
    n_kv_heads: int
    head_dim: int


def head_layout(config: Any) -> HeadLayout:
    """Heads and head dimension from a ``transformers`` config (``head_dim`` where the config sets it)."""
    n_heads = int(config.num_attention_heads)
    n_kv = getattr(config, "num_key_value_heads", None) or n_heads
    head_dim = getattr(config, "head_dim", None) or int(config.hidden_size) // n_heads
    return HeadLayout(n_heads, int(n_kv), int(head_dim))


@dataclass(frozen=True)
class RotaryLayout:
    """What the rotary embedding does in each layer (descriptive: the capture reads its output)."""

    rotary_dims: int
    """Coordinates of each head that are rotated, the first ``rotary_dims`` ones (``head_dim`` unless
    partial); coordinate ``j < rotary_dims / 2`` turns together with ``j + rotary_dims / 2``."""
    theta: tuple[float | None, ...]
    """Base of the rotary frequencies of each layer; None where the layer has no RoPE."""
    rope_type: tuple[str | None, ...]
    """``rope_type`` of each layer (``default``, ``linear``, ``yarn``, ...); None without RoPE."""

    def as_attrs(self) -> dict[str, Any]:
        """JSON-ready form for the cube's ``rotary`` attribute."""
        return {"rotary_dims": self.rotary_dims, "theta": list(self.theta), "rope_type": list(self.rope_type)}


def _layer_rope_parameters(config: Any, layer: int) -> dict[str, Any]:
    params = getattr(config, "rope_parameters", None) or {}
    layer_types = getattr(config, "layer_types", None)
    # Gemma-3 keeps one parameter set per layer type (sliding / full attention)
    if layer_types and layer_types[layer] in params and isinstance(params[layer_types[layer]], dict):
        return params[layer_types[layer]]
    return params


def rotary_layout(arch: Architecture, config: Any) -> RotaryLayout:
    """The rotary embedding of every layer, from the config as ``transformers`` reads it.

    ``partial_rotary_factor`` (GPT-NeoX's ``rotary_pct``) gives ``rotary_dims = int(head_dim * factor)``;
    Gemma-3 takes ``rope_theta`` per layer type (``sliding_attention`` / ``full_attention``); SmolLM3 skips
    RoPE in the layers whose ``no_rope_layers`` entry is 0.

    Examples
    --------
    >>> from types import SimpleNamespace
    >>> cfg = SimpleNamespace(num_attention_heads=4, hidden_size=64, num_hidden_layers=2,
    ...                       rope_parameters={"rope_theta": 10000.0, "partial_rotary_factor": 0.25})
    >>> rotary_layout(architecture_for("gpt_neox"), cfg).rotary_dims
    4
    """
    n_layers = int(config.num_hidden_layers)
    head_dim = head_layout(config).head_dim
    use = [True] * n_layers
    if arch.nope_layers is not None:
        use = [bool(v) for v in getattr(config, arch.nope_layers)]
    per_layer = [_layer_rope_parameters(config, i) for i in range(n_layers)]
    factor = per_layer[0].get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0))
    return RotaryLayout(
        rotary_dims=int(head_dim * (factor if factor is not None else 1.0)),
        theta=tuple(
            float(p["rope_theta"]) if u and "rope_theta" in p else None for p, u in zip(per_layer, use)
        ),
        rope_type=tuple(str(p.get("rope_type", "default")) if u else None for p, u in zip(per_layer, use)),
    )


def site_notes(arch: Architecture, rotary: RotaryLayout, head_dim: int) -> dict[str, str]:
    """What each read-out site holds for this family, in words (the cube's ``site_notes`` attribute)."""
    if arch.qkv_proj is not None:
        proj = (
            f"head h's q and k slices of the fused {arch.qkv_proj} output (laid out per head as [q_h, k_h, v_h]), "
            "bias included"
        )
    else:
        proj = (
            f"output of {arch.q_proj} / {arch.k_proj} split into heads, bias included where the model has one"
        )
    gain = "(1 + weight)" if arch.gain_offset == 1.0 else "weight"
    if arch.qk_norm == "head":
        unit = (
            "each head's vector divided by its RMS over head_dim (the QK-norm's arithmetic, without the gain)"
        )
        normed = f"output of q_norm / k_norm: unit times the gain {gain}, one gain vector shared by the heads"
    elif arch.qk_norm == "full":
        unit = (
            "the whole projection (all heads, n_heads * head_dim coordinates) divided by its RMS, then split into "
            "heads: the norm mixes heads, so one head's vectors do not have unit RMS and their scale depends on "
            "the other heads"
        )
        normed = f"output of q_norm / k_norm split into heads: unit times the gain {gain}, one gain per head and coordinate"
    else:
        unit = "undefined (NaN): no QK-norm in this family"
        normed = "equal to proj: no QK-norm in this family"
    rope = "the vectors as the attention kernel receives them, after the rotary embedding"
    if rotary.rotary_dims < head_dim:
        rope += f"; only the first {rotary.rotary_dims} coordinates of each head are rotated"
    nope = [i for i, t in enumerate(rotary.theta) if t is None]
    if nope:
        rope += f"; layers {nope} have no RoPE, where rope equals normed"
    return {"proj": proj, "unit": unit, "normed": normed, "rope": rope}


__all__ = [
    "ARCHITECTURES",
    "Architecture",
    "HeadLayout",
    "RotaryLayout",
    "architecture_for",
    "head_layout",
    "rotary_layout",
    "site_notes",
    "supported_model_types",
]
