"""Pictures of toy models of superposition, each as a PNG (matplotlib) and as an interactive plotly figure.

- `features_*`: per sparsity level, W Wᵀ (feature × feature, W [n, m]) as a heatmap above each
  feature's norm ‖W_i‖ as a bar coloured by its superposition Σ_{j≠i} (Ŵ_i · W_j)²;
- `geometry_*`: the m = 2 embeddings drawn as vectors, one panel per sparsity level;
- `phase_*`: the predicted and trained phase diagrams of two features in one dimension;
- `dimensionality_*`: D* against 1/(1 − S), and every feature's D_i as a scatter with the fractions drawn.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from mechscope.toys.phase import PHASES, PhaseDiagram
from mechscope.toys.superposition import (
    FRACTIONS,
    ToyResult,
    dimensions_per_feature,
    feature_dimensionality,
    superposition,
)
from mechscope.viz.report import save_png

PHASE_COLOURS = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8c8c8c")
"""One colour per entry of `PHASES`."""
FRACTION_LABELS = ("1", "3/4", "2/3", "1/2", "2/5", "3/8")


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _title(result: ToyResult) -> str:
    kind = "linear toy model" if not result.cfg.relu else "toy model"
    return f"{kind}: {result.cfg.n_features} features in {result.cfg.n_hidden} dimensions"


def _sparsity(p: float) -> str:
    return f"S = {1 - p:.3g}"


def features_png(result: ToyResult, out: str | Path) -> Path:
    """W Wᵀ and the feature norms coloured by superposition, one column per instance of `result`."""
    plt = _plt()
    from matplotlib.ticker import MaxNLocator

    count = len(result.probabilities)
    fig, axes = plt.subplots(2, count, figsize=(2.3 * count + 1, 6), squeeze=False, constrained_layout=True)
    interference = superposition(result.W).clamp(0, 2)  # 1: an antipodal pair; about 2: a pentagon
    norms = result.W.norm(dim=-1)
    for j, p in enumerate(result.probabilities):
        gram = result.W[j] @ result.W[j].T
        image = axes[0, j].imshow(gram.numpy(), cmap="RdBu_r", vmin=-1.5, vmax=1.5)
        axes[0, j].set_title(_sparsity(p), fontsize=9)
        axes[0, j].set_xticks([]), axes[0, j].set_yticks([])
        n = len(norms[j])
        axes[1, j].barh(range(n), norms[j].numpy(), color=plt.cm.viridis(interference[j].numpy() / 2))
        axes[1, j].yaxis.set_major_locator(MaxNLocator(integer=True))
        axes[1, j].invert_yaxis()
        axes[1, j].set_xlim(0, max(1.5, float(norms.max()) * 1.05))
        axes[1, j].set_xlabel("‖W_i‖", fontsize=8)
        axes[1, j].tick_params(labelsize=7)
    axes[0, 0].set_ylabel("W Wᵀ (feature × feature)", fontsize=8)
    axes[1, 0].set_ylabel("feature i", fontsize=8)
    fig.colorbar(image, ax=axes[0, :], shrink=0.8, label="W_i · W_j")
    bar = plt.cm.ScalarMappable(cmap="viridis", norm=plt.Normalize(0, 2))
    fig.colorbar(bar, ax=axes[1, :], shrink=0.8, label="superposition Σ_j≠i (Ŵ_i·W_j)², capped at 2")
    fig.suptitle(_title(result), fontsize=11)
    return save_png(fig, out)


def geometry_png(result: ToyResult, out: str | Path) -> Path:
    """Each instance's m = 2 embeddings W_i as arrows from the origin, numbered by importance rank."""
    plt = _plt()
    count = len(result.probabilities)
    fig, axes = plt.subplots(1, count, figsize=(max(2.6 * count, 6.0), 3.1), squeeze=False, constrained_layout=True)
    limit = max(1.3, float(result.W.abs().max()) * 1.15)
    colours = plt.cm.viridis(torch.linspace(0, 0.9, result.cfg.n_features).numpy())
    for ax, W, p in zip(axes[0], result.W, result.probabilities, strict=True):
        for i, (x, y) in enumerate(W.tolist()):
            ax.annotate("", (x, y), (0, 0), arrowprops=dict(arrowstyle="->", color=colours[i], lw=1.5))
            if math.hypot(x, y) > 0.2:
                ax.text(x * 1.08, y * 1.08, str(i), fontsize=7, ha="center", va="center")
        ax.set_xlim(-limit, limit), ax.set_ylim(-limit, limit)
        ax.set_aspect("equal")
        ax.set_title(_sparsity(p), fontsize=9)
        ax.tick_params(labelsize=7)
    # two lines: with few panels, one line is wider than the figure and is cut at both ends
    fig.suptitle(f"{_title(result)}\nembeddings W_i in the 2 hidden dimensions (number = importance rank)", fontsize=9)
    return save_png(fig, out)


def phase_png(diagram: PhaseDiagram, out: str | Path) -> Path:
    """The predicted and the trained phase per (density, relative importance) cell; boundary cells dotted."""
    plt = _plt()
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6), constrained_layout=True)
    cmap = ListedColormap(PHASE_COLOURS)
    edge = diagram.boundary
    for ax, grid, title in ((axes[0], diagram.predicted, "theory: lowest expected loss"),
                            (axes[1], diagram.trained, "trained: best of several starts")):  # fmt: skip
        ax.imshow(grid.numpy(), cmap=cmap, vmin=0, vmax=len(PHASES) - 1, origin="lower", aspect="auto")
        rows, cols = torch.nonzero(edge, as_tuple=True)
        ax.plot(cols.numpy(), rows.numpy(), "k.", ms=3)
        if grid is diagram.trained:
            wrong = torch.nonzero(diagram.trained != diagram.predicted, as_tuple=True)
            ax.plot(wrong[1].numpy(), wrong[0].numpy(), "wx", ms=6, mew=1.5)
        ax.set_xticks(range(len(diagram.densities)), [f"{d:.2g}" for d in diagram.densities], rotation=60, fontsize=7)
        ax.set_yticks(range(len(diagram.importances)), [f"{r:.2g}" for r in diagram.importances], fontsize=7)
        ax.set_xlabel("feature density p")
        ax.set_ylabel("relative importance of feature 2")
        ax.set_title(title, fontsize=10)
    handles = [Patch(color=c, label=name) for c, name in zip(PHASE_COLOURS, PHASES, strict=True)]
    fig.legend(handles=handles, loc="outside right center", fontsize=8)
    fig.suptitle(
        f"2 features in 1 dimension: agreement {diagram.agreement:.0%} away from the boundaries "
        "(dots: boundary cells; x: trained differs)", fontsize=10,
    )  # fmt: skip
    return save_png(fig, out)


def dimensionality_png(result: ToyResult, out: str | Path) -> Path:
    """D* against 1/(1 − S) with the 1/2 line, and every represented feature's D_i against 1/(1 − S)."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharex=True, constrained_layout=True)
    inverse = [1 / p for p in result.probabilities]
    axes[0].plot(inverse, dimensions_per_feature(result.W).tolist(), "o-", ms=3)
    axes[0].axhline(0.5, color="grey", lw=0.8, ls="--")
    axes[0].set_ylabel("D* = m / ‖W‖²_F (dimensions per feature)")
    D, norms = feature_dimensionality(result.W), result.W.norm(dim=-1)
    for x, d, n in zip(inverse, D, norms, strict=True):
        keep = n > 0.5
        axes[1].scatter([x] * int(keep.sum()), d[keep].numpy(), s=3, alpha=0.35, color="#4c72b0")
    for f, label in zip(FRACTIONS, FRACTION_LABELS, strict=True):
        axes[1].axhline(f, color="grey", lw=0.6, ls=":")
        axes[1].text(inverse[-1] * 1.05, f, label, fontsize=7, va="center")
    axes[1].set_ylabel("feature dimensionality D_i")
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    for ax in axes:
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())  # no "2 x 10^0" labels crowding the decade
        ax.set_xlabel("1 / (1 − S)")
    fig.suptitle(_title(result), fontsize=11)
    return save_png(fig, out)


def features_figure(result: ToyResult):
    """The plotly twin of `features_png`: W Wᵀ heatmaps and norm bars per instance, values on hover."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    count = len(result.probabilities)
    fig = make_subplots(2, count, subplot_titles=[_sparsity(p) for p in result.probabilities], vertical_spacing=0.08)
    interference = superposition(result.W)
    for j in range(count):
        W = result.W[j]
        fig.add_trace(go.Heatmap(z=(W @ W.T).tolist(), zmin=-1.5, zmax=1.5, colorscale="RdBu", reversescale=True,
                                 showscale=j == 0, colorbar=dict(title="W_i·W_j", len=0.45, y=0.78),
                                 hovertemplate="i=%{y} j=%{x}: %{z:.3f}<extra></extra>"), 1, j + 1)  # fmt: skip
        fig.add_trace(go.Bar(x=W.norm(dim=-1).tolist(), y=list(range(len(W))), orientation="h",
                             marker=dict(color=interference[j].tolist(), colorscale="Viridis", cmin=0, cmax=2,
                                         showscale=j == 0, colorbar=dict(title="superposition", len=0.45, y=0.22)),
                             customdata=interference[j].tolist(),
                             hovertemplate="feature %{y}: ‖W_i‖ %{x:.3f}, superposition %{customdata:.3f}<extra></extra>"),
                      2, j + 1)  # fmt: skip
        fig.update_yaxes(autorange="reversed", row=1, col=j + 1)
        fig.update_yaxes(autorange="reversed", row=2, col=j + 1)
    fig.update_layout(height=640, showlegend=False, title=_title(result))
    return fig


def geometry_figure(result: ToyResult):
    """The plotly twin of `geometry_png`: each m = 2 embedding as a line from the origin, feature on hover."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    count = len(result.probabilities)
    fig = make_subplots(1, count, subplot_titles=[_sparsity(p) for p in result.probabilities])
    limit = max(1.3, float(result.W.abs().max()) * 1.15)
    for j, W in enumerate(result.W):
        for i, (x, y) in enumerate(W.tolist()):
            fig.add_trace(go.Scatter(x=[0, x], y=[0, y], mode="lines+markers", marker=dict(size=[0, 7]),
                                     name=f"feature {i}", hovertemplate=f"feature {i}: ({x:.3f}, {y:.3f})<extra></extra>"),
                          1, j + 1)  # fmt: skip
        fig.update_xaxes(range=[-limit, limit], row=1, col=j + 1)
        fig.update_yaxes(range=[-limit, limit], scaleanchor=f"x{j + 1 if j else ''}", row=1, col=j + 1)
    fig.update_layout(height=360, showlegend=False, title="feature embeddings in the 2 hidden dimensions")
    return fig


def phase_figure(diagram: PhaseDiagram):
    """The plotly twin of `phase_png`: predicted and trained phases, every candidate's loss on hover."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(1, 2, subplot_titles=["theory: lowest expected loss", "trained: best of several starts"])
    x = [f"{d:.2g}" for d in diagram.densities]
    y = [f"{r:.2g}" for r in diagram.importances]
    loss = diagram.candidate_loss
    text = [[f"{PHASES[int(diagram.predicted[a, b])]} predicted, {PHASES[int(diagram.trained[a, b])]} trained<br>"
             + "<br>".join(f"{name}: {float(loss[a, b, c]):.3g}" for c, name in enumerate(PHASES[:4]))
             for b in range(len(x))] for a in range(len(y))]  # fmt: skip
    scale = [[k / (len(PHASES) - 1), c] for k, c in enumerate(PHASE_COLOURS)]
    for col, grid in ((1, diagram.predicted), (2, diagram.trained)):
        fig.add_trace(go.Heatmap(z=grid.tolist(), x=x, y=y, zmin=0, zmax=len(PHASES) - 1, colorscale=scale,
                                 text=text, hovertemplate="p=%{x}, r=%{y}<br>%{text}<extra></extra>",
                                 showscale=col == 2, colorbar=dict(tickvals=list(range(len(PHASES))), ticktext=list(PHASES))),
                      1, col)  # fmt: skip
        fig.update_xaxes(title="feature density p", row=1, col=col)
        fig.update_yaxes(title="relative importance of feature 2", row=1, col=col)
    fig.update_layout(height=460, title=f"2 features in 1 dimension: agreement {diagram.agreement:.0%} away from the boundaries")
    return fig


def dimensionality_figure(result: ToyResult):
    """The plotly twin of `dimensionality_png`: D* and the D_i scatter, each feature's number on hover."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    inverse = [1 / p for p in result.probabilities]
    fig = make_subplots(1, 2, subplot_titles=["D* = m / ‖W‖²_F", "feature dimensionality D_i"])
    fig.add_trace(go.Scatter(x=inverse, y=dimensions_per_feature(result.W).tolist(), mode="lines+markers", name="D*"), 1, 1)
    D, norms = feature_dimensionality(result.W), result.W.norm(dim=-1)
    xs, ys, names = [], [], []
    for x, d, n in zip(inverse, D, norms, strict=True):
        for i in torch.nonzero(n > 0.5).flatten().tolist():
            xs.append(x), ys.append(float(d[i])), names.append(i)
    fig.add_trace(go.Scatter(x=xs, y=ys, mode="markers", marker=dict(size=4, opacity=0.4), customdata=names,
                             name="D_i", hovertemplate="feature %{customdata}: D_i %{y:.3f}<extra></extra>"), 1, 2)  # fmt: skip
    for f in FRACTIONS:
        fig.add_hline(y=f, line=dict(color="grey", width=0.6, dash="dot"), row=1, col=2)
    fig.add_hline(y=0.5, line=dict(color="grey", width=0.8, dash="dash"), row=1, col=1)
    fig.update_xaxes(type="log", title="1 / (1 − S)")
    fig.update_layout(height=440, showlegend=False)
    return fig
