"""mechscope: mechanistic interpretability for any HuggingFace causal LM."""

import importlib

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
from mechscope.models.load import LOCAL_FAMILIES, LocalFamily

# The tiny models of `mechscope.toys.tiny_model` are registered with transformers when a folder of them
# loads (importing their modelling code here would add seconds to every `import mechscope`).
LOCAL_FAMILIES["mechscope_tiny"] = LocalFamily(
    register=lambda: importlib.import_module("mechscope.toys.tiny_model"),
    files=("config.json", "model.safetensors", "tokenizer.json"),
)

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
