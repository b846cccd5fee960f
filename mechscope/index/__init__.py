"""Max-activating examples, histograms and densities of neurons, any site's dimensions and dictionary features, in DuckDB."""

from mechscope.index.build import build_index, default_index_path, merge_indexes
from mechscope.index.card import UnitCard, unit_card
from mechscope.index.feature_card import FeatureCard, feature_card
from mechscope.index.query import Example, Index, UnfinishedIndexWarning
from mechscope.index.settings import IndexSettings, SettingError

__all__ = [
    "IndexSettings",
    "SettingError",
    "build_index",
    "default_index_path",
    "merge_indexes",
    "UnitCard",
    "unit_card",
    "FeatureCard",
    "feature_card",
    "Example",
    "Index",
    "UnfinishedIndexWarning",
]
