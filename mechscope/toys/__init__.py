"""Toy models: superposition in models small enough to understand completely (Elhage et al. 2022)."""

from mechscope.toys.superposition import (
    ToyConfig,
    ToyModel,
    ToyResult,
    dimensions_per_feature,
    feature_dimensionality,
    represented,
    superposition,
    train_toy,
)

__all__ = [
    "ToyConfig",
    "ToyModel",
    "ToyResult",
    "dimensions_per_feature",
    "feature_dimensionality",
    "represented",
    "superposition",
    "train_toy",
]
