"""Initialising a dictionary from a sample of its training data.

- Normalisation (Anthropic, April 2024): each site's activations are scaled so that their mean norm is
  √d; the scale is stored in the dictionary and folded into its weights when it is saved.
- `b_dec` starts at the geometric median of the (normalised) targets (Gao et al. 2024), found by
  Weiszfeld's iterations; without a decoder bias subtracted from the input (transcoders) it is the mean.
- A JumpReLU or ReLU dictionary starts sparse (`start_sparse`): each latent fires on a share k/F of a
  sample, through JumpReLU's threshold or ReLU's b_enc, and the encoder is scaled by the one factor
  that best reconstructs the sample. Otherwise (the papers' θ = 0.001, or b_enc = 0) about half the
  latents fire on every token at first: the first steps are dense and slow, and an encoder that is the
  decoder's transpose overshoots (FVU far above 1).
- Decoder rows start as random unit vectors (or of norm 0.1 for ReLU with the L1 penalty, as that
  recipe says) and the encoder as the decoder's transpose. A dictionary that reads other sites than it
  writes (a transcoder) has no transpose to start from: its encoder columns are random, of a tenth of
  the decoder's norm, so that the first reconstructions are near b_dec (FVU near 1) rather than noise.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from mechscope.dictionaries.dictionary import Dictionary


def mean_norm_scales(sample: Tensor) -> list[float]:
    """Per site, the factor that gives `sample` [n, n_sites, d] a mean norm of √d."""
    d = sample.shape[-1]
    norms = sample.double().norm(dim=-1).mean(0)  # [n_sites]
    return [float(d**0.5 / n) if n > 0 else 1.0 for n in norms]


def geometric_median(points: Tensor, iterations: int = 100, tol: float = 1e-6) -> Tensor:
    """The point [d] minimising the sum of Euclidean distances to `points` [n, d] (Weiszfeld's algorithm)."""
    points = points.double()
    median = points.mean(0)
    for _ in range(iterations):
        weights = 1 / (points - median).norm(dim=-1).clamp_min(1e-12)
        new = (weights[:, None] * points).sum(0) / weights.sum()
        shift = (new - median).norm() / median.norm().clamp_min(1e-12)
        median = new
        if shift < tol:
            break
    return median


@torch.no_grad()
def initialise(
    dictionary: Dictionary, targets: Tensor, seed: int, decoder_norm: float = 1.0, inputs: Tensor | None = None
) -> None:
    """Set the weights of `dictionary` from normalised training targets [n, W·d_out] and a seed; a dictionary
    that reads other sites than it writes also needs the inputs [n, R·d_in] of the same tokens."""
    gen = torch.Generator().manual_seed(seed)
    F, width = dictionary.W_dec.shape
    W_dec = dictionary.mask_decoder_(torch.randn(F, width, generator=gen, dtype=torch.float64))
    W_dec *= decoder_norm / W_dec.norm(dim=-1, keepdim=True)
    dictionary.W_dec.copy_(W_dec)
    if dictionary.cfg.reconstructs:
        dictionary.W_enc.copy_(W_dec.T)
        dictionary.b_dec.copy_(geometric_median(targets))
    else:  # the encoder reads other sites: a random direction per latent there too
        W_enc = torch.randn(dictionary.W_enc.shape, generator=gen, dtype=torch.float64)
        dictionary.W_enc.copy_(W_enc * (0.1 * decoder_norm / W_enc.norm(dim=0, keepdim=True)))
        dictionary.b_dec.copy_(targets.double().mean(0))
    dictionary.b_enc.zero_()
    if dictionary.W_skip is not None:
        dictionary.W_skip.zero_()
    if not dictionary.cfg.reconstructs and inputs is not None:
        dictionary.b_enc.copy_(-dictionary.pre_activations(inputs.mean(0, keepdim=True))[0])  # centred pre-activations
        align_decoder(dictionary, inputs, targets, decoder_norm)


ALIGN_TOKENS = 16384
"""Sample tokens `align_decoder` reads, in chunks of 1,024."""


@torch.no_grad()
def align_decoder(dictionary: Dictionary, inputs: Tensor, targets: Tensor, decoder_norm: float = 1.0) -> None:
    """Point each latent's decoder row along the mean centred target of the tokens it fires on in the sample
    (inputs [n, R·d_in], targets [n, W·d_out], normalised), at norm `decoder_norm`; latents that fire on none
    keep their random row.

    A transcoder has no transpose to start its decoder from. With random rows, almost every latent's first
    contribution points the wrong way, so its first gradient steps push its pre-activation down until TopK
    never picks it again, and AuxK cannot bring back a latent whose pre-activations are all negative: a
    transcoder of SmolLM2's layer 15 started so had half its latents dead after 15 steps. Aligned rows start
    each latent useful, as the decoder's transpose does for an SAE."""
    sums = torch.zeros_like(dictionary.W_dec)
    for x, y in zip(inputs[:ALIGN_TOKENS].split(1024), targets[:ALIGN_TOKENS].split(1024), strict=True):
        z = dictionary.pre_activations(x)  # [n, F]: dense products only, memory bounded by the chunk
        rows, cols = dictionary.activation.select(z)
        f = torch.zeros_like(z).index_put_((rows, cols), dictionary.activation.values(z[rows, cols], cols).clamp_min(0))
        sums.addmm_(f.T, (y - dictionary.b_dec).to(sums.dtype))
    dictionary.mask_decoder_(sums)
    norms = sums.norm(dim=-1, keepdim=True)
    fired = norms[:, 0] > 0
    dictionary.W_dec[fired] = sums[fired] * (decoder_norm / norms[fired])


@torch.no_grad()
def start_sparse(dictionary: Dictionary, x_read: Tensor, targets: Tensor, l0: float) -> float:
    """Make latent i fire where its pre-activation is above its quantile 1 − l0/F over the normalised sample
    x_read [n, R·d_in] (JumpReLU: θ_i there, at least its initial value; ReLU: b_enc_i lowered by it), then
    scale the encoder (thresholds along, so the same latents fire) by the factor c minimising
    Σ‖targets − b_dec − c (x̂ − b_dec)‖² (targets [n, W·d_out], normalised). Returns c (1 if it was not positive).
    """
    z = dictionary.pre_activations(x_read).float()
    below = min(max(round(len(z) * (1 - l0 / z.shape[1])), 1), len(z))  # tokens at or below each latent's cut
    cut = torch.kthvalue(z, below, dim=0).values
    activation = dictionary.activation
    if hasattr(activation, "log_threshold"):
        activation.log_threshold.copy_(cut.clamp_min(activation.threshold.min()).log())
    else:
        dictionary.b_enc.sub_(cut)
    recon = dictionary.forward_normalised(x_read).recon - dictionary.b_dec
    centred = targets - dictionary.b_dec
    c = float((centred * recon).sum() / (recon * recon).sum().clamp_min(1e-12))
    if not c > 0:
        return 1.0
    dictionary.W_enc.mul_(c)
    dictionary.b_enc.mul_(c)
    if hasattr(activation, "log_threshold"):
        activation.log_threshold.add_(math.log(c))
    return c
