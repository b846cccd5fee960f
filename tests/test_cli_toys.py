"""`mechscope toy ...`: each command trains, prints its headline numbers and writes its PNG and HTML plots;
bad settings are one line before any training."""

import pytest
from conftest import invoke_cli

from mechscope import cli_toys


def run(monkeypatch, capsys, *argv):
    return invoke_cli(monkeypatch, capsys, "toy", *argv, consoles=(cli_toys,))


def test_superposition_writes_its_plots(monkeypatch, capsys, tmp_path):
    code, out, err = run(monkeypatch, capsys, "superposition", "--sparsity", "0,0.99", "--seeds", "1", "--steps", "300",
                         "--out", tmp_path)  # fmt: skip
    assert code == 0, err
    assert "5 features in 2 dimensions" in out and "D* = m/‖W‖²_F" in out and "geometry" in out
    for name in ("features.png", "geometry.png", "dimensionality.png", "toy.html", "plotly.min.js"):
        assert (tmp_path / name).stat().st_size > 1000, name
    assert "W Wᵀ and feature norms" in (tmp_path / "toy.html").read_text()


def test_phase_diagram_and_dimensionality_run(monkeypatch, capsys, tmp_path):
    code, out, err = run(monkeypatch, capsys, "phase-diagram", "--densities", "3", "--importances", "2", "--seeds", "1",
                         "--steps", "100", "--out", tmp_path / "phase")  # fmt: skip
    assert code == 0, err
    assert "agreement of the trained phase with theory" in out and (tmp_path / "phase" / "phase.png").exists()
    code, out, err = run(monkeypatch, capsys, "dimensionality", "--n", "20", "--m", "4", "--levels", "3", "--steps", "100",
                         "--out", tmp_path / "dim")  # fmt: skip
    assert code == 0, err
    assert "within 0.03 of 1/2" in out and (tmp_path / "dim" / "dimensionality.png").exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["superposition", "--n", "5", "--m", "5"], "error: --m 5 is not below --n 5"),
        (["superposition", "--sparsity", "1"], "error: --sparsity 1 is out of range: S must be in [0, 1)"),
        (["superposition", "--sparsity", "0.5,x"], "error: --sparsity 'x' is not a number"),
        (["superposition", "--steps", "0"], "error: --steps 0 is out of range"),
        (["superposition", "--importance", "0"], "error: --importance 0.0 is out of range: give a decay in (0, 1]"),
        (["dimensionality", "--n", "10", "--m", "20"], "error: --m 20 is not below --n 10"),
        (["phase-diagram", "--densities", "1"], "error: --densities 1 is out of range"),
        (["phase-diagram", "--seeds", "64", "--densities", "50", "--importances", "50"], "instances requested"),
        (["superposition", "--n", "10000", "--m", "9999", "--seeds", "64"], "GiB, more than half of this machine's"),
        (["dimensionality", "--n", "10000", "--m", "9999", "--levels", "200"], "train fewer instances"),
    ],
)
def test_bad_settings_are_one_line(monkeypatch, capsys, tmp_path, argv, message):
    code, out, err = run(monkeypatch, capsys, *argv, "--out", tmp_path)
    assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, err
    assert not list(tmp_path.iterdir())  # nothing trained, nothing written
