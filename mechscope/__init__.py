"""mechscope: mechanistic interpretability for any HuggingFace causal LM."""

from mechscope.errors import MechscopeError
from mechscope.lens import LensResult, Prediction, logit_lens, predict
from mechscope.models import Edit, Model, RunOutput, Site, add, load, replace

__all__ = [
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
