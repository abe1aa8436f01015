"""Batched float64 singular values of token matrices: the numerical kernels behind the cube.

Every function takes a batch of matrices in the last two dimensions, ``(..., N, D)`` with the N
tokens along the rows and the D coordinates of one head along the columns (torch.linalg's
convention), works in float64 whatever the input dtype, and never loops over single matrices in
Python.

Centring subtracts the mean over the N tokens, per matrix (per head): the centred spectrum is that
of the token cloud around its mean, the uncentred one includes the mean direction (a shared offset
of all keys, common in trained attention, shows up as one large uncentred singular value).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch


def singular_values(x: torch.Tensor, *, centered: bool = False) -> torch.Tensor:
    """Singular values of each matrix of a batch, in float64 and descending order.

    Parameters
    ----------
    x
        ``(..., M, K)``, any real dtype (converted to float64 first).
    centered
        Subtract the mean over the rows (dimension -2) of each matrix first.

    Returns
    -------
    torch.Tensor
        ``(..., min(M, K))`` float64.

    Examples
    --------
    >>> singular_values(torch.eye(3)[None].repeat(2, 1, 1)).shape
    torch.Size([2, 3])
    >>> singular_values(torch.tensor([[3.0, 0.0], [0.0, 4.0]])).tolist()
    [4.0, 3.0]
    """
    x = x.to(torch.float64)
    if centered:
        x = x - x.mean(dim=-2, keepdim=True)
    return svdvals(x)


@dataclass(frozen=True)
class TokenSpectra:
    """Spectra and coordinate energies of a batch of ``(N, D)`` token matrices, all float64."""

    uncentered: torch.Tensor
    """``(..., D)`` singular values of X, descending."""
    centered: torch.Tensor
    """``(..., D)`` singular values of X minus its mean over tokens, descending."""
    energy: torch.Tensor
    """``(..., D)`` mean over tokens of x_j², uncentred."""


def token_spectra(x: torch.Tensor, method: Literal["qr", "svd"] = "qr") -> TokenSpectra:
    r"""Uncentred and centred singular values and per-coordinate energy of token matrices.

    With $\mu$ the mean over the N rows of $X$ and $X_c = X - \mathbf 1 \mu^\top$:

    - ``centered``: $\sigma(X_c)$;
    - ``uncentered``: $\sigma(X)$;
    - ``energy``: $E_j = \frac1N \sum_n X_{nj}^2 = \frac1N \sum_k \sigma_k^2 V_{jk}^2$.

    ``method="qr"`` (the default, the faster one for N >> D) takes one Householder QR of each
    centred matrix, $X_c = Q R$ with $R$ of size D x D, and then only works on small matrices.
    Because $\mathbf 1^\top X_c = 0$, $X = [\mathbf 1/\sqrt N,\ Q]\,[\sqrt N \mu^\top;\ R]$ with
    orthonormal columns on the left, so $X^\top X = N\mu\mu^\top + R^\top R$ and

    $$
    \sigma(X_c) = \sigma(R), \qquad
    \sigma(X) = \sigma\begin{bmatrix}\sqrt N\,\mu^\top \\ R\end{bmatrix}, \qquad
    E_j = \mu_j^2 + \frac1N \sum_i R_{ij}^2 .
    $$

    Both are backward stable like a direct SVD (no Gram matrix is formed, so small singular values
    keep their accuracy); they agree with ``numpy.linalg.svd`` to about 1e-15 relative to the
    largest singular value. ``method="svd"`` takes the singular values of $X$ and of $X_c$
    directly (the reference; about twice the work).

    Parameters
    ----------
    x
        ``(..., N, D)`` with N >= D, any real dtype (the mean and everything after it in float64).
    method
        ``"qr"`` or ``"svd"``, see above.

    Returns
    -------
    TokenSpectra
        Three ``(..., D)`` float64 tensors on the device of ``x``.

    Examples
    --------
    >>> x = torch.tensor([[1.0, 0.0], [3.0, 0.0], [2.0, 2.0], [2.0, -2.0]])  # mean (2, 0)
    >>> s = token_spectra(x)
    >>> [round(v, 12) for v in s.centered.tolist()]  # sqrt(8), sqrt(2)
    [2.828427124746, 1.414213562373]
    >>> [round(v, 12) for v in s.energy.tolist()]
    [4.5, 2.0]
    """
    n, d = x.shape[-2:]
    if n < d:
        raise ValueError(f"token_spectra needs at least as many tokens as coordinates, got N={n} < D={d}")
    if method not in ("qr", "svd"):
        raise ValueError(f"method must be 'qr' or 'svd', got {method!r}")
    # an explicit float64 copy, centred in place: faster than mixed-dtype arithmetic on float32 input,
    # and the caller's tensor is never modified
    xc = x.to(torch.float64, copy=True)  # (..., N, D)
    mean = xc.mean(dim=-2, keepdim=True)  # (..., 1, D)
    if method == "svd":
        x64 = xc.clone()
        xc.sub_(mean)
        return TokenSpectra(
            uncentered=svdvals(x64),
            centered=svdvals(xc),
            energy=x64.square().mean(dim=-2),
        )
    xc.sub_(mean)
    r = qr_r(xc)  # (..., D, D)
    del xc
    stacked = torch.cat([mean * math.sqrt(n), r], dim=-2)  # (..., D + 1, D)
    return TokenSpectra(
        uncentered=svdvals(stacked),
        centered=svdvals(r),
        energy=mean.squeeze(-2).square() + r.square().sum(dim=-2) / n,
    )


@contextmanager
def _intra_op_threads(n: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def map_matrices(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Apply a batched LAPACK function to ``(..., M, K)`` with the matrices split over CPU threads.

    ``fn`` takes ``(b, M, K)`` and returns ``(b, ...)``; the result has ``x``'s leading dimensions.
    On the CPU the batch is split over ``torch.get_num_threads()`` Python threads, each running
    single-threaded LAPACK on whole matrices, instead of one call whose LAPACK parallelises inside
    each small factorisation (a Householder QR of an N x 64 matrix synchronises its threads once per
    column). On a 2-core machine shared with other processes, four interleaved timings of one
    multi-threaded ``torch.linalg.qr`` call took 11 to 212 ms for 24 matrices of 2048 x 32 and 111 to
    1470 ms for 48 matrices of 4096 x 64; the split took 17 to 22 ms and 86 to 130 ms. The split also
    makes each matrix's arithmetic independent of the thread count. While it runs, torch's intra-op
    thread count is 1 in this process (restored afterwards). Other devices take one batched call.
    """
    m, k = x.shape[-2:]
    flat = x.reshape(-1, m, k)
    workers = min(torch.get_num_threads(), flat.shape[0])
    if x.device.type != "cpu" or workers <= 1:
        out = fn(flat)
    else:
        with _intra_op_threads(1), ThreadPoolExecutor(workers, thread_name_prefix="spectra-lapack") as pool:
            out = torch.cat(list(pool.map(fn, flat.chunk(workers))))
    return out.reshape(*x.shape[:-2], *out.shape[1:])


def qr_r(x: torch.Tensor) -> torch.Tensor:
    """The R factors of a batch of tall matrices ``(..., N, D)``, N >= D: ``(..., D, D)``.

    Householder QR (LAPACK ``geqrf``) through ``map_matrices``. R is unique up to the signs of its
    rows; only its singular values and column norms are used here.

    Examples
    --------
    >>> r = qr_r(torch.tensor([[3.0, 0.0], [4.0, 5.0]], dtype=torch.float64))
    >>> [round(abs(v), 12) for v in r.diagonal().tolist()]  # |R_11| = 5, the norm of column 1
    [5.0, 3.0]
    """
    return map_matrices(lambda chunk: torch.linalg.qr(chunk, mode="r").R, x)


def svdvals(x: torch.Tensor) -> torch.Tensor:
    """``torch.linalg.svdvals`` of a batch ``(..., M, K)`` through ``map_matrices``: ``(..., min(M, K))``."""
    return map_matrices(torch.linalg.svdvals, x)


def head_weight_singular_values(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Singular values of each head's slice of a projection matrix, float64.

    ``weight`` is ``(..., n_heads * D, d_model)`` as stored by ``nn.Linear`` (for W_q, W_k of all
    layers stacked, ``(L, H * D, d_model)``); head h owns rows ``h*D .. (h+1)*D - 1``.

    Returns
    -------
    torch.Tensor
        ``(..., n_heads, D)``: ``min(D, d_model)`` values, padded with zeros up to D when
        ``D > d_model`` (the slice then has rank at most ``d_model``).

    Examples
    --------
    >>> w = torch.zeros(4, 3); w[0, 0], w[1, 1], w[2, 2], w[3, 0] = 1.0, 2.0, 3.0, 4.0
    >>> head_weight_singular_values(w, n_heads=2).tolist()
    [[2.0, 1.0], [4.0, 3.0]]
    """
    rows, d_model = weight.shape[-2:]
    if rows % n_heads:
        raise ValueError(f"{rows} rows do not split into {n_heads} heads")
    d = rows // n_heads
    per_head = weight.reshape(*weight.shape[:-2], n_heads, d, d_model)  # (..., H, D, d_model)
    sv = svdvals(per_head.to(torch.float64))  # (..., H, min(D, d_model))
    if sv.shape[-1] < d:
        sv = torch.nn.functional.pad(sv, (0, d - sv.shape[-1]))
    return sv
