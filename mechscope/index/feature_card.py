"""A feature card: what one dictionary feature writes, the features nearest it, and what an index knows of it.

1. logit effects: the feature's decoder direction (raw units, at each site the dictionary writes)
   carried to the unembedding as a neuron's output weight is (`card.residual_logits`), centred on the
   vocabulary mean (`card.ranked_tokens`). Which written sites count:
   - residual-stream states (`hook_embed`, `hook_resid_pre/mid/post`; several layers for a crosscoder):
     the deepest one only, which already carries what the earlier ones write;
   - what a block adds (`hook_attn_out`, `hook_mlp_out`, `hook_pos_embed`; the MLP outputs of a
     cross-layer transcoder): their sum;
   - neurons (`blocks.L.mlp.hook_post`, an SAE on the MLP's hidden layer): through the MLP's output
     projection and, where the family has one, its branch norm;
   - anything else (`attn.hook_z`, the norms' outputs): no logit effects.
2. nearest features: the other features whose decoder rows (over every written site) have the
   highest cosine with this one's.
3. from an index built with the dictionary (`index build --dict`, found by its weights' digest): the
   unit card of `f:NAME:F` (statistics, histogram, input tokens), with the logit effects as its
   output tokens; its top examples and samples come from `Index.top` / `Index.samples` as for a neuron.

>>> d = load_any("runs/res5/dictionary", model=model)
>>> card = feature_card(model, d, 123, index=Index("features.duckdb", model=model))
>>> [t.token for t in card.promoted], card.nearest[0]
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

from mechscope.dictionaries.dictionary import Dictionary
from mechscope.index.card import OutputToken, UnitCard, mlp_output_weight, ranked_tokens, residual_logits, unit_card
from mechscope.index.features import check_feature, indexed_features, site_name
from mechscope.index.query import Index

STATES = ("hook_embed", "hook_resid_pre", "hook_resid_mid", "hook_resid_post")
ADDED = ("hook_attn_out", "hook_mlp_out", "hook_pos_embed")


class Neighbour(NamedTuple):
    feature: int
    cosine: float
    """Cosine of the two features' decoder rows (over every written site)."""


class FeatureCard(NamedTuple):
    name: str
    """The feature as an index unit: `f:NAME:F`."""
    feature: int
    logits_via: str
    """The written sites the logit effects go through, or why there are none."""
    promoted: list[OutputToken] | None
    """Tokens the feature's decoder direction raises most (centred direct logit effect per unit of activation)."""
    suppressed: list[OutputToken] | None
    """Tokens it lowers most, most negative first."""
    nearest: list[Neighbour]
    """The features with the most similar decoder direction, highest cosine first."""
    unit: UnitCard | None
    """The index's card on the feature (None without an index holding it), output tokens as above."""
    note: str | None
    """Why `unit` is None."""
    profile: list[tuple[str, float]] = []
    """(written site, decoder norm there in raw units) for a dictionary writing several sites; [] for one."""


def decoder_direction(dictionary: Dictionary, feature: int) -> Tensor:
    """[W, d_out] what one unit of the feature's activation adds at each written site, in raw units."""
    with torch.no_grad():
        return (dictionary.W_dec[feature] / dictionary.output_scale).reshape(dictionary.n_write, dictionary.cfg.d_out)


def feature_logits(model, dictionary: Dictionary, feature: int) -> tuple[Tensor | None, str]:
    """([d_vocab] direct logit effect per unit of the feature's activation, or None; the sites it goes through)."""
    direction = decoder_direction(dictionary, feature)
    order = {name: i for i, name in enumerate(model.site_names())}
    sites = [model.site(s) for s in dictionary.cfg.write_sites]
    states = [i for i, s in enumerate(sites) if s.kind in STATES]
    writes = set(dictionary.written_sites(feature))  # a CLT feature writes its own layer and later ones
    used = [i for i, s in enumerate(sites) if (s.kind in ADDED or s.kind == "mlp.hook_post") and i in writes]
    if states:
        used.append(max(states, key=lambda i: order[sites[i].name]))
    if not used:
        kinds = ", ".join(sorted({s.kind for s in sites}))
        return None, f"no logit effects: the dictionary writes {kinds}, not the residual stream or the neurons"
    total = None
    for i in sorted(used):
        site = sites[i]
        if site.kind == "mlp.hook_post":  # neuron space: through the MLP's output projection
            w_out = mlp_output_weight(model, site.layer)
            effect = residual_logits(model, w_out @ direction[i].to(w_out.device, w_out.dtype), mlp_layer=site.layer)
        else:
            effect = residual_logits(model, direction[i])
        total = effect if total is None else total + effect
    return total, ", ".join(sites[i].name for i in sorted(used))


def nearest_features(dictionary: Dictionary, feature: int, n: int = 5) -> list[Neighbour]:
    """The n other features whose decoder rows have the highest cosine with `feature`'s."""
    with torch.no_grad():
        rows = (dictionary.W_dec / dictionary.output_scale).float()
        rows = rows / rows.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        cosine = rows @ rows[feature]
        cosine[feature] = -float("inf")
        top = cosine.topk(min(n, dictionary.d_sae - 1))
    return [Neighbour(int(i), float(c)) for i, c in zip(top.indices, top.values, strict=True)]


def feature_card(
    model,
    dictionary: Dictionary,
    feature: int,
    index: Index | None = None,
    name: str = "dictionary",
    n_out: int = 10,
    n_near: int = 5,
    n_tokens: int = 10,
) -> FeatureCard:
    """Everything on one feature: logit effects, nearest features, and, from `index`, its unit card.

    `name` names the dictionary where the index does not (it names a dictionary it holds as it was
    built). Raises `MechscopeError` for a feature out of range.
    """
    check_feature(dictionary, feature, name)
    logits, via = feature_logits(model, dictionary, feature)
    promoted, suppressed = ranked_tokens(model, logits, n_out) if logits is not None else (None, None)
    nearest = nearest_features(dictionary, feature, n_near)
    site = indexed_features(index.meta, dictionary) if index is not None else None
    unit, note = None, None
    if site is not None:
        unit = unit_card(index, f"{site}:{feature}", n_tokens=n_tokens)._replace(promoted=promoted, suppressed=suppressed)
    elif index is None:
        note = "no index: top examples, histogram and input tokens need `mechscope index build --dict DIR`"
    else:
        note = (
            f"{str(Path(index.path))!r} holds no feature of this dictionary: top examples, histogram and input tokens "
            "need `mechscope index build --dict DIR`"
        )
    unit_name = f"{site or site_name(name)}:{feature}"
    norms = dictionary.decoder_profile()[feature].tolist() if dictionary.n_write > 1 else []
    profile = list(zip(dictionary.cfg.write_sites, norms, strict=False))
    return FeatureCard(unit_name, feature, via, promoted, suppressed, nearest, unit, note, profile)
