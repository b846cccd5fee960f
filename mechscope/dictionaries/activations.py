"""Activation functions of a dictionary's latents, each a module registered by name.

An activation turns the encoder's pre-activations z = (x - b_pre) W_enc + b_enc [B, F] into the
active latents (`sparse.Active`: N (token, latent) pairs and their values). It works in two steps, so
that only the active pairs need gradients (see `sparse.py`):

1. `select(z)` picks the pairs from z without autograd;
2. `values(z_pairs, cols)` turns the pre-activations of the pairs into activations, with the gradients
   the recipe defines.

It also gives the sparsity penalty its recipe trains with (`penalty`), given the activations and the
decoder row norms.

- `relu`: z > 0; penalty λ Σ_i f_i ‖W_dec,i‖, L1 weighted by decoder norms (Anthropic, "Circuits
  Updates", April 2024).
- `topk`: the k largest z of each token, ReLU after; no penalty, k sets the sparsity (Gao et al. 2024).
  With `blocks` R > 1 (a cross-layer transcoder's latents, one block per layer), the k largest of each
  block: a layer's features then depend on that layer's input alone, as a replacement model needs.
- `batchtopk`: the k·B largest positive z of the whole batch; at inference z > θ, θ a running estimate
  of the smallest kept z, saved as every latent's JumpReLU threshold (Bussmann et al. 2024).
- `jumprelu`: z > θ_i, a learned threshold per latent, with straight-through gradients for θ through a
  rectangle kernel of bandwidth ε; penalty λ·L0 (Rajamanoharan et al. 2024), or λ Σ tanh(c f_i ‖W_dec,i‖)
  (Anthropic 2025).

Defaults are the papers': ε = 0.001 and θ initialised at 0.001 (JumpReLU); c = 4 (tanh penalty). The
trainer then moves JumpReLU's θ to where each latent fires on a share k/F of a sample (`init.start_sparse`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from mechscope.dictionaries.sparse import Active
from mechscope.errors import MechscopeError, one_of

ACTIVATIONS: dict[str, type[Activation]] = {}


def register(cls: type[Activation]) -> type[Activation]:
    ACTIVATIONS[cls.name] = cls
    return cls


def make_activation(name: str, d_sae: int, **options) -> Activation:
    """The activation registered as `name`, for `d_sae` latents; one-line error for an unknown name or option."""
    if name not in ACTIVATIONS:
        raise MechscopeError(f"unknown activation {name!r}: valid activations are {one_of(ACTIVATIONS)}")
    return ACTIVATIONS[name](d_sae, **options)


def _pairs(mask: Tensor) -> tuple[Tensor, Tensor]:
    rows, cols = mask.nonzero(as_tuple=True)
    return rows, cols


class Activation(nn.Module):
    """Base: pre-activations -> active pairs, and the sparsity penalty."""

    name = ""
    uses_penalty = False
    """Whether `penalty` is part of the loss (the trainer warms its coefficient up)."""

    def __init__(self, d_sae: int):
        super().__init__()
        self.d_sae = d_sae

    def select(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """(rows, cols) [N] of the active pairs, rows ascending; z [B, F] has no autograd."""
        raise NotImplementedError

    def values(self, z_pairs: Tensor, cols: Tensor) -> Tensor:
        """Activations [N] of the pairs from their pre-activations [N] (differentiable)."""
        return z_pairs

    def penalty(self, active: Active, z_pairs: Tensor, decoder_norms: Tensor) -> Tensor:
        """The sparsity penalty, summed over latents and averaged over tokens (0 for TopK-style selection).

        `z_pairs` [N] are the pairs' pre-activations, `decoder_norms` [F] each latent's decoder norm.
        """
        return active.values.new_zeros(())

    def options(self) -> dict:
        """What `make_activation` needs to rebuild this activation (saved in the dictionary's config)."""
        return {}

    def observe(self, active: Active) -> None:
        """Training-time statistics (BatchTopK's threshold); called on every training batch."""


@register
class ReLU(Activation):
    name = "relu"
    uses_penalty = True

    def __init__(self, d_sae: int, l1: float = 5.0):
        super().__init__(d_sae)
        self.l1 = l1

    def select(self, z: Tensor) -> tuple[Tensor, Tensor]:
        return _pairs(z > 0)

    def penalty(self, active: Active, z_pairs: Tensor, decoder_norms: Tensor) -> Tensor:
        return self.l1 * (active.values * decoder_norms[active.cols]).sum() / active.batch

    def options(self) -> dict:
        return {"l1": self.l1}


@register
class TopK(Activation):
    name = "topk"

    def __init__(self, d_sae: int, k: int = 64, blocks: int = 1):
        super().__init__(d_sae)
        if not isinstance(blocks, int) or isinstance(blocks, bool) or blocks < 1 or d_sae % blocks:
            raise MechscopeError(f"blocks={blocks!r} is invalid: it must divide the {d_sae} latents")
        width = d_sae // blocks
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= width:
            per = "" if blocks == 1 else " per layer"
            raise MechscopeError(f"k={k!r} is invalid for {width} latents{per}: k must be 1..{width}")
        self.k, self.blocks = k, blocks

    def select(self, z: Tensor) -> tuple[Tensor, Tensor]:
        B, F = z.shape
        if self.blocks == 1:
            cols = z.topk(self.k, dim=-1, sorted=False).indices  # [B, k]
        else:
            width = F // self.blocks
            cols = z.view(B, self.blocks, width).topk(self.k, dim=-1, sorted=False).indices  # [B, R, k]
            cols = cols + torch.arange(0, F, width, device=z.device)[None, :, None]
        rows = torch.arange(B, device=z.device).repeat_interleave(self.k * self.blocks)
        return rows, cols.reshape(-1)

    def values(self, z_pairs: Tensor, cols: Tensor) -> Tensor:
        return torch.relu(z_pairs)

    def options(self) -> dict:
        return {"k": self.k} if self.blocks == 1 else {"k": self.k, "blocks": self.blocks}


@register
class BatchTopK(TopK):
    """The k·B largest positive pre-activations of the whole batch; at inference, a threshold.

    The threshold θ is an exponential moving average of the smallest activation kept in each training
    batch; `select` uses it outside training, and it is saved as every latent's JumpReLU threshold.
    """

    name = "batchtopk"

    def __init__(self, d_sae: int, k: int = 64, threshold: float | None = None, momentum: float = 0.01):
        super().__init__(d_sae, k)  # one block: BatchTopK pools the whole batch
        self.momentum = momentum
        self.register_buffer("threshold", torch.tensor(math.nan if threshold is None else float(threshold)))

    def select(self, z: Tensor) -> tuple[Tensor, Tensor]:
        if not self.training:
            if torch.isnan(self.threshold):
                raise MechscopeError("this BatchTopK dictionary has no inference threshold yet: train it on some batches first")
            return _pairs(z > self.threshold)
        flat = z.reshape(-1)
        kept = flat.topk(min(self.k * z.shape[0], flat.numel()), sorted=False).indices
        kept = kept[flat[kept] > 0]
        kept = kept.sort().values  # row-major order: rows ascending
        return kept // z.shape[1], kept % z.shape[1]

    def observe(self, active: Active) -> None:
        if active.values.numel():
            smallest = active.values.detach().min()
            if torch.isnan(self.threshold):
                self.threshold.copy_(smallest)
            else:
                self.threshold.lerp_(smallest, self.momentum)

    def options(self) -> dict:
        return {"k": self.k, "threshold": float(self.threshold), "momentum": self.momentum}


class _JumpValues(torch.autograd.Function):
    """f = z · H(z - θ) with the straight-through gradient for θ: -(θ/ε) K((z - θ)/ε), K the rectangle."""

    @staticmethod
    def forward(ctx, z, theta, bandwidth):
        ctx.save_for_backward(z, theta)
        ctx.bandwidth = bandwidth
        return z * (z > theta)

    @staticmethod
    def backward(ctx, grad):
        z, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        near = ((z - theta).abs() < eps / 2).to(grad.dtype)
        return grad * (z > theta), -(theta / eps) * near * grad, None


class _Step(torch.autograd.Function):
    """H(z - θ) with the straight-through gradient for θ: -(1/ε) K((z - θ)/ε)."""

    @staticmethod
    def forward(ctx, z, theta, bandwidth):
        ctx.save_for_backward(z, theta)
        ctx.bandwidth = bandwidth
        return (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx, grad):
        z, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        near = ((z - theta).abs() < eps / 2).to(grad.dtype)
        return None, -(1 / eps) * near * grad, None


@register
class JumpReLU(Activation):
    """f_i = z_i · H(z_i - θ_i), θ_i = exp(log_threshold_i) learned with straight-through estimators.

    The pairs selected are those above threshold *and* those within ε/2 below it, whose value is 0
    but whose pre-activation carries θ's gradient. `penalty="l0"` is λ·L0; `penalty="tanh"` is
    λ Σ_i tanh(c · f_i ‖W_dec,i‖).
    """

    name = "jumprelu"
    uses_penalty = True

    def __init__(
        self,
        d_sae: int,
        l0: float = 1.0,
        bandwidth: float = 1e-3,
        init_threshold: float = 1e-3,
        penalty: str = "l0",
        c: float = 4.0,
    ):
        super().__init__(d_sae)
        if penalty not in ("l0", "tanh"):
            raise MechscopeError(f"unknown JumpReLU penalty {penalty!r}: valid penalties are l0, tanh")
        self.l0, self.bandwidth, self.kind, self.c = l0, bandwidth, penalty, c
        self.log_threshold = nn.Parameter(torch.full((d_sae,), math.log(init_threshold)))

    @property
    def threshold(self) -> Tensor:
        return self.log_threshold.exp()

    def select(self, z: Tensor) -> tuple[Tensor, Tensor]:
        theta = self.threshold.detach()
        band = z > theta - self.bandwidth / 2 if self.training else z > theta
        return _pairs(band)

    def values(self, z_pairs: Tensor, cols: Tensor) -> Tensor:
        return _JumpValues.apply(z_pairs, self.threshold[cols], self.bandwidth)

    def penalty(self, active: Active, z_pairs: Tensor, decoder_norms: Tensor) -> Tensor:
        if self.kind == "tanh":
            return self.l0 * torch.tanh(self.c * active.values * decoder_norms[active.cols]).sum() / active.batch
        steps = _Step.apply(z_pairs.detach(), self.threshold[active.cols], self.bandwidth)
        return self.l0 * steps.sum() / active.batch

    def options(self) -> dict:
        return {"l0": self.l0, "bandwidth": self.bandwidth, "penalty": self.kind, "c": self.c}
