"""Toy models of superposition (Elhage et al. 2022, "Toy Models of Superposition", and its notebook).

n features, each uniform in [0, 1) with probability p and 0 otherwise, are squeezed into m < n hidden
dimensions and read back out: h = x W, x' = ReLU(h Wᵀ + b) (or without the ReLU: the linear model).
W is [n, m]. The loss weights feature i's squared error by its importance I_i. Many instances (one
per sparsity level and seed) train at once as one batched tensor: the loss is the mean over batch and
features, summed over instances, so each instance's gradient is its own.

Measures of the result (per instance):
- `represented`: features whose embedding W_i has norm above 0.5;
- `dimensions_per_feature` D* = m / ‖W‖²_F (1 when m features each own a dimension, 1/2 for antipodal pairs);
- `feature_dimensionality` D_i = ‖W_i‖² / Σ_j (Ŵ_i · W_j)², the share of a dimension feature i holds;
- `superposition` Σ_{j≠i} (Ŵ_i · W_j)², how much the other features project onto feature i's direction.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn

from mechscope.errors import MechscopeError
from mechscope.runtime import progress


def sparsity_levels(n: int) -> list[float]:
    """The paper's feature probabilities p = 20^(−linspace(0, 1, n)): from dense (1) to p = 0.05."""
    return [float(p) for p in 20.0 ** -torch.linspace(0, 1, n, dtype=torch.float64)]


@dataclass
class ToyConfig:
    """One batch of toy models trained together: every (probability, seed) pair is an instance."""

    n_features: int = 5
    """n: the features the data has."""
    n_hidden: int = 2
    """m: the hidden dimensions the model squeezes them into (fewer than n)."""
    probabilities: tuple[float, ...] = (1.0, 0.1, 0.03, 0.01)
    """p per sparsity level: the chance that a feature is non-zero (S = 1 − p is the sparsity)."""
    seeds: int = 1
    """Instances per sparsity level, each from its own random start."""
    importance: float = 0.9
    """I_i = importance^i: feature 0 matters most."""
    relu: bool = True
    """False: the linear model x' = h Wᵀ + b."""
    steps: int = 10_000
    batch: int = 1024
    lr: float = 1e-3
    """AdamW's constant learning rate."""
    weight_decay: float = 0.01
    seed: int = 0

    def __post_init__(self):
        for name in ("n_features", "n_hidden", "seeds", "steps", "batch"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise MechscopeError(f"{name}={value!r} is invalid: it must be a positive integer")
        if self.n_hidden >= self.n_features:
            raise MechscopeError(
                f"n_hidden={self.n_hidden} is not below n_features={self.n_features}: a toy needs fewer dimensions than "
                "features to show superposition"
            )
        self.probabilities = tuple(float(p) for p in self.probabilities)
        bad = [p for p in self.probabilities if not 0 < p <= 1]
        if bad or not self.probabilities:
            raise MechscopeError(f"feature probabilities {list(bad or self.probabilities)} are invalid: each must be in (0, 1]")
        if not 0 < self.importance <= 1:
            raise MechscopeError(f"importance={self.importance!r} is invalid: give a decay in (0, 1]")

    @property
    def instances(self) -> int:
        return len(self.probabilities) * self.seeds


class ToyModel(nn.Module):
    """I instances of h = x W, x' = ReLU(h Wᵀ + b); W [I, n, m] (xavier_normal_ each), b [I, n] (zeros)."""

    def __init__(self, instances: int, n_features: int, n_hidden: int, relu: bool = True, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        W = torch.empty(instances, n_features, n_hidden)
        for w in W:  # xavier_normal_ of an [n, m] matrix: std sqrt(2 / (n + m))
            w.copy_(torch.randn(n_features, n_hidden, generator=gen) * (2 / (n_features + n_hidden)) ** 0.5)
        self.W = nn.Parameter(W)
        self.b = nn.Parameter(torch.zeros(instances, n_features))
        self.relu = relu

    def forward(self, x: Tensor) -> Tensor:
        """x [I, B, n] -> x' [I, B, n] (instance-major, so both products are batched matmuls)."""
        h = torch.bmm(x, self.W)  # [I, B, m]
        out = torch.baddbmm(self.b[:, None, :], h, self.W.transpose(1, 2))
        return torch.relu(out) if self.relu else out


def shared_sample(probabilities: Tensor, batch: int, n: int, gen: torch.Generator) -> Tensor:
    """A batch [I, B, n] from one draw u [B, n] shared by every instance: feature i is on in instance j when
    u > 1 − p_j, with the value (u − (1 − p_j)) / p_j. Seeds of one sparsity level then see identical data,
    so the difference of their losses measures the solutions, not the sampling noise (common random numbers)."""
    p = probabilities[:, None, None]
    return (torch.rand(1, batch, n, generator=gen) - (1 - p)).clamp_min(0).div_(p)


@dataclass
class ToyResult:
    """A trained batch of toys: instance j has probability `probabilities[j]` and seed number `seeds[j]`."""

    cfg: ToyConfig
    W: Tensor
    """[I, n, m] embeddings."""
    b: Tensor
    """[I, n] output biases."""
    probabilities: list[float]
    seeds: list[int]
    loss: Tensor
    """[I] each instance's importance-weighted loss on 131,072 fresh samples after training."""

    def best(self) -> ToyResult:
        """One instance per sparsity level: the seed with the lowest loss."""
        keep = []
        for p in self.cfg.probabilities:
            group = [j for j, q in enumerate(self.probabilities) if q == p]
            keep.append(min(group, key=lambda j: float(self.loss[j])))
        pick = torch.tensor(keep)
        return dataclasses.replace(
            self, W=self.W[pick], b=self.b[pick], probabilities=[self.probabilities[j] for j in keep],
            seeds=[self.seeds[j] for j in keep], loss=self.loss[pick],
        )  # fmt: skip


def train_toy(cfg: ToyConfig, show_progress: bool = True) -> ToyResult:
    """Train every instance of `cfg` at once (AdamW, constant lr, fresh data every step)."""
    per_instance_p = [p for p in cfg.probabilities for _ in range(cfg.seeds)]
    importance = cfg.importance ** torch.arange(cfg.n_features, dtype=torch.float32)
    W, b, loss = train_instances(
        torch.tensor(per_instance_p), importance.expand(cfg.instances, -1), cfg.n_hidden, relu=cfg.relu,
        steps=cfg.steps, batch=cfg.batch, lr=cfg.lr, weight_decay=cfg.weight_decay, seed=cfg.seed,
        streams=cfg.seeds, show_progress=show_progress,
    )  # fmt: skip
    return ToyResult(cfg, W, b, per_instance_p, [s for _ in cfg.probabilities for s in range(cfg.seeds)], loss)


def train_instances(
    probabilities: Tensor, importance: Tensor, n_hidden: int, *, relu: bool = True, steps: int = 10_000,
    batch: int = 1024, lr: float = 1e-3, weight_decay: float = 0.01, seed: int = 0, streams: int | None = None,
    show_progress: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """Train I toys at once, instance j on data of feature probability `probabilities[j]` ([I]) with loss
    weights `importance[j]` ([I, n]). Returns W [I, n, m], b [I, n] and each instance's final loss [I],
    measured on 131,072 fresh samples that every instance shares (see `shared_sample`).

    Instance j draws its data from random stream j mod `streams` (default: a stream each). Instances of
    one stream see the same uniform draws, each turned into data of its own probability, so every instance
    still gets independent fresh batches from its own distribution; the instances never interact, and
    sharing only couples their sampling noise (common random numbers). `train_toy` and `phase_diagram`
    give each seed its own stream, shared across sparsity levels, which makes the random numbers drawn per
    step those of one instance per seed instead of one per instance. Raises MechscopeError when
    `streams` does not divide I."""
    instances, n = importance.shape
    _check_memory(instances, n, n_hidden, batch)
    streams = instances if streams is None else streams
    if streams < 1 or instances % streams:
        raise MechscopeError(f"streams={streams} is invalid: it must divide the {instances} instances")
    model = ToyModel(instances, n, n_hidden, relu, seed)
    optimiser = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed + 1)
    step = _Step(model, probabilities, importance, batch, streams, gen)
    with progress("toy", show=show_progress) as bar, torch.no_grad():
        task = bar.add_task("toy", total=steps)
        for _ in range(steps):
            step()
            optimiser.step()
            bar.update(task, advance=1)
        model.W.grad = model.b.grad = None
        losses = [(importance[:, None] * (x - model(x)).pow(2)).mean(dim=(1, 2)) for x in
                  (shared_sample(probabilities, EVAL_BATCH, n, gen) for _ in range(EVAL_BATCHES))]  # fmt: skip
    return model.W.detach().clone(), model.b.detach().clone(), torch.stack(losses).mean(0)


def _check_memory(instances: int, n: int, m: int, batch: int) -> None:
    """Refuse, before anything is allocated, toys whose tensors would not fit in half the machine's memory:
    W with its gradient, Adam's two moments and the copy returned (5 × [I, n, m]), a step's batch tensors,
    the final loss's batches of 8,192, and the [I, n, n] feature overlaps the measures compute."""
    floats = instances * (5 * n * m + batch * (3 * n + 2 * m) + 4 * EVAL_BATCH * n + 2 * n * n)
    need, have = 4 * floats, os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if need > have / 2:
        raise MechscopeError(
            f"{instances} toys of {n} features in {m} dimensions need about {need / 2**30:,.1f} GiB, more than half of this "
            f"machine's {have / 2**30:.1f} GiB: train fewer instances (levels or seeds), features or dimensions"
        )


class _Step:
    """One step's batch and gradients for I toys, written out by hand into tensors allocated once.

    With y = ReLU(out), out = h Wᵀ + b, h = x W and the loss L = Σ_i mean_{B,n} I_ij (y − x)², the
    gradient at the output is g = 2 I (y − x) ⊙ 1[out > 0] / (B n), and then ∂L/∂b = Σ_B g and
    ∂L/∂W = gᵀ h + xᵀ (g W). This is autograd's result (tested to float rounding) with a third of its
    passes over the [I, B, n] tensors and none of its temporaries: freeing and re-faulting megabyte
    buffers every step had cost as much as the arithmetic.

    The batch: one uniform draw u per feature gives both its on/off switch and its value: the feature is
    on when u > 1 − p, and then (u − (1 − p)) / p is itself uniform in [0, 1)."""

    def __init__(self, model: ToyModel, probabilities: Tensor, importance: Tensor, batch: int, streams: int, gen):
        instances, n = importance.shape
        self.model, self.gen, self.streams = model, gen, streams
        p = probabilities.float().view(instances // streams, streams, 1, 1)
        self.off, self.scale = 1 - p, 1 / p
        self.weight = (2 / (batch * n)) * importance.float()[:, None, :]  # [I, 1, n]
        self.u = torch.empty(streams, batch, n)
        self.x, self.out = torch.empty(instances, batch, n), torch.empty(instances, batch, n)
        self.grad = torch.empty(instances, batch, n) if model.relu else None
        m = model.W.shape[-1]
        self.h, self.gh = torch.empty(instances, batch, m), torch.empty(instances, batch, m)
        model.W.grad, model.b.grad = torch.zeros_like(model.W), torch.zeros_like(model.b)

    def __call__(self) -> None:
        """Draw a batch and write each instance's gradient into W.grad and b.grad."""
        W, b, x, out = self.model.W.detach(), self.model.b.detach(), self.x, self.out
        torch.rand(self.u.shape, generator=self.gen, out=self.u)
        torch.sub(self.u[None], self.off, out=x.view(self.off.shape[0], self.streams, *x.shape[1:]))
        x.clamp_min_(0).mul_(self.scale.view(-1, 1, 1))
        torch.bmm(x, W, out=self.h)
        torch.matmul(self.h, W.transpose(1, 2), out=out).add_(b[:, None, :])  # 2-5x baddbmm's speed here
        if self.model.relu:
            grad = torch.clamp_min(out, 0, out=self.grad).sub_(x).mul_(self.weight)
            torch.ops.aten.threshold_backward.grad_input(grad, out, 0, grad_input=grad)  # zero where out <= 0
        else:
            grad = out.sub_(x).mul_(self.weight)
        torch.sum(grad, 1, out=self.model.b.grad)
        torch.bmm(grad, W, out=self.gh)
        torch.bmm(grad.transpose(1, 2), self.h, out=self.model.W.grad)
        self.model.W.grad.baddbmm_(x.transpose(1, 2), self.gh)


EVAL_BATCHES, EVAL_BATCH = 16, 8192
"""Batches, and samples per batch, that measure each instance's final loss (which `ToyResult.best` compares)."""


def represented(W: Tensor, threshold: float = 0.5) -> Tensor:
    """[I] features per instance whose embedding norm ‖W_i‖ exceeds `threshold` (W [I, n, m])."""
    return (W.norm(dim=-1) > threshold).sum(-1)


def dimensions_per_feature(W: Tensor) -> Tensor:
    """[I] D* = m / ‖W‖²_F: hidden dimensions per embedded feature."""
    return W.shape[-1] / W.pow(2).sum(dim=(-1, -2))


def _projections(W: Tensor) -> Tensor:
    """[I, n, n]: (Ŵ_i · W_j)², each feature's direction against every feature's embedding."""
    unit = W / W.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return torch.einsum("inm,ikm->ink", unit, W).pow(2)


def feature_dimensionality(W: Tensor) -> Tensor:
    """[I, n] D_i = ‖W_i‖² / Σ_j (Ŵ_i · W_j)²: 1 for a feature with a dimension to itself, 1/2 for an antipodal pair."""
    return W.pow(2).sum(-1) / _projections(W).sum(-1).clamp_min(1e-12)


def superposition(W: Tensor) -> Tensor:
    """[I, n] Σ_{j≠i} (Ŵ_i · W_j)²: how much the other features interfere along feature i's direction."""
    proj = _projections(W)
    return proj.sum(-1) - torch.diagonal(proj, dim1=-2, dim2=-1)


_POLYGONS = {3: "triangle", 4: "square", 5: "pentagon", 6: "hexagon"}


def planar_geometry(W: Tensor, threshold: float = 0.5) -> str:
    """Name what the represented features (norm above `threshold`) of one m = 2 toy W [n, 2] form: a regular
    polygon ("pentagon": norms within 10 % of each other and consecutive angles 360°/k ± 5°), "j antipodal
    pairs" (+ the others), or "k features". Raises MechscopeError for an m other than 2."""
    if W.dim() != 2 or W.shape[-1] != 2:
        raise MechscopeError(f"W has shape {list(W.shape)}: a planar geometry needs one toy's [n, 2] embeddings")
    norms = W.norm(dim=-1)
    on = norms > threshold
    k = int(on.sum())
    if k >= 3:
        angles = torch.atan2(W[on, 1], W[on, 0]).rad2deg().remainder(360).sort().values
        gaps = (angles.roll(-1) - angles).remainder(360)
        if (gaps - 360 / k).abs().max() <= 5 and norms[on].max() / norms[on].min() < 1.1:
            return _POLYGONS.get(k, f"regular {k}-gon")
    unit = W[on] / norms[on, None]
    pairs = int(((unit @ unit.T) < -0.95).sum()) // 2
    if pairs >= 1 and k >= 2:
        rest = k - 2 * pairs
        return f"{pairs} antipodal pair{'s' * (pairs != 1)}" + (f" + {rest}" if rest > 0 else "")
    return f"{k} feature{'s' * (k != 1)}"


FRACTIONS = (1.0, 3 / 4, 2 / 3, 1 / 2, 2 / 5, 3 / 8)
"""Feature dimensionalities of the geometries that sparse toys favour: a dimension of its own (1), a
tetrahedron in 3 dimensions (3/4), a triangle (2/3), an antipodal pair (1/2), a pentagon (2/5) and a
square antiprism (3/8)."""


class FractionLine(NamedTuple):
    """How crowded feature dimensionalities are around one fraction."""

    fraction: float
    count: int
    """Features with D_i within ±width of the fraction."""
    background: float
    """The count a smooth spread would put there: the features within ±5·width of the fraction, outside
    every fraction's own window, per unit of D, times the window's length 2·width."""

    @property
    def ratio(self) -> float:
        """count / background: far above 1 where the fraction is a line in the D_i scatter."""
        return self.count / max(self.background, 0.5)


def fraction_lines(D: Tensor, fractions: tuple[float, ...] = FRACTIONS, width: float = 0.01) -> list[FractionLine]:
    """Test for the "lines" of the dimensionality scatter: per fraction, the features D [any shape] that sit
    within ±width of it against a smooth local background (`FractionLine`)."""
    d = D.flatten().double()
    near = [(d - f).abs() <= width for f in fractions]
    anywhere = torch.stack(near).any(0)
    lines = []
    for f, inside in zip(fractions, near, strict=True):
        around = ((d - f).abs() <= 5 * width) & ~anywhere
        grid = torch.linspace(f - 5 * width, f + 5 * width, 1001, dtype=torch.float64)  # D_i lies in [0, 1]
        free_grid = (grid >= 0) & (grid <= 1) & ~torch.stack([(grid - g).abs() <= width for g in fractions]).any(0)
        free = 10 * width * float(free_grid.double().mean())  # the band's length outside every window
        lines.append(FractionLine(f, int(inside.sum()), float(around.sum()) / max(free, width) * 2 * width))
    return lines
