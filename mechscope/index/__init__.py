"""Max-activating examples, histograms and densities of neurons (and any site's dimensions), in DuckDB."""

from mechscope.index.build import IndexSettings, build_index, default_index_path, merge_indexes
from mechscope.index.card import UnitCard, unit_card
from mechscope.index.query import Example, Index

__all__ = [
    "IndexSettings",
    "build_index",
    "default_index_path",
    "merge_indexes",
    "UnitCard",
    "unit_card",
    "Example",
    "Index",
]
