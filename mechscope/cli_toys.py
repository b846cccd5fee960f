"""Commands: toy superposition, toy phase-diagram, toy dimensionality (toy models of superposition).

`register(app)` adds the `toy` group to the `mechscope` command; it follows its conventions (`cli_common`):
numbers and output folders are checked before any training, errors are one line. Each command writes
its plots as PNG and as one HTML page (plotly, its script beside the page) and prints the headline numbers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from mechscope.cli_common import check_folder, check_range, shown
from mechscope.errors import MechscopeError

console = Console()
toy_app = typer.Typer(no_args_is_help=True, help="Toy models of superposition (Elhage et al. 2022): train, measure, plot.")

OutOpt = Annotated[Path, typer.Option("--out", "-o", help="Folder for the PNG and HTML plots.")]
SeedsOpt = Annotated[int, typer.Option(help="Instances trained from random starts per setting; the lowest-loss one is kept.")]
StepsOpt = Annotated[int, typer.Option(help="Training steps (AdamW, lr 1e-3, batch 1,024).")]
MAX_STEPS = 1_000_000
DEFAULT_SPARSITY = ["0", "0.7", "0.9", "0.98", "0.99"]
MAX_INSTANCES = 4096


def register(app) -> None:
    """Add the `toy` command group to `app`."""
    app.add_typer(toy_app, name="toy")


def _sparsities(values: list[str]) -> list[float]:
    """Sparsity levels S from repeated options or comma lists, each in [0, 1)."""
    levels = []
    for item in (part.strip() for value in values for part in value.split(",")):
        try:
            level = float(item)
        except ValueError:
            raise MechscopeError(f"--sparsity {item!r} is not a number: give levels S in [0, 1), e.g. 0.9") from None
        if not 0 <= level < 1:
            raise MechscopeError(f"--sparsity {item} is out of range: S must be in [0, 1) (feature probability 1 − S)")
        levels.append(level)
    return levels


def _check_sizes(n: int, m: int) -> None:
    check_range("--n", n, 2, 10_000)
    check_range("--m", m, 1, 10_000)
    if m >= n:
        raise MechscopeError(f"--m {m} is not below --n {n}: superposition needs fewer hidden dimensions than features")


def _instances(count: int) -> None:
    if count > MAX_INSTANCES:
        raise MechscopeError(f"{count} instances requested: at most {MAX_INSTANCES} train at once (fewer levels or seeds)")


def _report(out: Path, title: str, figures: list[tuple[str, object]]) -> Path:
    from mechscope.viz.report import write_report

    return write_report(out / "toy.html", title, figures, plotly_js="beside")


def _written(paths: list[Path]) -> None:
    for path in paths:
        console.print(f"wrote {shown(path.resolve())}")


@toy_app.command("superposition")
def superposition_command(
    n: Annotated[int, typer.Option("--n", help="Features n.")] = 5,
    m: Annotated[int, typer.Option("--m", help="Hidden dimensions m (fewer than n).")] = 2,
    importance: Annotated[float, typer.Option(help="Importance decay: I_i = importance^i.")] = 0.9,
    sparsity: Annotated[list[str], typer.Option(help="Sparsity levels S (repeat, or a comma list).")] = DEFAULT_SPARSITY,  # noqa: B006
    seeds: SeedsOpt = 4,
    steps: StepsOpt = 10_000,
    linear: Annotated[bool, typer.Option(help="Train the linear model x' = h Wᵀ + b instead of the ReLU one.")] = False,
    out: OutOpt = Path("reports/toy-superposition"),
) -> None:
    """Train n features squeezed into m dimensions at each sparsity; plot W Wᵀ, norms, superposition and geometry."""
    from mechscope.toys import ToyConfig, dimensions_per_feature, planar_geometry, represented, train_toy
    from mechscope.viz import toy_plots

    _check_sizes(n, m)
    levels = _sparsities(sparsity)
    if not 0 < importance <= 1:
        raise MechscopeError(f"--importance {importance} is out of range: give a decay in (0, 1] (I_i = importance^i)")
    check_range("--seeds", seeds, 1, 64)
    check_range("--steps", steps, 1, MAX_STEPS)
    _instances(len(levels) * seeds)
    check_folder("--out", out)
    cfg = ToyConfig(n_features=n, n_hidden=m, probabilities=tuple(1 - s for s in levels), seeds=seeds,
                    importance=importance, relu=not linear, steps=steps)  # fmt: skip
    result = train_toy(cfg).best()
    kind = "linear model: " if linear else ""
    table = Table(title=f"{kind}{n} features in {m} dimensions (best of {seeds} seeds per level)", title_justify="left")
    planar = ["geometry"] if m == 2 else []
    for column in ("sparsity S", "represented", *planar, "D* = m/‖W‖²_F", "loss"):
        table.add_column(column, justify="right")
    table.caption, table.caption_justify = "represented: features with ‖W_i‖ > 0.5", "left"
    measured = represented(result.W), dimensions_per_feature(result.W), result.loss
    for s, W, count, d, loss in zip(levels, result.W, *measured, strict=True):
        shape = [planar_geometry(W)] if planar else []
        table.add_row(f"{s:g}", str(int(count)), *shape, f"{float(d):.3f}", f"{float(loss):.3e}")
    console.print(table)
    paths = [toy_plots.features_png(result, out / "features.png")]
    figures = [("W Wᵀ and feature norms", toy_plots.features_figure(result))]
    if m == 2:
        paths.append(toy_plots.geometry_png(result, out / "geometry.png"))
        figures.append(("geometry", toy_plots.geometry_figure(result)))
    if len(levels) > 1:
        paths.append(toy_plots.dimensionality_png(result, out / "dimensionality.png"))
        figures.append(("dimensions per feature", toy_plots.dimensionality_figure(result)))
    paths.append(_report(out, f"{'linear ' if linear else ''}toy model: {n} features in {m} dimensions", figures))
    _written(paths)


@toy_app.command("phase-diagram")
def phase_diagram_command(
    densities: Annotated[int, typer.Option(help="How many feature densities p (columns), log-spaced from 0.01 to 1.")] = 12,
    importances: Annotated[int, typer.Option(help="How many importances of feature 2 (rows), log-spaced from 0.1 to 10.")] = 11,
    seeds: SeedsOpt = 5,
    steps: StepsOpt = 10_000,
    out: OutOpt = Path("reports/toy-phase"),
) -> None:
    """Two features in one dimension: which solution wins, by theory and by training, over density × importance."""
    import torch

    from mechscope.toys.phase import phase_diagram
    from mechscope.viz import toy_plots

    check_range("--densities", densities, 2, 50)
    check_range("--importances", importances, 2, 50)
    check_range("--seeds", seeds, 1, 64)
    check_range("--steps", steps, 1, MAX_STEPS)
    _instances(densities * importances * seeds)
    check_folder("--out", out)
    p = [float(x) for x in 10 ** torch.linspace(-2, 0, densities, dtype=torch.float64)]
    r = [float(x) for x in 10 ** torch.linspace(-1, 1, importances, dtype=torch.float64)]
    diagram = phase_diagram(p, r, seeds=seeds, steps=steps)
    inside = int((~diagram.boundary).sum())
    console.print(
        f"agreement of the trained phase with theory: {diagram.agreement:.1%} of the {inside} cells away from the "
        f"boundaries; {diagram.single_run_same_sign:.1%} of single runs landed in the same-sign geometry"
    )
    paths = [toy_plots.phase_png(diagram, out / "phase.png")]
    paths.append(_report(out, "phase diagram: 2 features in 1 dimension", [("phase diagram", toy_plots.phase_figure(diagram))]))
    _written(paths)


@toy_app.command("dimensionality")
def dimensionality_command(
    n: Annotated[int, typer.Option("--n", help="Features n.")] = 200,
    m: Annotated[int, typer.Option("--m", help="Hidden dimensions m (fewer than n).")] = 20,
    levels: Annotated[int, typer.Option(help="Sparsity levels, p = 20^-linspace(0, 1, levels).")] = 20,
    steps: StepsOpt = 10_000,
    out: OutOpt = Path("reports/toy-dimensionality"),
) -> None:
    """Feature dimensionality D_i and D* across sparsity, with the fractions where features cluster."""
    from mechscope.toys import ToyConfig, dimensions_per_feature, train_toy
    from mechscope.toys.superposition import feature_dimensionality, fraction_lines, sparsity_levels
    from mechscope.viz import toy_plots

    _check_sizes(n, m)
    check_range("--levels", levels, 2, 200)
    check_range("--steps", steps, 1, MAX_STEPS)
    check_folder("--out", out)
    cfg = ToyConfig(n_features=n, n_hidden=m, probabilities=tuple(sparsity_levels(levels)), importance=1.0, steps=steps)
    result = train_toy(cfg)
    d_star = dimensions_per_feature(result.W)
    half = int(((d_star - 0.5).abs() <= 0.03).sum())
    console.print(f"D* from {float(d_star[0]):.3f} to {float(d_star[-1]):.3f}; within 0.03 of 1/2 at {half} of {levels} levels")
    keep = result.W.norm(dim=-1) > 0.5
    table = Table(title="represented features near each fraction (±0.01)", title_justify="left")
    for column in ("D_i", "features", "smooth background", "ratio"):
        table.add_column(column, justify="right")
    for line, label in zip(fraction_lines(feature_dimensionality(result.W)[keep]), toy_plots.FRACTION_LABELS, strict=True):
        table.add_row(label, str(line.count), f"{line.background:.1f}", f"{line.ratio:.1f}")
    console.print(table)
    paths = [toy_plots.dimensionality_png(result, out / "dimensionality.png")]
    paths.append(_report(out, f"feature dimensionality: {n} features in {m} dimensions",
                         [("dimensionality", toy_plots.dimensionality_figure(result))]))  # fmt: skip
    _written(paths)
