"""Toy models of superposition: the measures on hand-made geometries, bad settings, and result (a) of
Elhage et al. 2022 (n = 5, m = 2) in a fast variant: 4,000 steps instead of 10,000, best of 4 seeds."""

import math

import pytest
import torch

from mechscope.errors import MechscopeError
from mechscope.toys import (
    ToyConfig,
    dimensions_per_feature,
    feature_dimensionality,
    fraction_lines,
    planar_geometry,
    represented,
    sparsity_levels,
    superposition,
    train_instances,
    train_toy,
)
from mechscope.toys.phase import PHASES, expected_loss, phase_diagram


def test_the_measures_on_known_geometries():
    orthogonal = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]])
    antipodal = torch.tensor([[[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]]])
    assert represented(orthogonal).tolist() == [2] and represented(antipodal).tolist() == [4]
    assert dimensions_per_feature(orthogonal).item() == pytest.approx(1.0)
    assert dimensions_per_feature(antipodal).item() == pytest.approx(0.5)
    assert feature_dimensionality(antipodal)[0].tolist() == pytest.approx([0.5] * 4)
    assert feature_dimensionality(orthogonal)[0, :2].tolist() == pytest.approx([1.0, 1.0])
    assert superposition(orthogonal)[0, :2].tolist() == pytest.approx([0.0, 0.0])
    assert superposition(antipodal)[0].tolist() == pytest.approx([1.0] * 4)


def test_planar_geometries_are_named():
    def ring(k, norm=1.0, turn=0.3):
        a = torch.arange(k) * 2 * math.pi / k + turn
        return norm * torch.stack([a.cos(), a.sin()], -1)

    assert planar_geometry(ring(5)) == "pentagon"
    assert planar_geometry(torch.cat([ring(5, 1.16), torch.zeros(2, 2)])) == "pentagon"  # unrepresented ones ignored
    assert planar_geometry(ring(4)) == "square" and planar_geometry(ring(8)) == "regular 8-gon"
    assert planar_geometry(torch.tensor([[1.0, 0], [-1, 0], [0, 0.8], [0, -0.8], [0.7, 0.7]])) == "2 antipodal pairs + 1"
    assert planar_geometry(torch.tensor([[1.0, 0], [0, 1], [0, 0.1]])) == "2 features"
    assert planar_geometry(ring(5) * torch.tensor([[1.0], [1], [1], [1], [1.5]])) != "pentagon"  # unequal norms
    with pytest.raises(MechscopeError, match=r"W has shape \[5, 3\]"):
        planar_geometry(torch.zeros(5, 3))


@pytest.mark.parametrize("relu", [True, False])
def test_the_hand_written_gradient_equals_autograd(relu):
    """The training step's gradient, written out by hand, equals autograd's on the same batch, and every
    instance's data follows its own probability while instances of one stream share their draws."""
    from mechscope.toys.superposition import ToyModel, _Step

    p, importance = torch.tensor([1.0, 1.0, 0.3, 0.3, 0.05, 0.05]), 0.8 ** torch.arange(7.0).expand(6, -1)
    model = ToyModel(6, 7, 3, relu, seed=1)
    with torch.no_grad():
        model.b.normal_()  # some outputs below zero, so the ReLU's mask matters
    step = _Step(model, p, importance, 4096, streams=2, gen=torch.Generator().manual_seed(2))
    step()
    x = step.x.clone()
    by_hand = model.W.grad.clone(), model.b.grad.clone()
    model.W.grad = model.b.grad = None
    (importance[:, None] * (x - model(x)).pow(2)).mean(dim=(1, 2)).sum().backward()
    assert torch.allclose(by_hand[0], model.W.grad, rtol=1e-5, atol=1e-7)
    assert torch.allclose(by_hand[1], model.b.grad, rtol=1e-5, atol=1e-7)
    on = (x > 0).float().mean(dim=(1, 2))
    assert on.tolist() == pytest.approx(p.tolist(), abs=0.01)
    assert x.min() >= 0 and x.max() < 1
    assert not ((x[4] > 0) & (x[2] == 0)).any()  # stream 0: a draw on at p = 0.05 is on at p = 0.3
    assert ((x[5] > 0) & (x[2] == 0)).any()  # stream 1 draws on its own
    with pytest.raises(MechscopeError, match="streams=4 is invalid: it must divide the 6 instances"):
        train_instances(p, importance, 3, steps=1, streams=4, show_progress=False)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"n_features": 2, "n_hidden": 2}, "n_hidden=2 is not below n_features=2"),
        ({"probabilities": (0.5, 0.0)}, "feature probabilities [0.0] are invalid: each must be in (0, 1]"),
        ({"probabilities": (1.5,)}, "feature probabilities [1.5] are invalid"),
        ({"steps": 0}, "steps=0 is invalid"),
        ({"importance": 0.0}, "importance=0.0 is invalid"),
    ],
)
def test_bad_settings_get_one_line(settings, message):
    with pytest.raises(MechscopeError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        ToyConfig(**settings)


def test_five_features_in_two_dimensions():
    """Dense data keeps the 2 most important features; sparse data (p <= 0.02) keeps all 5 as a pentagon."""
    cfg = ToyConfig(n_features=5, n_hidden=2, probabilities=(1.0, 0.02, 0.01), seeds=4, steps=4000)
    result = train_toy(cfg, show_progress=False).best()
    norms = result.W.norm(dim=-1)  # [3, 5]
    assert represented(result.W).tolist() == [2, 5, 5]
    assert norms[0, :2].min() > 0.9 and norms[0, 2:].max() < 0.25  # dense: the top two, the rest near 0
    for W, n in zip(result.W[1:], norms[1:], strict=True):
        assert n.max() / n.min() < 1.1  # norms within 10 % of each other
        angles = sorted(math.degrees(a) % 360 for a in torch.atan2(W[:, 1], W[:, 0]).tolist())
        gaps = [(angles[(i + 1) % 5] - angles[i]) % 360 for i in range(5)]
        assert all(abs(g - 72) <= 5 for g in gaps), gaps


def test_twenty_features_in_five_dimensions():
    """Result (b), fast variant: more features are represented as the data gets sparser, and D* falls toward 1/3.

    The full variant (all seven levels, 10,000 steps, 4 seeds) is in bench/toys.py."""
    levels = (0.0, 0.9, 0.99, 0.999)
    cfg = ToyConfig(n_features=20, n_hidden=5, importance=0.7, probabilities=tuple(1 - s for s in levels), seeds=3, steps=5000)
    result = train_toy(cfg, show_progress=False).best()
    counts = represented(result.W).tolist()
    assert counts[0] == 5 and counts[-1] >= 12, counts
    assert counts == sorted(counts), counts  # never decreases with sparsity
    d_star = dimensions_per_feature(result.W).tolist()
    assert d_star[0] == pytest.approx(1.0, abs=0.05) and d_star[-1] < 0.42, d_star


def test_the_phase_diagram_of_two_features_in_one_dimension():
    """Result (c), fast variant: the best of 6 trained starts per cell matches the theory's lowest-loss solution
    in at least 90 % of the cells away from the boundaries (the full 12 x 11 grid is in bench/toys.py).

    With 3 starts it does not: every start of two cells kept one feature where the antipodal pair is better."""
    densities, importances = [0.03, 0.1, 0.3, 0.6, 1.0], [0.2, 0.5, 1.0, 2.0, 5.0]
    diagram = phase_diagram(densities, importances, seeds=6, steps=4000, show_progress=False)
    names = [[PHASES[int(i)] for i in row] for row in diagram.predicted]
    assert names[0][0] == "antipodal" and names[0][-1] == "feature 1" and names[-1][-1] == "feature 2", names
    assert int((~diagram.boundary).sum()) >= 8
    assert diagram.agreement >= 0.9, (diagram.predicted, diagram.trained)


def test_the_expected_loss_matches_sampling():
    """The quadrature the phase diagram's theory uses equals a many-sample estimate of the same loss."""
    gen = torch.Generator().manual_seed(0)
    w, b = torch.randn(4, 2, generator=gen, dtype=torch.float64), 0.3 * torch.randn(4, 2, generator=gen, dtype=torch.float64)
    p, r = torch.tensor([0.05, 0.3, 0.7, 1.0], dtype=torch.float64), torch.tensor([0.2, 1.0, 3.0, 0.5], dtype=torch.float64)
    x = torch.rand(400_000, 4, 2, generator=gen, dtype=torch.float64)
    x = x * (torch.rand(400_000, 4, 2, generator=gen, dtype=torch.float64) < p[None, :, None])
    out = ((x * w).sum(-1, keepdim=True) * w + b).relu()
    sampled = ((x - out).pow(2) * torch.stack([torch.ones_like(r), r], -1)).mean((0, 2))
    assert expected_loss(w, b, p, r).tolist() == pytest.approx(sampled.tolist(), rel=0.01)


def test_phase_settings_are_checked():
    with pytest.raises(MechscopeError, match=r"densities \[0.0\] are invalid"):
        phase_diagram([0.0], [1.0])
    with pytest.raises(MechscopeError, match=r"relative importances \[-1.0\] are invalid"):
        phase_diagram([0.5], [-1.0])


def test_feature_dimensionality_sticks_at_one_half():
    """Result (d), fast variant: 200 features in 20 dimensions, importance 1, the six sparsity levels (of the
    full run's 20) around the plateau, 3,000 steps. D* stays within 0.03 of 1/2 over at least 3 levels, and
    D_i clusters at 1/2 (antipodal pairs) and at least one more of the named fractions. The full variant
    (all 20 levels, 10,000 steps) is in bench/toys.py."""
    cfg = ToyConfig(n_features=200, n_hidden=20, importance=1.0, probabilities=tuple(sparsity_levels(20)[5:11]), steps=3000)
    result = train_toy(cfg, show_progress=False)
    d_star = dimensions_per_feature(result.W)
    assert int(((d_star - 0.5).abs() <= 0.03).sum()) >= 3, d_star
    keep = result.W.norm(dim=-1) > 0.5
    lines = {round(line.fraction, 3): line for line in fraction_lines(feature_dimensionality(result.W)[keep])}
    assert lines[0.5].count >= 50 and lines[0.5].ratio >= 5, lines[0.5]
    others = [line for f, line in lines.items() if f != 0.5 and line.count >= 10 and line.ratio >= 1.5]
    assert others, lines
