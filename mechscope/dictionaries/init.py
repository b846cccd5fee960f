"""Initialising a dictionary from a sample of its training data.

- Normalisation (Anthropic, April 2024): each site's activations are scaled so that their mean norm is
  √d; the scale is stored in the dictionary and folded into its weights when it is saved.
- `b_dec` starts at the geometric median of the (normalised) targets (Gao et al. 2024), found by
  Weiszfeld's iterations; without a decoder bias subtracted from the input (transcoders) it is the mean.
- Decoder rows start as random unit vectors (or of norm 0.1 for ReLU with the L1 penalty, as that
  recipe says) and the encoder as the decoder's transpose. A dictionary that reads other sites than it
  writes (a transcoder) has no transpose to start from: its encoder columns are random, of a tenth of
  the decoder's norm, so that the first reconstructions are near b_dec (FVU near 1) rather than noise.
"""

from __future__ import annotations

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
def initialise(dictionary: Dictionary, targets: Tensor, seed: int, decoder_norm: float = 1.0) -> None:
    """Set the weights of `dictionary` from normalised training targets [n, W·d_out] and a seed."""
    gen = torch.Generator().manual_seed(seed)
    F, width = dictionary.W_dec.shape
    W_dec = torch.randn(F, width, generator=gen, dtype=torch.float64)
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
