"""mechscope: mechanistic interpretability for any HuggingFace causal LM."""

from mechscope.attribution import (
    Intervention,
    activation_patching,
    attribution_patching,
    direct_logit_attribution,
    intervene,
    rank_units,
)
from mechscope.errors import MechscopeError
from mechscope.lens import LensResult, Prediction, logit_lens, predict
from mechscope.models import Edit, Model, RunOutput, Site, add, load, replace

__all__ = [
    "Intervention",
    "activation_patching",
    "attribution_patching",
    "direct_logit_attribution",
    "intervene",
    "rank_units",
    "Edit",
    "LensResult",
    "MechscopeError",
    "Prediction",
    "logit_lens",
    "predict",
    "Model",
    "RunOutput",
    "Site",
    "add",
    "load",
    "replace",
]
