"""Tiny random ``transformers`` models of every supported family, saved as local "revisions", and an
independent numpy recomputation of their queries and keys at every read-out site.

The configs are the families' own ``transformers`` config classes, small enough to build and run in a
fraction of a second; each revision perturbs every weight (QK-norm gains included) with its own seed, so
revisions differ as training would make them. The numpy code follows the families' equations as the
modeling files define them, written out here without calling any of spectra's code.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from helpers import tiny_corpus

from trainer.data.prepare import prepare_data
from trainer.data.tokenizer import train_bpe

VOCAB = 320  # the models' embedding; the tokenizer has fewer tokens, as padded public vocabularies do
TOKENIZER_VOCAB = 300
EVAL_SEQS, EVAL_SEQ_LEN = 4, 64  # N = 256 tokens per head
THETA_SLIDING, THETA_FULL = 100.0, 10_000.0  # Gemma-3's two bases, far apart so that a mix-up shows


def _common(**extra: object) -> dict[str, object]:
    return dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        **extra,
    )


def family_configs() -> dict[str, Callable[[], object]]:
    """Builders of one tiny config per family (and Mistral, which the Llama adapter covers)."""
    import transformers as tf

    rope = {"rope_type": "default", "rope_theta": 1000.0}
    return {
        "llama": lambda: tf.LlamaConfig(**_common(num_key_value_heads=2, rope_parameters=rope)),
        "mistral": lambda: tf.MistralConfig(
            **_common(num_key_value_heads=2, rope_parameters=rope, sliding_window=None)
        ),
        "qwen3": lambda: tf.Qwen3Config(**_common(num_key_value_heads=2, head_dim=16, rope_parameters=rope)),
        "olmo2": lambda: tf.Olmo2Config(**_common(num_key_value_heads=2, rope_parameters=rope)),
        "gemma3": lambda: tf.Gemma3TextConfig(
            **_common(num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=8, sliding_window=16),
            layer_types=["sliding_attention", "full_attention"],
            rope_parameters={
                "sliding_attention": {"rope_type": "default", "rope_theta": THETA_SLIDING},
                "full_attention": {"rope_type": "default", "rope_theta": THETA_FULL},
            },
        ),
        "gpt_neox": lambda: tf.GPTNeoXConfig(
            **{**_common(rotary_pct=0.25, rotary_emb_base=1000), "hidden_size": 64}
        ),  # head_dim 16, 4 rotated coordinates, biases on the fused projection
        "smollm3": lambda: tf.SmolLM3Config(
            **_common(num_key_value_heads=2, no_rope_layers=[1, 0], rope_parameters=rope)
        ),
    }


def write_tokenizer(path: Path) -> Path:
    """A byte-level BPE of :data:`TOKENIZER_VOCAB` tokens (with ``<|endoftext|>``) trained on the tiny corpus."""
    tok = train_bpe(tiny_corpus(), TOKENIZER_VOCAB, "<|endoftext|>")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(tok.to_str())
    return path


def build_model(family: str, seed: int) -> torch.nn.Module:
    """A causal LM of the family, every weight perturbed by a seeded draw (gains away from their init)."""
    import transformers as tf

    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(family_configs()[family]())
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 0.3 if "norm" in name else 0.05
            p.add_(torch.randn_like(p) * scale)
    return model.eval()


def save_revisions(family: str, root: Path, steps: Sequence[int], tokenizer: Path) -> Path:
    """``root/step<N>/`` for each step: ``save_pretrained`` (safetensors) of a revision, plus the tokenizer."""
    return save_named_revisions(family, root, [f"step{step}" for step in steps], tokenizer)


def save_named_revisions(
    family: str, root: Path, names: Sequence[str], tokenizer: Path, distinct: int | None = None
) -> Path:
    """``root/<name>/`` for each name, a revision of the family with its tokenizer.

    ``distinct``: how many different random models to build; the names cycle through them (copies), which keeps
    a directory of many revisions cheap to build. Default: one model per name.
    """
    from transformers.utils import logging

    logging.disable_progress_bar()  # "Writing model shards" bars in every test's captured output otherwise
    built: list[Path] = []
    try:
        for i, name in enumerate(names):
            directory = root / name
            if distinct is not None and i >= distinct:
                shutil.copytree(built[i % distinct], directory)
                continue
            build_model(family, seed=1000 * i + 7).save_pretrained(directory)
            shutil.copy(tokenizer, directory / "tokenizer.json")
            built.append(directory)
    finally:
        logging.enable_progress_bar()
    return root


# ----------------------------------------------------------------------------------------------------
# the hub, offline: a Hugging Face cache laid out as huggingface_hub leaves it after a download


def hub_repo_dir(cache: Path, repo: str) -> Path:
    """``models--ORG--NAME`` in a cache (the documented cache layout)."""
    return cache / f"models--{repo.replace('/', '--')}"


def commit_of(repo: str, branch: str) -> str:
    """A made-up, stable 40-hex commit id for ``branch`` of ``repo``."""
    return hashlib.sha1(f"{repo}@{branch}".encode()).hexdigest()


def populate_hub_cache(cache: Path, repo: str, revisions: dict[str, Path]) -> dict[str, str]:
    """Put each model directory of ``revisions`` (``{branch: directory}``) into the cache as a download would:
    ``blobs/<sha256>`` holding the bytes, ``snapshots/<commit>/<file>`` relative symlinks to them, and
    ``refs/<branch>`` naming the commit. ``snapshot_download(..., local_files_only=True)`` and
    ``hf_hub_download`` then find the files offline, and ``scan_cache_dir`` sees one revision per branch.
    Returns ``{branch: commit}``."""
    base = hub_repo_dir(cache, repo)
    commits = {}
    for branch, directory in revisions.items():
        commit = commit_of(repo, branch)
        for file in sorted(p for p in directory.rglob("*") if p.is_file()):
            data = file.read_bytes()
            blob = base / "blobs" / hashlib.sha256(data).hexdigest()
            blob.parent.mkdir(parents=True, exist_ok=True)
            if not blob.exists():
                blob.write_bytes(data)
            link = base / "snapshots" / commit / file.relative_to(directory)
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(os.path.relpath(blob, link.parent))
        (base / "refs").mkdir(parents=True, exist_ok=True)
        (base / "refs" / branch).write_text(commit)
        commits[branch] = commit
    return commits


def fake_list_repo_refs(branches: dict[str, Iterable[str]]) -> Callable[..., object]:
    """A stand-in for ``huggingface_hub.list_repo_refs`` answering ``{repo: branch names}`` with the library's own
    ``GitRefs`` (the only hub call the tests replace: the hub is unreachable from them)."""
    from huggingface_hub.hf_api import GitRefInfo, GitRefs

    def list_repo_refs(repo_id: str, **kwargs: object) -> GitRefs:
        refs = [
            GitRefInfo(name, f"refs/heads/{name}", commit_of(repo_id, name)) for name in branches[repo_id]
        ]
        return GitRefs(branches=refs, converts=[], tags=[])

    return list_repo_refs


def make_model_dataset(tmp_path: Path, model_dir: Path) -> Path:
    """A dataset prepared with ``--tokenizer MODEL_DIR``, eval batch 4 x 64."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    src = tmp_path / "corpus.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in tiny_corpus()))
    return prepare_data(
        tmp_path / "data",
        [str(src)],
        tokenizer=str(model_dir),
        val_frac=0.1,
        test_frac=0.1,
        eval_seqs=EVAL_SEQS,
        eval_seq_len=EVAL_SEQ_LEN,
        progress=False,
    )


# ----------------------------------------------------------------------------------------------------
# the independent recomputation


def attention_input(model: torch.nn.Module, ids: torch.Tensor, layer: int) -> np.ndarray:
    """The hidden states entering layer ``layer``'s attention module, ``(B, T, d_model)`` float64."""
    base = model.base_model
    attn = (
        base.layers[layer].self_attn
        if hasattr(base.layers[layer], "self_attn")
        else base.layers[layer].attention
    )
    seen: list[np.ndarray] = []

    def hook(_m, args, kwargs):
        h = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        seen.append(h.detach().double().numpy())

    handle = attn.register_forward_pre_hook(hook, with_kwargs=True)
    with torch.no_grad():
        model(input_ids=ids)
    handle.remove()
    return seen[0]


def _rms_unit(x: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x**2, axis=-1, keepdims=True) + eps)


def rotate_half(x: np.ndarray, dims: int, theta: float | None) -> np.ndarray:
    """RoPE in the rotate-half layout on the first ``dims`` coordinates of (B, T, H, D); identity if theta is None."""
    if theta is None:
        return x
    t = np.arange(x.shape[1], dtype=np.float64)
    inv_freq = theta ** (-np.arange(0, dims, 2, dtype=np.float64) / dims)  # (dims/2,)
    angle = t[:, None] * inv_freq  # (T, dims/2)
    cos, sin = np.cos(angle)[None, :, None], np.sin(angle)[None, :, None]  # (1, T, 1, dims/2)
    half = dims // 2
    x1, x2, rest = x[..., :half], x[..., half:dims], x[..., dims:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], axis=-1)


def numpy_sites(
    family: str, model: torch.nn.Module, ids: torch.Tensor, layer: int
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{site: (q (B, T, H, D), k (B, T, Hkv, D))}`` for one layer, recomputed in float64 numpy."""
    cfg = model.config
    h = attention_input(model, ids, layer)  # (B, T, d)
    layer_mod = model.base_model.layers[layer]
    n_heads = cfg.num_attention_heads
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_heads
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads

    def arr(t: torch.Tensor | None) -> np.ndarray | float:
        return 0.0 if t is None else t.detach().double().numpy()

    if family == "gpt_neox":
        qkv = layer_mod.attention.query_key_value
        w = arr(qkv.weight).reshape(n_heads, 3, d, -1)  # rows of head h: [q_h, k_h, v_h]
        b = arr(qkv.bias).reshape(n_heads, 3, d)
        q = np.einsum("btm,hdm->bthd", h, w[:, 0]) + b[:, 0]
        k = np.einsum("btm,hdm->bthd", h, w[:, 1]) + b[:, 1]
    else:
        attn = layer_mod.self_attn
        q = (h @ arr(attn.q_proj.weight).T + arr(attn.q_proj.bias)).reshape(*h.shape[:2], n_heads, d)
        k = (h @ arr(attn.k_proj.weight).T + arr(attn.k_proj.bias)).reshape(*h.shape[:2], n_kv, d)
    sites = {"proj": (q, k)}
    if family in ("qwen3", "gemma3"):
        attn = layer_mod.self_attn
        eps = cfg.rms_norm_eps
        offset = 1.0 if family == "gemma3" else 0.0  # Gemma's RMSNorm scales by 1 + weight
        uq, uk = _rms_unit(q, eps), _rms_unit(k, eps)
        sites["unit"] = (uq, uk)
        sites["normed"] = (uq * (offset + arr(attn.q_norm.weight)), uk * (offset + arr(attn.k_norm.weight)))
    elif family == "olmo2":  # one RMSNorm over all heads' coordinates, before the head split
        attn = layer_mod.self_attn
        eps = cfg.rms_norm_eps
        fq, fk = q.reshape(*q.shape[:2], -1), k.reshape(*k.shape[:2], -1)
        uq, uk = _rms_unit(fq, eps), _rms_unit(fk, eps)
        sites["unit"] = (uq.reshape(q.shape), uk.reshape(k.shape))
        sites["normed"] = (
            (uq * arr(attn.q_norm.weight)).reshape(q.shape),
            (uk * arr(attn.k_norm.weight)).reshape(k.shape),
        )
    else:
        sites["normed"] = (q, k)
    dims, theta = d, 1000.0
    if family == "gpt_neox":
        dims = int(d * 0.25)
    elif family == "gemma3":
        theta = THETA_FULL if cfg.layer_types[layer] == "full_attention" else THETA_SLIDING
    elif family == "smollm3" and not cfg.no_rope_layers[layer]:
        theta = None
    nq, nk = sites["normed"]
    sites["rope"] = (rotate_half(nq, dims, theta), rotate_half(nk, dims, theta))
    return sites


def heads_matrices(x: np.ndarray, drop_first: int = 0) -> np.ndarray:
    """(B, T, H, D) -> (H, N, D) with N = B * (T - drop_first), sequence by sequence."""
    x = x[:, drop_first:]
    return x.transpose(2, 0, 1, 3).reshape(x.shape[2], -1, x.shape[3])
