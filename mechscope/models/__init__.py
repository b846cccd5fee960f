"""Loading models, their sites, and reading and writing them. The only package that knows HF module names."""

from mechscope.models.hooks import Edit, Hooks, add, replace
from mechscope.models.load import load
from mechscope.models.model import Inputs, Model, RunOutput
from mechscope.models.sites import Site

__all__ = ["Edit", "Hooks", "Inputs", "Model", "RunOutput", "Site", "add", "load", "replace"]
