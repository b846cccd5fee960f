"""Toy models: superposition in models small enough to understand completely (Elhage et al. 2022), and small
transformers with GELU, SoLU or TopK MLPs trained from scratch (`tiny_train`; the model class itself,
`tiny_model`, is imported only when a folder of it loads)."""

from mechscope.toys.phase import PHASES, PhaseDiagram, expected_loss, phase_diagram
from mechscope.toys.superposition import (
    FRACTIONS,
    ToyConfig,
    ToyModel,
    ToyResult,
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
from mechscope.toys.tiny_train import TinyRun, TinyTrainConfig, train_tiny

__all__ = [
    "FRACTIONS",
    "PHASES",
    "PhaseDiagram",
    "TinyRun",
    "TinyTrainConfig",
    "ToyConfig",
    "ToyModel",
    "ToyResult",
    "dimensions_per_feature",
    "expected_loss",
    "feature_dimensionality",
    "fraction_lines",
    "phase_diagram",
    "planar_geometry",
    "represented",
    "sparsity_levels",
    "superposition",
    "train_instances",
    "train_tiny",
    "train_toy",
]
