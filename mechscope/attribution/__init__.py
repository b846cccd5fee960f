"""Attribution: which heads and neurons write a prediction, and what changing them does."""

from mechscope.attribution.dla import Attribution, direct_logit_attribution
from mechscope.attribution.interventions import (
    Generation,
    Intervention,
    InterventionResult,
    TokenDelta,
    from_options,
    generate,
    intervene,
    writes,
)
from mechscope.attribution.units import Unit, parse_assignment, parse_unit, parse_units

__all__ = [
    "Attribution",
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
