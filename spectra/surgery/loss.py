"""The loss surgery measures: next-token cross-entropy on windows of the dataset's held-out test split.

:func:`test_split` reads the split (through :mod:`spectra.dataset`) and checks it fits the model,
:func:`loss_windows` cuts it into contiguous windows, :func:`evaluate_loss` averages the loss over them in a fixed
order, in float64.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from spectra.dataset import META_FILE, read_split
from spectra.errors import SpectraError
from spectra.surgery.pruning import DEFAULT_BATCH_SIZE
from trainer.model import LLM


def test_split(data_dir: str | os.PathLike, meta: dict[str, Any], vocab_size: int) -> np.ndarray:
    """The test split as a read-only memmap of token ids, checked against ``meta.json`` and the model's vocabulary.

    ``meta`` is the dataset's ``meta.json`` (:func:`spectra.dataset.read_meta`).
    """
    data_dir = Path(data_dir)
    tokens = read_split(data_dir, "test", meta)
    tokenizer = meta.get("tokenizer")
    tokenizer_vocab = tokenizer.get("vocab_size") if isinstance(tokenizer, dict) else None
    if isinstance(tokenizer_vocab, int) and tokenizer_vocab > vocab_size:
        raise SpectraError(
            f"{data_dir / META_FILE}: the tokenizer's vocab_size {tokenizer_vocab} exceeds the model's "
            f"vocab_size {vocab_size}; this dataset is not the one the model was trained on"
        )
    return tokens


def loss_windows(
    tokens: np.ndarray, seq_len: int, test_tokens: int, vocab_size: int, source: str = "test split"
) -> torch.Tensor:
    """Contiguous, non-overlapping windows (n, seq_len + 1) from the start of ``tokens`` (int64, CPU).

    Window w holds tokens w*seq_len .. (w+1)*seq_len, so its seq_len targets are the next tokens of its
    seq_len inputs and every token is predicted once. n = min(test_tokens, len(tokens) - 1) // seq_len.
    """
    n = min(test_tokens, tokens.shape[0] - 1) // seq_len
    if n == 0:
        raise SpectraError(
            f"{source}: {tokens.shape[0]} tokens and test_tokens={test_tokens} give no window of seq_len={seq_len} + 1"
        )
    flat = torch.from_numpy(np.asarray(tokens[: n * seq_len + 1], dtype=np.int64))
    index = torch.arange(n)[:, None] * seq_len + torch.arange(seq_len + 1)  # (n, T+1)
    windows = flat[index]
    top = int(windows.max())
    if top >= vocab_size:
        raise SpectraError(f"{source}: token id {top} is outside the model's vocabulary of {vocab_size}")
    return windows


@torch.inference_mode()
def evaluate_loss(
    model: LLM,
    windows: torch.Tensor,
    batch_size: int = DEFAULT_BATCH_SIZE,
    on_batch: Callable[[int], object] | None = None,
) -> float:
    """Mean next-token cross-entropy (nats/token) of ``model`` over ``windows`` (n, T+1).

    Per-token losses come from the model's own dtype (float32) and are summed in float64, in a fixed
    order, so the same model and windows always give the same number. ``on_batch(1)`` is called after
    each forward pass (a progress bar's ``update``).
    """
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, windows.shape[0], batch_size):
        chunk = windows[start : start + batch_size].to(device)  # (b, T+1)
        logits = model(chunk[:, :-1])  # (b, T, V)
        losses = F.cross_entropy(logits.float().flatten(0, 1), chunk[:, 1:].flatten(), reduction="none")
        total += float(losses.double().sum())
        count += losses.numel()
        if on_batch is not None:
            on_batch(1)
    return total / count
