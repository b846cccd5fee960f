"""The explorer's JSON: every request and response of `mechscope serve` as a pydantic model.

FastAPI checks requests against these (a value out of bounds is a 422 naming the field) and publishes
them as OpenAPI at `/openapi.json`, which `/docs` lists. The bounds below are what one request may ask
for; they keep a single request from holding the model for long.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_BODY_BYTES = 64 * 1024
"""Largest request body (bytes); a larger one is a 413."""
MAX_PROMPT_CHARS = 2000
"""Longest prompt, in characters (checked by the schema)."""
MAX_PROMPT_TOKENS = 256
"""Longest prompt, in tokens (checked after tokenising)."""
MAX_K = 50
"""Most top tokens per distribution or lens cell."""
MAX_TOP = 50
"""Most units a ranking lists."""
MAX_EXAMPLES = 50
"""Most top examples a unit page lists."""
MAX_NEW_TOKENS = 64
"""Longest generation."""
MAX_TEXTS = 16
"""Most concept texts for find-feature."""

Prompt = Field(min_length=1, max_length=MAX_PROMPT_CHARS, description="The text, at most 2,000 characters and 256 tokens.")
Token = Field(default=None, min_length=1, max_length=200, description="A continuation; its first token is scored.")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# -- requests --------------------------------------------------------------------------------------------------------


class PredictRequest(Strict):
    prompt: str = Prompt
    target: str | None = Token
    k: int = Field(default=10, ge=1, le=MAX_K, description="Top tokens of the distribution.")
    lens_k: int = Field(default=5, ge=1, le=10, description="Top tokens kept per lens cell.")


class AttributeRequest(Strict):
    prompt: str = Prompt
    target: str = Field(min_length=1, max_length=200, description="The token whose log-probability is explained.")
    contrast: str | None = Token
    top: int = Field(default=10, ge=1, le=MAX_TOP, description="Candidates from each of DLA and attribution.")


class UnitRequest(Strict):
    unit: str = Field(min_length=1, max_length=200, description="A neuron `L:N`, a head `L.H` or a feature `f:NAME:F`.")
    prompt: str | None = Field(default=None, min_length=1, max_length=MAX_PROMPT_CHARS)
    n: int = Field(default=10, ge=1, le=MAX_EXAMPLES, description="Top examples from the index.")


class InterveneRequest(Strict):
    prompt: str = Prompt
    unit: str = Field(min_length=1, max_length=200)
    op: Literal["ablate", "set", "scale", "add", "clamp"] = Field(
        description="Neurons and heads: ablate (zero), set, scale. Features: ablate, add, clamp."
    )
    value: float = Field(default=0.0, ge=-1e4, le=1e4, description="The value to set or clamp to, or the factor or coefficient.")
    target: str | None = Token
    k: int = Field(default=10, ge=1, le=MAX_K)
    new_tokens: int = Field(default=0, ge=0, le=MAX_NEW_TOKENS, description="Greedy tokens to generate, with and without.")


class PatchRequest(Strict):
    clean: str = Prompt
    corrupt: str = Prompt
    target: str = Field(min_length=1, max_length=200)
    contrast: str | None = Token
    kind: Literal["hook_resid_pre", "hook_attn_out", "hook_mlp_out"] = "hook_resid_pre"


class SearchRequest(Strict):
    text: str = Field(min_length=1, max_length=200, description="A token or string: which units fire on its last token.")
    n: int = Field(default=20, ge=1, le=MAX_EXAMPLES)


class FindFeatureRequest(Strict):
    dictionary: str = Field(min_length=1, max_length=200)
    texts: list[str] = Field(min_length=1, max_length=MAX_TEXTS, description="Texts that mention the concept.")
    top: int = Field(default=10, ge=1, le=MAX_TOP)


# -- responses -------------------------------------------------------------------------------------------------------


class Info(BaseModel):
    model: str
    n_layers: int
    n_heads: int
    d_mlp: int
    d_model: int
    indexes: list[str] = Field(description="The index databases' paths; a unit's examples come from the first holding it.")
    dictionaries: list[str] = Field(description="Names of the loaded dictionaries (use them in `f:NAME:F`).")
    limits: dict[str, int]


class TokenProb(BaseModel):
    token: str
    id: int
    prob: float


class TargetOut(BaseModel):
    target: str
    token: str
    id: int
    prob: float
    rank: int


class Lens(BaseModel):
    rows: list[str] = Field(description="Row labels: embed, 0, 1, ... (the residual stream after each layer).")
    top: list[list[list[TokenProb]]] = Field(description="[row][pos][k] the most likely tokens of each cell.")
    target_prob: list[list[float]] | None = Field(description="[row][pos] P(target) in each cell, if a target was given.")


class PredictResponse(BaseModel):
    tokens: list[str]
    top: list[TokenProb]
    target: TargetOut | None
    lens: Lens


class RankedUnitOut(BaseModel):
    unit: str
    kind: str
    dla: float = Field(description="Direct contribution to logit(target) - logit(contrast).")
    attribution: float = Field(description="Attribution-patching estimate of the effect on log p(target).")
    real_effect: float = Field(description="log p(target) - log p(target with the unit ablated).")


class DlaOut(BaseModel):
    unit: str
    dla: float


class AttributeResponse(BaseModel):
    target: str
    contrast: str | None
    logprob: float
    rows: list[RankedUnitOut] = Field(description="Candidates, largest |real effect| first.")
    ranks: dict[str, dict[str, int]] = Field(description="{method: {unit: rank}} for dla, attribution, real_effect.")
    agreement: dict[str, float | None] = Field(description="Spearman correlation of each pair of methods ('a|b').")
    top_dla: list[DlaOut] = Field(description="With a contrast: the units with largest |DLA| of the difference.")


class ExampleOut(BaseModel):
    value: float
    at: int = Field(description="Index of the example's token in `tokens`.")
    tokens: list[str]
    acts: list[float | None]


class StratumOut(BaseModel):
    range: str
    examples: list[ExampleOut]


class Stats(BaseModel):
    tokens: int
    mean: float
    std: float
    max: float
    density: float


class HistogramOut(BaseModel):
    edges: list[float | None] = Field(description="Bin edges; None stands for -inf or +inf.")
    counts: list[int]


class OutputTokenOut(BaseModel):
    token: str
    weight: float


class Heatmap(BaseModel):
    tokens: list[str]
    values: list[float | None] = Field(description="One per token; None where it is not read (positions a dictionary skips).")
    label: str


class UnitResponse(BaseModel):
    unit: str
    kind: Literal["neuron", "head", "feature"]
    about: str = Field(description="Where the unit lives, in words.")
    heatmap: Heatmap | None = Field(description="The unit on the prompt, if one was given.")
    stats: Stats | None
    histogram: HistogramOut | None
    top: list[ExampleOut]
    samples: list[StratumOut]
    promoted: list[OutputTokenOut] | None
    suppressed: list[OutputTokenOut] | None
    note: str | None = Field(description="Why a part is missing (no index, a unit the index lacks, ...).")
    ops: list[str] = Field(description="The interventions this kind of unit takes.")


class DeltaOut(BaseModel):
    token: str
    prob_before: float
    prob_after: float


class InterveneResponse(BaseModel):
    intervention: str
    before: list[TokenProb]
    after: list[TokenProb]
    deltas: list[DeltaOut]
    target: DeltaOut | None
    kl: float = Field(description="KL(before || after) of the next-token distributions, nats.")
    generation_before: str | None
    generation_after: str | None


class PatchResponse(BaseModel):
    kind: str
    rows: list[str]
    cols: list[str]
    grid: list[list[float]] = Field(description="[layer][position] share of the clean metric restored (0 none, 1 all).")
    clean: float
    corrupt: float
    metric: str


class SearchHitOut(BaseModel):
    unit: str
    hits: int
    best: float
    max: float


class SearchResponse(BaseModel):
    hits: list[SearchHitOut]


class FoundFeatureOut(BaseModel):
    unit: str
    feature: int
    score: float
    concept: float
    others: float


class FindFeatureResponse(BaseModel):
    features: list[FoundFeatureOut]


class ErrorResponse(BaseModel):
    error: str = Field(description="What was wrong, in one line.")
