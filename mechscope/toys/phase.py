"""The phase diagram of two features in one dimension (Elhage et al. 2022, "Toy Models of Superposition", §4).

A toy with n = 2 features and m = 1 hidden dimension has W = (w_1, w_2) and x' = ReLU(W Wᵀ x + b).
Feature 1 has importance 1 and feature 2 importance r; both have density p. Which solution the
model should learn depends on (p, r), and the answer is drawn as a phase diagram in three steps:

1. **Theory.** The expected loss of every candidate solution, with its weights and biases optimised:
   - one feature only (w = (1, 0) or (0, 1)): the other is best predicted by its mean, so its loss is
     its importance times its variance, p/3 − p²/4, exactly;
   - the antipodal pair (w_1 > 0 > w_2) and the same-sign pair (w_1, w_2 > 0): no closed form, so
     their expected loss is integrated by the midpoint rule over the four cases (no feature on, one,
     the other, both) and minimised over (|w_1|, |w_2|, b) with Adam from several starts.
   The predicted phase is the geometry (`geometry`) of the candidate with the lowest expected loss.
2. **Training.** Every cell trains several instances from random starts with the usual recipe
   (`train_instances`), and keeps the one of lowest expected loss. A single run from a random start
   often sticks in the same-sign minimum at densities where the antipodal pair is better; the best of
   several does not.
3. **Agreement.** The share of cells whose trained phase equals the predicted one, over the cells
   away from the boundaries (a cell is on a boundary when a neighbour's predicted phase differs).

Shapes: C cells, R relative importances, P densities (C = R · P), K quadrature points per axis.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from mechscope.errors import MechscopeError
from mechscope.toys.superposition import train_instances

PHASES = ("feature 1", "feature 2", "antipodal", "same-sign", "neither")
"""Geometries of a two-feature, one-dimension toy, in `geometry`'s order."""
REPRESENTED = 0.5
"""A feature counts as represented when |w_i| exceeds this (as in `superposition.represented`)."""


def geometry(W: Tensor) -> Tensor:
    """[C] phase numbers (indices into PHASES) of embeddings W [C, 2, 1] (or [C, 2])."""
    w = W.reshape(-1, 2)
    on = w.abs() > REPRESENTED
    both = on.all(-1)
    same = (w[:, 0] * w[:, 1]) > 0
    phase = torch.full((len(w),), 4)
    phase[on[:, 0] & ~on[:, 1]] = 0
    phase[on[:, 1] & ~on[:, 0]] = 1
    phase[both & ~same] = 2
    phase[both & same] = 3
    return phase


def expected_loss(w: Tensor, b: Tensor, p: Tensor, r: Tensor, points: int = 64) -> Tensor:
    """[C] the exact expected loss (mean over the two features, importance 1 and r) of x' = ReLU(w wᵀ x + b),
    for w [C, 2], b [C, 2], density p [C] and relative importance r [C], each feature uniform in [0, 1)
    when on. Integrated by the midpoint rule with `points` points per axis (error well under 1e-4 relative)."""
    u = (torch.arange(points, dtype=w.dtype) + 0.5) / points  # [K]
    w1, w2, b1, b2 = (t[:, None] for t in (w[:, 0], w[:, 1], b[:, 0], b[:, 1]))  # [C, 1]
    off = b1.relu().pow(2) + r[:, None] * b2.relu().pow(2)  # [C, 1]: nothing on
    one = (u - (w1 * w1 * u + b1).relu()).pow(2) + r[:, None] * (w1 * w2 * u + b2).relu().pow(2)  # [C, K]
    two = (w1 * w2 * u + b1).relu().pow(2) + r[:, None] * (u - (w2 * w2 * u + b2).relu()).pow(2)
    x1, x2 = u[:, None, None], u[None, :, None]  # both on: a [K, K] grid per cell
    cell = lambda t: t.T[None]  # noqa: E731  [C, 1] -> [1, 1, C]
    both = (x1 - (cell(w1 * w1) * x1 + cell(w1 * w2) * x2 + cell(b1)).relu()).pow(2) + r * (
        x2 - (cell(w2 * w2) * x2 + cell(w1 * w2) * x1 + cell(b2)).relu()
    ).pow(2)  # [K, K, C]
    q = 1 - p
    total = q * q * off[:, 0] + p * q * (one.mean(-1) + two.mean(-1)) + p * p * both.mean((0, 1))
    return total / 2


def _single_feature_loss(p: Tensor, importance: Tensor) -> Tensor:
    """[C] the loss of representing one feature perfectly and predicting the other (of `importance`) by its mean."""
    return importance * (p / 3 - p * p / 4) / 2


def _best_pair(p: Tensor, r: Tensor, sign: float, steps: int, starts: tuple[float, ...]) -> tuple[Tensor, Tensor, Tensor]:
    """The antipodal (sign −1) or same-sign (+1) pair of lowest expected loss per cell: (loss [C], w [C, 2], b [C, 2])."""
    best_loss, best_w, best_b = None, None, None
    for start in starts:  # log |w_i| starts; biases start at 0
        log_w = torch.full((len(p), 2), start, dtype=torch.float64, requires_grad=True)
        b = torch.zeros(len(p), 2, dtype=torch.float64, requires_grad=True)
        optimiser = torch.optim.Adam([log_w, b], lr=0.03)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, steps)
        for _ in range(steps):
            w = log_w.exp() * torch.tensor([1.0, sign], dtype=torch.float64)
            loss = expected_loss(w, b, p, r, points=32)
            optimiser.zero_grad(set_to_none=True)
            loss.sum().backward()
            optimiser.step()
            schedule.step()
        with torch.no_grad():
            w = log_w.exp() * torch.tensor([1.0, sign], dtype=torch.float64)
            loss = expected_loss(w, b, p, r)
            if best_loss is None:
                best_loss, best_w, best_b = loss, w, b.detach().clone()
            else:
                better = loss < best_loss
                best_loss = torch.where(better, loss, best_loss)
                best_w = torch.where(better[:, None], w, best_w)
                best_b = torch.where(better[:, None], b, best_b)
    return best_loss, best_w, best_b


@dataclass
class PhaseDiagram:
    """Predicted and trained phases over densities × relative importances (both [R, P], indices into PHASES)."""

    densities: list[float]
    """p per column."""
    importances: list[float]
    """r, feature 2's importance relative to feature 1's, per row."""
    candidate_loss: Tensor
    """[R, P, 4] the optimised expected loss of feature 1 only, feature 2 only, antipodal and same-sign."""
    predicted: Tensor
    """[R, P] the geometry of the candidate of lowest expected loss."""
    trained: Tensor
    """[R, P] the geometry of the best of `seeds` trained instances."""
    trained_loss: Tensor
    """[R, P, seeds] each trained instance's expected loss."""
    trained_W: Tensor
    """[R, P, seeds, 2] each trained instance's embedding."""

    @property
    def boundary(self) -> Tensor:
        """[R, P] True where a neighbouring cell (up, down, left or right) has another predicted phase."""
        pred = self.predicted
        edge = torch.zeros_like(pred, dtype=torch.bool)
        edge[1:] |= pred[1:] != pred[:-1]
        edge[:-1] |= pred[:-1] != pred[1:]
        edge[:, 1:] |= pred[:, 1:] != pred[:, :-1]
        edge[:, :-1] |= pred[:, :-1] != pred[:, 1:]
        return edge

    @property
    def agreement(self) -> float:
        """The share of cells away from the boundaries whose trained phase is the predicted one."""
        inside = ~self.boundary
        return float((self.trained == self.predicted)[inside].float().mean()) if inside.any() else float("nan")

    @property
    def single_run_same_sign(self) -> float:
        """The share of trained instances (every seed, every cell) that landed in the same-sign geometry."""
        return float((geometry(self.trained_W.reshape(-1, 2)) == PHASES.index("same-sign")).float().mean())


def phase_diagram(
    densities: list[float], importances: list[float], seeds: int = 5, steps: int = 10_000, seed: int = 0,
    fit_steps: int = 400, show_progress: bool = True,
) -> PhaseDiagram:  # fmt: skip
    """Predict each cell's phase from the candidates' optimised expected losses, train `seeds` instances per
    cell (AdamW, lr 1e-3, batch 1,024, `steps` steps), and keep the lowest-loss one. Raises MechscopeError
    on densities outside (0, 1], importances that are not positive, or fewer than 1 seed."""
    if not densities or any(not 0 < d <= 1 for d in densities):
        raise MechscopeError(f"densities {densities} are invalid: each must be in (0, 1]")
    if not importances or any(not r > 0 for r in importances):
        raise MechscopeError(f"relative importances {importances} are invalid: each must be positive")
    if seeds < 1:
        raise MechscopeError(f"seeds={seeds} is invalid: train at least 1 instance per cell")
    R, P = len(importances), len(densities)
    r = torch.tensor(importances, dtype=torch.float64).repeat_interleave(P)  # [C], row-major over [R, P]
    p = torch.tensor(densities, dtype=torch.float64).repeat(R)
    one, two = _single_feature_loss(p, r), _single_feature_loss(p, torch.ones_like(r))
    anti, anti_w, _ = _best_pair(p, r, -1.0, fit_steps, (0.0, -0.7))
    same, same_w, _ = _best_pair(p, r, 1.0, fit_steps, (0.0, -0.7))
    losses = torch.stack([one, two, anti, same], -1)  # [C, 4]
    single = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    candidates_w = torch.stack([single[0].expand(len(p), 2), single[1].expand(len(p), 2), anti_w, same_w], 1)
    winner = losses.argmin(-1)
    predicted = geometry(candidates_w[torch.arange(len(p)), winner])

    importance = torch.stack([torch.ones_like(r), r], -1).float().repeat_interleave(seeds, 0)  # [C·seeds, 2]
    W, b, _ = train_instances(
        p.float().repeat_interleave(seeds), importance, 1, steps=steps, seed=seed, streams=seeds, show_progress=show_progress
    )
    exact = expected_loss(W[..., 0].double(), b.double(), p.repeat_interleave(seeds), r.repeat_interleave(seeds))
    exact = exact.view(R * P, seeds)
    W = W.view(R * P, seeds, 2)
    best = W[torch.arange(R * P), exact.argmin(-1)]
    return PhaseDiagram(
        list(densities), list(importances), losses.view(R, P, 4), predicted.view(R, P), geometry(best).view(R, P),
        exact.view(R, P, seeds), W.view(R, P, seeds, 2),
    )  # fmt: skip
