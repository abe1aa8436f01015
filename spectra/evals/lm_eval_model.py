"""Our model as an lm-evaluation-harness model: log-likelihoods of continuations, greedy checks, rolling windows.

Imported only by [`spectra.evals.run`][spectra.evals.run] when an evaluation runs, because it imports ``lm_eval`` (the
optional ``eval`` extra) at the top: the class must subclass ``lm_eval.api.model.TemplateLM``.

``TemplateLM`` does the text side (splitting a request into context and continuation tokens, moving trailing
spaces of the context into the continuation, the end-of-text token as the context of an empty one); this class
does the token side with the trainer's ``LLM``:

- **log-likelihood** of a continuation: one causal forward pass over ``context + continuation`` (minus its last
  token), the log-softmax of the logits at the continuation's positions, summed in float64;
- **is_greedy**: whether the argmax at every continuation position is the continuation's token (LAMBADA's
  accuracy: the whole last word must be the greedy prediction);
- **too long**: a context and continuation longer than ``context_length + 1`` tokens are truncated from the left,
  keeping the continuation and the nearest context, as lm-eval's Hugging Face model does; a continuation longer
  than the context length is an error;
- **rolling log-likelihood** (perplexity tasks): the document split into disjoint windows of at most
  ``context_length`` predicted tokens, each conditioned on as much preceding text as fits, the first on the
  end-of-text token (lm-eval's ``get_rolling_token_windows``); every token is predicted exactly once;
- **generation** is refused: the research questions here need likelihoods only.

Requests are sorted by length and batched (right padding is harmless under causal attention); the forward pass
runs in float32 under ``torch.no_grad``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from tokenizers import Tokenizer
from tqdm.auto import tqdm

from spectra.errors import SpectraError
from trainer.model import LLM

__all__ = ["CollapseLM"]


class CollapseLM(TemplateLM):
    """A trained ``LLM`` and its dataset's tokenizer, as an lm-eval model.

    Parameters
    ----------
    model
        The model (put in eval mode on ``device``).
    tokenizer
        The dataset's ``tokenizers.Tokenizer``; special tokens in text are encoded as text, as the trainer does.
    eot_id
        The end-of-text id: documents were preceded by it in training, so it conditions an empty context.
    batch_size
        Sequences per forward pass.
    device
        Where the forward passes run.
    """

    backend = "causal"

    def __init__(
        self,
        model: LLM,
        tokenizer: Tokenizer,
        eot_id: int,
        *,
        batch_size: int = 8,
        device: str | torch.device = "cpu",
        progress: bool = True,
    ) -> None:
        super().__init__()
        self.progress = progress
        if batch_size < 1:
            raise SpectraError(f"batch_size must be positive, got {batch_size}")
        self.model = model.to(device).eval()
        self._tok = tokenizer
        self._tok.encode_special_tokens = (
            True  # a literal <|endoftext|> in a document is text, as in training
        )
        self._eot_id = int(eot_id)
        self.batch_size = batch_size
        self._device = torch.device(device)

    @property
    def eot_token_id(self) -> int:
        return self._eot_id

    @property
    def max_length(self) -> int:
        """The model's context length: the most tokens one forward pass sees."""
        return int(self.model.cfg.context_length)

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        return self._tok.encode(string, add_special_tokens=False).ids

    def tok_decode(self, tokens: list[int]) -> str:
        return self._tok.decode(tokens)

    # ------------------------------------------------------------------------------------------------

    def _loglikelihood_tokens(
        self, requests: list[tuple[Any, list[int], list[int]]], disable_tqdm: bool = False, **kwargs: Any
    ) -> list[tuple[float, bool]]:
        """``(sum log p(continuation | context), is_greedy)`` for each ``(key, context_ids, continuation_ids)``."""
        inputs = []  # (input ids, number of continuation tokens), in request order
        for key, context, continuation in requests:
            if not continuation:
                raise SpectraError(f"an lm-eval request has an empty continuation: {key!r}")
            if len(continuation) > self.max_length:
                raise SpectraError(
                    f"a continuation of {len(continuation)} tokens exceeds the model's context length "
                    f"{self.max_length}: it cannot be scored in one window ({key!r})"
                )
            whole = (context + continuation)[-(self.max_length + 1) :]  # truncate from the left
            inputs.append((whole, len(continuation)))
        order = sorted(range(len(inputs)), key=lambda i: -len(inputs[i][0]))
        results: list[tuple[float, bool] | None] = [None] * len(inputs)
        bar = tqdm(total=len(order), desc="log-likelihoods", disable=disable_tqdm or not self.progress)
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            for i, result in zip(batch, self._score_batch([inputs[i] for i in batch])):
                results[i] = result
                key = requests[i][0]
                if key is not None:  # rolling windows have no string key
                    self.cache_hook.add_partial("loglikelihood", key, result)
            bar.update(len(batch))
        bar.close()
        return results  # type: ignore[return-value]

    @torch.no_grad()
    def _score_batch(self, batch: list[tuple[list[int], int]]) -> list[tuple[float, bool]]:
        length = max(len(ids) for ids, _ in batch) - 1
        idx = torch.full((len(batch), length), self._eot_id, dtype=torch.long)  # (B, T), right-padded
        for row, (ids, _) in enumerate(batch):
            idx[row, : len(ids) - 1] = torch.tensor(ids[:-1], dtype=torch.long)
        logits = self.model(idx.to(self._device))  # (B, T, V)
        out = []
        for row, (ids, n_cont) in enumerate(batch):
            end = len(ids) - 1  # positions 0 .. end-1 predict ids[1 .. end]
            logp = F.log_softmax(logits[row, end - n_cont : end].float(), dim=-1)  # (n_cont, V)
            target = torch.tensor(ids[-n_cont:], dtype=torch.long, device=logp.device)  # (n_cont,)
            score = logp.gather(-1, target[:, None])[:, 0].double().sum().item()
            greedy = bool((logp.argmax(dim=-1) == target).all())
            out.append((score, greedy))
        return out

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Sum of the log-likelihoods of every token of each document, predicted once, in context windows."""
        windows, owners = [], []
        for i, request in enumerate(requests):
            (text,) = request.args
            for context, continuation in map(
                lm_utils.make_disjoint_window,
                lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(text),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                ),
            ):
                windows.append((None, context, continuation))
                owners.append(i)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for i, (score, _) in zip(owners, scores):
            totals[i] += score
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        raise SpectraError(
            "generation tasks are not supported: collapse evaluates models by log-likelihood only "
            "(multiple-choice, loglikelihood and loglikelihood_rolling tasks)"
        )
