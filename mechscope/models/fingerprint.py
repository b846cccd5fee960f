"""A short, stable fingerprint of a model, so that an index, a store or a dictionary built on one model
is not used with another."""

from __future__ import annotations

import hashlib
import json

from mechscope.models.placement import stored


def model_fingerprint(model) -> str:
    """A short hash of the model's configuration and of some of its weights (16 hex digits)."""
    config = {k: v for k, v in model.config.to_dict().items() if k not in ("_name_or_path", "transformers_version", "dtype")}
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    for name, param in list(model.hf.named_parameters())[:3]:
        values = stored(model.hf, name, param)  # an offloaded weight's values, not its meta placeholder
        digest.update(values.detach().flatten()[:4096].float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]
