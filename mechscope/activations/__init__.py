"""Site activations for dictionary training: streamed from the model, or harvested to a disk store and read back."""

from mechscope.activations.source import ModelSource, StreamSpec, TensorSource, batches, site_width
from mechscope.activations.store import HarvestSettings, StoreSource, harvest, read_manifest

__all__ = [
    "HarvestSettings",
    "ModelSource",
    "StoreSource",
    "StreamSpec",
    "TensorSource",
    "batches",
    "harvest",
    "read_manifest",
    "site_width",
]
