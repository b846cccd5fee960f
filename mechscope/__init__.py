"""mechscope: mechanistic interpretability for any HuggingFace causal LM."""

from mechscope.errors import MechscopeError
from mechscope.models import Edit, Model, RunOutput, Site, add, load, replace

__all__ = ["Edit", "MechscopeError", "Model", "RunOutput", "Site", "add", "load", "replace"]
