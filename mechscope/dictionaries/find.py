"""Finding the features of a concept: which latents fire on texts that mention it, and not elsewhere.

Given a few texts that mention a concept (in different words or languages) and, optionally, texts
that do not, each feature is scored per text by its largest activation on that text's tokens (on the
marked span only, where a text marks the concept as `[[...]]`). Against the texts that do not mention
the concept (by default, held-out contexts of the built-in corpus):

    coverage    = fraction of concept texts on which the feature fires
    concept     = mean over concept texts of its largest activation
    elsewhere   = mean over the other texts of its largest activation
    selectivity = coverage x (concept - elsewhere) / (concept + elsewhere)

Features are ranked by selectivity x concept, so a feature must fire on every phrasing, fire harder
there than anywhere else, and fire strongly to rank first.
"""

from __future__ import annotations

import re
from typing import NamedTuple

import torch
from torch import Tensor

from mechscope.data import corpus, held_out, pack
from mechscope.dictionaries.dictionary import Dictionary
from mechscope.errors import MechscopeError

_MARK = re.compile(r"\[\[(.+?)\]\]", re.S)


class FoundFeature(NamedTuple):
    feature: int
    score: float
    coverage: float
    concept: float
    """Mean over concept texts of the feature's largest activation."""
    elsewhere: float
    """Mean over the other texts of its largest activation."""


def _marked(model, text: str) -> tuple[str, list[tuple[int, int]] | None]:
    """The text without markers, and the character spans it marked (None: no marks)."""
    spans, plain, last = [], [], 0
    for m in _MARK.finditer(text):
        plain.append(text[last : m.start()])
        start = sum(len(p) for p in plain)
        plain.append(m.group(1))
        spans.append((start, start + len(m.group(1))))
        last = m.end()
    plain.append(text[last:])
    return "".join(plain), spans or None


def _max_per_text(model, dictionary: Dictionary, texts: list[str], skip: int) -> Tensor:
    """[n_texts, F] each feature's largest activation on each text (over marked tokens where marked)."""
    reads = list(dictionary.cfg.read_sites)
    out = []
    for raw in texts:
        text, spans = _marked(model, raw)
        enc = model.tokenizer(text, return_offsets_mapping=True)
        ids = torch.tensor([enc["input_ids"]], device=model.device)
        cache = model.run(ids, read=reads).cache
        x = torch.stack([cache[s][0] for s in reads], dim=1).squeeze(1)  # [pos, (R,) d]
        acts = dictionary.encode_dense(x.float())  # [pos, F]
        keep = torch.zeros(ids.shape[1], dtype=torch.bool)
        if spans is None:
            keep[min(skip, ids.shape[1] - 1) :] = True  # the attention-sink positions are left out
        else:
            for i, (a, b) in enumerate(enc["offset_mapping"]):
                keep[i] = any(a < e and b > s for s, e in spans)
        if not keep.any():
            raise MechscopeError(f"text {raw!r} has no tokens to score: mark a span with [[...]] or give a longer text")
        out.append(acts[keep].max(0).values)
    return torch.stack(out)


@torch.no_grad()
def find_features(
    model, dictionary: Dictionary, concept: list[str], others: list[str] | None = None, top: int = 10, n_contexts: int = 32
) -> list[FoundFeature]:
    """The `top` features most selective for the concept the texts in `concept` mention (see the module docstring).

    >>> find_features(model, sae, ["The cat sat on the mat.", "Le chat dort.", "Die Katze schläft."], top=5)
    """
    if not concept:
        raise MechscopeError("no concept texts given: give a few texts that mention the concept")
    if not isinstance(top, int) or not 1 <= top <= dictionary.d_sae:
        raise MechscopeError(f"top={top!r} is invalid: give 1..{dictionary.d_sae}")
    skip = max(dictionary.cfg.skip_positions, 1)
    pos = _max_per_text(model, dictionary, concept, skip)
    if others:
        neg = _max_per_text(model, dictionary, others, skip)
    else:  # held-out contexts of the built-in corpus stand for "everything else"
        batch = next(pack(held_out(corpus())[1], model.tokenizer, 64, seed=1, batch_size=n_contexts, max_contexts=n_contexts))
        cache = model.run(batch.tokens.to(model.device), read=list(dictionary.cfg.read_sites)).cache
        x = torch.stack([cache[s][:, skip:] for s in dictionary.cfg.read_sites], dim=2)
        acts = dictionary.encode_dense(x.squeeze(2).float() if x.shape[2] == 1 else x.float())
        neg = acts.max(1).values  # [contexts, F]
    coverage = (pos > 0).double().mean(0)
    concept_mean, elsewhere = pos.double().mean(0), neg.double().mean(0)
    selectivity = coverage * (concept_mean - elsewhere) / (concept_mean + elsewhere).clamp_min(1e-9)
    score = selectivity * concept_mean
    best = score.topk(top).indices.tolist()
    return [FoundFeature(i, float(score[i]), float(coverage[i]), float(concept_mean[i]), float(elsewhere[i])) for i in best]
