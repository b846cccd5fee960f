"""Attribution: which heads and neurons write a prediction, and what changing them does."""

from mechscope.attribution.activations import (
    AttentionPattern,
    TokenValues,
    attention_pattern,
    direction_activations,
    head_activations,
    neuron_activations,
    unit_activations,
)
from mechscope.attribution.dla import Attribution, direct_logit_attribution
from mechscope.attribution.effects import Generation, InterventionResult, TokenDelta, generate, intervene
from mechscope.attribution.interventions import Intervention, from_options, writes
from mechscope.attribution.patching import (
    PatchingResult,
    activation_patching,
    attribution_patching,
    compare,
    patch_naive,
    patched_metric,
)
from mechscope.attribution.rankings import Rankings, rank_units, rankings_table
from mechscope.attribution.units import Unit, parse_assignment, parse_unit, parse_units

__all__ = [
    "AttentionPattern",
    "TokenValues",
    "attention_pattern",
    "direction_activations",
    "head_activations",
    "neuron_activations",
    "unit_activations",
    "Attribution",
    "PatchingResult",
    "Rankings",
    "rank_units",
    "rankings_table",
    "activation_patching",
    "attribution_patching",
    "compare",
    "patch_naive",
    "patched_metric",
    "Generation",
    "Intervention",
    "InterventionResult",
    "TokenDelta",
    "Unit",
    "direct_logit_attribution",
    "from_options",
    "generate",
    "intervene",
    "parse_assignment",
    "parse_unit",
    "parse_units",
    "writes",
]
