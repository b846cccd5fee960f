"""Sparse products for dictionaries: only the active latents touch the encoder's and decoder's weights.

A dictionary's forward has one dense product, the encoder's pre-activations `x @ W_enc` [B, F], which
selection needs in full. Everything after it involves only the active (token, latent) pairs, N of them
(N = B·k for TopK, with k ≪ F):

- `gather_pre`: the pre-activations of the active pairs, as an autograd function whose backward builds
  the encoder's weight gradient from those N pairs alone (a sparse [F, B] x dense [B, d] product),
  instead of the dense [B, F] gradient a plain `topk` would scatter and multiply back (F/k times the work).
- `sparse_decode`: Σ_j a_bj W_dec[j] + b_dec for the active pairs of each token, again a sparse x dense
  product forward and backward.

Letters: B tokens in a batch, F latents, D a site's width (times the number of sites read or written),
N active pairs. Pairs are given as flat `rows` (token) and `cols` (latent) index tensors [N].
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class Active(NamedTuple):
    """The active latents of a batch: N (token, latent) pairs and their activations."""

    values: Tensor
    """[N] activations (differentiable)."""
    rows: Tensor
    """[N] int64 token index of each pair, in 0..B-1, ascending."""
    cols: Tensor
    """[N] int64 latent index of each pair, in 0..F-1."""
    batch: int
    """B, the number of tokens."""
    width: int
    """F, the number of latents."""

    def dense(self) -> Tensor:
        """[B, F] activations with zeros where inactive."""
        out = self.values.new_zeros(self.batch, self.width)
        return out.index_put((self.rows, self.cols), self.values)

    def l0(self) -> Tensor:
        """[B] latents with a non-zero activation, per token."""
        return torch.bincount(self.rows[self.values != 0], minlength=self.batch)

    def keep(self, mask: Tensor) -> Active:
        """Only the pairs where `mask` [N] is true."""
        return Active(self.values[mask], self.rows[mask], self.cols[mask], self.batch, self.width)


def _pairs_matrix(rows: Tensor, cols: Tensor, values: Tensor, shape: tuple[int, int], transpose: bool) -> Tensor:
    """The sparse [B, F] matrix of the pairs (or its [F, B] transpose). Pairs are distinct, so it is left
    uncoalesced: the product does not need it sorted, and sorting costs more than the product."""
    index = torch.stack([cols, rows]) if transpose else torch.stack([rows, cols])
    size = (shape[1], shape[0]) if transpose else shape
    return torch.sparse_coo_tensor(index, values, size, check_invariants=False, is_coalesced=False)


class _GatherPre(torch.autograd.Function):
    """pre[rows, cols] where pre = (x - b_pre) @ W_enc + b_enc, given the gathered values (computed once)."""

    @staticmethod
    def forward(ctx, gathered, x, b_pre, W_enc, b_enc, rows, cols):
        ctx.save_for_backward(x, b_pre, W_enc, rows, cols)
        return gathered.clone()

    @staticmethod
    def backward(ctx, grad):
        x, b_pre, W_enc, rows, cols = ctx.saved_tensors  # rows index x's rows
        B, F = x.shape[0], W_enc.shape[1]
        grad_W_enc = grad_b_enc = grad_b_pre = None
        grad_by_latent = torch.zeros(F, dtype=grad.dtype, device=grad.device).index_add_(0, cols, grad)
        if ctx.needs_input_grad[4]:
            grad_b_enc = grad_by_latent
        if ctx.needs_input_grad[3]:  # W_enc's gradient [D, F] = (x - b_pre)^T G, from the N pairs alone
            x_in = x - b_pre if b_pre is not None else x
            G_T = _pairs_matrix(rows, cols, grad, (B, F), transpose=True)  # [F, B]
            grad_W_enc = _like(torch.sparse.mm(G_T, x_in).T, W_enc)
        if b_pre is not None and ctx.needs_input_grad[2]:  # every token subtracts the same b_pre
            grad_b_pre = -(W_enc @ grad_by_latent)
        return None, None, grad_b_pre, grad_W_enc, grad_b_enc, None, None


def _like(grad: Tensor, param: Tensor) -> Tensor:
    """`grad` with the memory layout of `param` (no copy when they already agree)."""
    return grad if grad.stride() == param.stride() else torch.empty_like(param).copy_(grad)


def gather_pre(
    pre: Tensor,
    x: Tensor,
    b_pre: Tensor | None,
    W_enc: Tensor,
    b_enc: Tensor,
    rows: Tensor,
    cols: Tensor,
    x_rows: Tensor | None = None,
) -> Tensor:
    """The pre-activations [N] of the pairs (rows, cols), differentiable in W_enc, b_enc and b_pre.

    `pre` [B, F] is `(x - b_pre) @ W_enc + b_enc`, computed without autograd, in float32 (then the pairs'
    values are read off it) or in a lower precision used only to select the pairs (then each pair's
    value is computed again exactly, in x's dtype, as one dot product per pair). `x` [B, D] is the input
    before `b_pre` is subtracted (None: nothing is subtracted).

    `x_rows` [N], when given, says which row of `x` [X, D] each pair reads instead of its token's: a
    cross-layer transcoder's latents each read one of R sites, so x is then its [B·R, d_in] view and
    x_rows = rows·R + the latent's site (`pre` is always [B, F]).
    """
    if pre.dtype == x.dtype:
        gathered = pre[rows, cols]
    else:
        with torch.no_grad():
            x_in = (x - b_pre if b_pre is not None else x).contiguous()
            in_rows = rows if x_rows is None else x_rows
            dots = torch.ops.aten._embedding_bag_per_sample_weights_backward(
                x_in, W_enc.T.contiguous(), cols, _offsets(in_rows, x.shape[0]), in_rows, 0, -1
            )  # W_enc.T is already contiguous: the parameter is stored latent-major
            gathered = dots + b_enc[cols]
    return _GatherPre.apply(gathered, x, b_pre, W_enc, b_enc, rows if x_rows is None else x_rows, cols)


def _offsets(rows: Tensor, batch: int) -> Tensor:
    """[B] where each token's pairs start in the (row-ascending) pair list."""
    counts = torch.bincount(rows, minlength=batch)
    return torch.cumsum(counts, 0) - counts


class _SparseDecode(torch.autograd.Function):
    """out[b] = Σ over the pairs of token b of values · W_dec[col]: [B, D], as an embedding bag.

    Backward: each pair's value gets grad[b] · W_dec[col] from the embedding bag's own kernel for
    per-sample weights (no [N, D] copy of the gathered rows), and W_dec's gradient is a sparse x dense
    product of the [F, B] pair matrix with the output gradient.
    """

    @staticmethod
    def forward(ctx, values, rows, cols, W_dec, batch):
        offsets = _offsets(rows, batch)
        ctx.save_for_backward(values, rows, cols, W_dec, offsets)
        ctx.batch = batch
        return torch.nn.functional.embedding_bag(cols, W_dec, offsets, mode="sum", per_sample_weights=values)

    @staticmethod
    def backward(ctx, grad):
        values, rows, cols, W_dec, offsets = ctx.saved_tensors
        grad = grad.contiguous()
        grad_values = grad_W_dec = None
        if ctx.needs_input_grad[0]:
            grad_values = torch.ops.aten._embedding_bag_per_sample_weights_backward(grad, W_dec, cols, offsets, rows, 0, -1)
        if ctx.needs_input_grad[3]:
            A_T = _pairs_matrix(rows, cols, values, (ctx.batch, W_dec.shape[0]), transpose=True)
            grad_W_dec = torch.sparse.mm(A_T, grad)
        return grad_values, None, None, grad_W_dec, None


def sparse_decode(active: Active, W_dec: Tensor) -> Tensor:
    """Σ_j a_bj W_dec[j] over each token's active latents: [B, D] (without any decoder bias)."""
    return _SparseDecode.apply(active.values, active.rows, active.cols, W_dec, active.batch)
