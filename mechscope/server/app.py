"""The web explorer's routes: JSON over the same public functions the Python API exposes.

`create_app(explorer)` builds the FastAPI application; `Explorer` holds what it serves (one model, an
optional index, dictionaries by name) and one lock, so model and index calls run one at a time while
the server accepts many connections. No route computes anything of its own: each one checks its
request, calls `predict`, `logit_lens`, `rank_units`, `intervene`, `generate`, `activation_patching`,
`unit_activations`, the index's queries or `feature_card`, and converts the answer to JSON.

Errors are JSON `{"error": "..."}`: 400 for a request the functions refuse (`MechscopeError`, one line),
413 for a body over `MAX_BODY_BYTES`, 422 for one the schema refuses, 404 for an unknown route. The
assets (HTML, JS, CSS) come from `static/` inside the package; nothing is fetched from elsewhere.
"""

from __future__ import annotations

import asyncio
import functools
import math
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException

from mechscope.errors import MechscopeError, one_of
from mechscope.server import schemas as s

STATIC = Path(str(resources.files("mechscope.server") / "static"))
_FEATURE = re.compile(r"^f:(.+):(\d+)$")


@dataclass
class Explorer:
    """What the server explores: a loaded `mechscope.Model`, index databases and dictionaries by name.

    A unit's examples come from the first index that holds it. A dictionary's name is the one an index
    holding it gave it (`f:NAME`), so its features keep the names the index knows them by."""

    model: object
    index_paths: list[Path] = field(default_factory=list)
    dictionaries: dict = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    worker: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(1, thread_name_prefix="mechscope-model"))
    """The one thread model and index calls run on, in the order requests arrive (FIFO), outside the server's pool."""
    _indexes: list = field(default_factory=list)

    @contextmanager
    def busy(self):
        """Hold the model (and the indexes' connections) for one request."""
        with self.lock:
            yield

    @property
    def indexes(self) -> list:
        """The open `Index` of each path (opened on first use, under the lock)."""
        if not self._indexes and self.index_paths:
            from mechscope.index.query import Index

            self._indexes = [Index(path, model=self.model, warn=False) for path in self.index_paths]
        return self._indexes

    def index_of(self, unit: str):
        """The first index holding `unit`, or None."""
        for index in self.indexes:
            try:
                index.unit(unit)
            except MechscopeError:
                continue
            return index
        return None

    def feature_index(self, dictionary):
        """The first index holding `dictionary`'s features, or None."""
        from mechscope.index.features import indexed_features

        return next((index for index in self.indexes if indexed_features(index.meta, dictionary)), None)

    async def call(self, fn, *args):
        """Run `fn(*args)` on the model's thread, after the requests before it; the event loop stays free meanwhile."""
        return await asyncio.get_running_loop().run_in_executor(self.worker, functools.partial(fn, *args))

    def close(self) -> None:
        self.worker.shutdown(wait=True)
        for index in self._indexes:
            index.close()
        self._indexes = []


# -- conversions ------------------------------------------------------------------------------------------------------


def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def _tokens(probs) -> list[s.TokenProb]:
    return [s.TokenProb(token=t.token, id=t.id, prob=t.prob) for t in probs]


def _example(ex) -> s.ExampleOut:
    tokens = ex.tokens if ex.tokens is not None else [str(i) for i in ex.token_ids]
    return s.ExampleOut(value=ex.value, at=ex.at, tokens=tokens, acts=[_finite(a) for a in ex.acts.tolist()])


def _out_tokens(tokens) -> list[s.OutputTokenOut] | None:
    return None if tokens is None else [s.OutputTokenOut(token=t.token, weight=t.weight) for t in tokens]


def _check_tokens(model, *prompts: str) -> None:
    for prompt in prompts:
        n = len(model.to_ids(prompt)[0])
        if n > s.MAX_PROMPT_TOKENS:
            raise MechscopeError(f"the prompt has {n} tokens: the explorer takes at most {s.MAX_PROMPT_TOKENS}")


# -- units ------------------------------------------------------------------------------------------------------------


@dataclass
class _Unit:
    name: str
    kind: str
    unit: object = None
    """The parsed neuron or head (`mechscope.attribution.units.Unit`)."""
    dictionary: object = None
    dict_name: str = ""
    feature: int = -1


def _unit(ex: Explorer, text: str) -> _Unit:
    """Parse `L:N`, `L.H` or `f:NAME:F` against the model and the loaded dictionaries (MechscopeError if invalid)."""
    from mechscope.attribution.units import parse_unit
    from mechscope.index.features import check_feature

    text = text.strip()
    found = _FEATURE.match(text)
    if found:
        name, number = found.group(1), int(found.group(2))
        if name not in ex.dictionaries:
            loaded = one_of(ex.dictionaries) if ex.dictionaries else "none (start the server with --dict DIR)"
            raise MechscopeError(f"unknown dictionary {name!r} in unit {text!r}: loaded dictionaries are {loaded}")
        check_feature(ex.dictionaries[name], number, name)
        return _Unit(text, "feature", dictionary=ex.dictionaries[name], dict_name=name, feature=number)
    unit = parse_unit(text, ex.model)
    return _Unit(str(unit), "neuron" if unit.kind == "neuron" else "head", unit=unit)


def _feature_heatmap(model, dictionary, feature: int, prompt: str) -> s.Heatmap:
    """The feature on each token of `prompt`; None on the first `skip_positions` tokens, which the dictionary
    was not trained on (their activations, at the attention sink, are far outside its range)."""
    from mechscope.index.features import feature_acts

    ids = model.to_ids(prompt)
    cache = model.run(ids, read=list(dictionary.cfg.read_sites), logits=False).cache
    values = feature_acts(dictionary, {k: v.float() for k, v in cache.items()}, skip=0)[:, feature].tolist()
    skip = dictionary.cfg.skip_positions
    values = [None if i < skip else v for i, v in enumerate(values)]
    label = f"feature {feature}" + (f" (not read on the first {skip} tokens)" if skip else "")
    return s.Heatmap(tokens=model.to_str_tokens(ids[0]), values=values, label=label)


def _index_part(ex: Explorer, name: str, n: int) -> dict:
    """Statistics, histogram, top examples and samples of `name` from the index holding it, or a note saying why not."""
    from mechscope.index.card import unit_card
    from mechscope.index.settings import SettingError

    if not ex.index_paths:
        return {"note": "no index: start the server with --db DB (built by `mechscope index build`) for examples"}
    index = ex.index_of(name)
    if index is None:
        held = "; ".join(f"{i.path.name}: {', '.join(site.site for site in i.sites)}" for i in ex.indexes)
        return {"note": f"no index holds {name}: the indexes hold {held}"}
    card = unit_card(index, name, model=ex.model)
    try:
        top = index.top(name, n)
    except SettingError as err:
        raise MechscopeError(err.worded("n")) from None
    st, hist = card.stats, card.histogram
    strata = reversed(index.samples(name))  # highest range first
    return {
        "stats": s.Stats(tokens=st.tokens, mean=st.mean, std=st.std, max=_finite(st.max) or 0.0, density=st.density),
        "histogram": s.HistogramOut(edges=[_finite(e) for e in hist.edges.tolist()], counts=hist.counts.tolist()),
        "top": [_example(e) for e in top],
        "samples": [s.StratumOut(range=x.text, examples=[_example(e) for e in x.examples]) for x in strata],
        "promoted": _out_tokens(card.promoted),
        "suppressed": _out_tokens(card.suppressed),
    }


def unit_page(ex: Explorer, req: s.UnitRequest) -> s.UnitResponse:
    from mechscope.attribution import unit_activations
    from mechscope.index.card import output_tokens

    u = _unit(ex, req.unit)
    if req.prompt:
        _check_tokens(ex.model, req.prompt)
    page: dict = {"top": [], "samples": [], "stats": None, "histogram": None, "promoted": None, "suppressed": None, "note": None}
    if u.kind == "feature":
        from mechscope.index.feature_card import feature_card

        card = feature_card(ex.model, u.dictionary, u.feature, ex.feature_index(u.dictionary), name=u.dict_name)
        cfg = u.dictionary.cfg
        writes = ", ".join(cfg.write_sites[i] for i in u.dictionary.written_sites(u.feature))
        about = f"a {cfg.kind} feature: reads {', '.join(cfg.read_sites)}; writes {writes}"
        if card.unit is not None:
            page |= _index_part(ex, card.name, req.n)
        else:
            page["note"] = card.note
        page["promoted"], page["suppressed"] = _out_tokens(card.promoted), _out_tokens(card.suppressed)
        heatmap = _feature_heatmap(ex.model, u.dictionary, u.feature, req.prompt) if req.prompt else None
        ops = ["ablate", "add", "clamp"]
    else:
        layer, number = u.unit.layer, u.unit.index
        about = f"neuron {number} of layer {layer}'s MLP" if u.kind == "neuron" else f"head {number} of layer {layer}'s attention"
        page |= _index_part(ex, u.name, req.n)
        if u.kind == "neuron" and page["promoted"] is None:
            promoted, suppressed = output_tokens(ex.model, layer, number)
            page["promoted"], page["suppressed"] = _out_tokens(promoted), _out_tokens(suppressed)
        heatmap = None
        if req.prompt:
            values = unit_activations(ex.model, req.prompt, u.name)
            heatmap = s.Heatmap(tokens=values.tokens, values=values.values.tolist(), label=values.label)
        ops = ["ablate", "set", "scale"]
    return s.UnitResponse(unit=u.name, kind=u.kind, about=about, heatmap=heatmap, ops=ops, **page)


def _intervention(ex: Explorer, u: _Unit, op: str, value: float):
    from mechscope.attribution import Intervention

    valid = ["ablate", "add", "clamp"] if u.kind == "feature" else ["ablate", "set", "scale"]
    if op not in valid:
        raise MechscopeError(f"op {op!r} does not apply to a {u.kind}: valid ops are {one_of(valid)}")
    if u.kind == "feature":
        from mechscope.dictionaries.steer import FeatureSteer

        make = {"ablate": lambda: FeatureSteer.ablate(u.dictionary, u.feature, name=u.dict_name),
                "add": lambda: FeatureSteer.add(u.dictionary, u.feature, value, name=u.dict_name),
                "clamp": lambda: FeatureSteer.clamp(u.dictionary, u.feature, value, name=u.dict_name)}  # fmt: skip
        return make[op]()
    return {"ablate": lambda: Intervention.zero(u.name), "set": lambda: Intervention.set(u.name, value),
            "scale": lambda: Intervention.scale(u.name, value)}[op]()  # fmt: skip


# -- the application --------------------------------------------------------------------------------------------------


class _BodyLimit:
    """ASGI middleware: a request body over `limit` bytes (declared or streamed) is a 413 before any route reads it."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            return await _too_large(self.limit)(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise HTTPException(413, f"the request body is over {self.limit:,} bytes")
            return message

        return await self.app(scope, counted, send)


def _too_large(limit: int):
    return JSONResponse({"error": f"the request body is over {limit:,} bytes"}, status_code=413)


def _validation_message(err: RequestValidationError) -> str:
    parts = []
    for e in err.errors():
        if e.get("type") == "json_invalid":
            return f"the request body is not valid JSON ({e.get('ctx', {}).get('error', 'decode error')})"
        where = ".".join(str(p) for p in e.get("loc", ()) if p != "body") or "body"
        parts.append(f"{where}: {e.get('msg', 'invalid')}")
    return "; ".join(parts)


def _queued(ex: Explorer, check=None):
    """Make a route's synchronous body async: `check(req)` (cheap, no model call) runs at once, so bad input is
    answered without waiting; the body then runs on the explorer's model thread, in arrival order."""

    def wrap(fn):
        @functools.wraps(fn)
        async def route(req):
            if check is not None:
                check(req)
            return await ex.call(fn, req)

        return route

    return wrap


def create_app(ex: Explorer) -> FastAPI:
    """The explorer as a FastAPI application over `ex` (no CORS: pages of other origins cannot call it)."""
    app = FastAPI(
        title="mechscope explorer",
        summary="JSON over mechscope's public functions: prediction, logit lens, attribution, units, interventions, patching.",
        docs_url=None,
        redoc_url=None,
    )
    app.add_middleware(_BodyLimit, limit=s.MAX_BODY_BYTES)
    app.state.explorer = ex

    @app.exception_handler(MechscopeError)
    async def _bad_input(request: Request, err: MechscopeError):
        return JSONResponse({"error": str(err)}, status_code=400)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, err: RequestValidationError):
        return JSONResponse({"error": _validation_message(err)}, status_code=422)

    @app.exception_handler(HTTPException)
    async def _http(request: Request, err: HTTPException):
        detail = err.detail if isinstance(err.detail, str) else "request refused"
        if err.status_code == 404:
            detail = f"no such page: {request.url.path}"
        return JSONResponse({"error": detail}, status_code=err.status_code)

    @app.exception_handler(Exception)
    async def _internal(request: Request, err: Exception):
        first = (str(err).splitlines() or [""])[0][:300]
        return JSONResponse({"error": f"internal error ({type(err).__name__}): {first}"}, status_code=500)

    errors = {400: {"model": s.ErrorResponse}, 422: {"model": s.ErrorResponse}}
    m = ex.model

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html")

    @app.get("/docs", include_in_schema=False)
    async def docs():
        return FileResponse(STATIC / "docs.html")

    @app.get("/api/info", response_model=s.Info)
    async def info():
        d = m.dims
        limits = {"prompt_chars": s.MAX_PROMPT_CHARS, "prompt_tokens": s.MAX_PROMPT_TOKENS, "k": s.MAX_K, "top": s.MAX_TOP,
                  "examples": s.MAX_EXAMPLES, "new_tokens": s.MAX_NEW_TOKENS, "body_bytes": s.MAX_BODY_BYTES}  # fmt: skip
        return s.Info(model=m.name, n_layers=d.n_layers, n_heads=d.n_heads, d_mlp=d.d_mlp, d_model=d.d_model,
                      indexes=[str(p) for p in ex.index_paths], dictionaries=sorted(ex.dictionaries), limits=limits)  # fmt: skip

    @app.post("/api/predict", response_model=s.PredictResponse, responses=errors)
    @_queued(ex)
    def predict(req: s.PredictRequest):
        """The next-token distribution and the logit lens (every layer at every position)."""
        from mechscope import logit_lens, predict

        targets = [req.target] if req.target else []
        with ex.busy():
            _check_tokens(m, req.prompt)
            p = predict(m, req.prompt, k=req.k, targets=targets)
            lens = logit_lens(m, req.prompt, targets=targets, k=req.lens_k)
        target = None
        if p.targets:
            t = p.targets[0]
            target = s.TargetOut(target=str(t.target), token=t.token, id=t.id, prob=t.prob, rank=t.rank)
        cells = zip(lens.top_tokens, lens.top_ids.tolist(), lens.top_probs.tolist(), strict=True)
        top = [[[s.TokenProb(token=tok, id=int(i), prob=float(pr)) for tok, i, pr in zip(toks, ids, prs, strict=True)]
                for toks, ids, prs in zip(row_t, row_i, row_p, strict=True)] for row_t, row_i, row_p in cells]  # fmt: skip
        target_prob = lens.probs[..., 0].tolist() if targets else None
        return s.PredictResponse(tokens=p.tokens, top=_tokens(p.top), target=target,
                                 lens=s.Lens(rows=lens.rows, top=top, target_prob=target_prob))  # fmt: skip

    @app.post("/api/attribute", response_model=s.AttributeResponse, responses=errors)
    @_queued(ex)
    def attribute(req: s.AttributeRequest):
        """The heads and neurons behind the target: DLA, attribution patching and real ablation, side by side."""
        from mechscope import direct_logit_attribution, rank_units

        with ex.busy():
            _check_tokens(m, req.prompt)
            r = rank_units(m, req.prompt, req.target, top=req.top)
            top_dla = []
            if req.contrast:
                a = direct_logit_attribution(m, req.prompt, req.target, vs=req.contrast)
                top_dla = [s.DlaOut(unit=u, dla=v) for u, v in a.top(req.top)]
        rows = [s.RankedUnitOut(**row._asdict()) for row in r.rows]
        ranks = {method: r.ranks(method) for method in ("dla", "attribution", "real_effect")}
        agreement = {f"{a}|{b}": _finite(v) for (a, b), v in r.spearman.items()}
        return s.AttributeResponse(target=req.target, contrast=req.contrast, logprob=r.logprob, rows=rows, ranks=ranks,
                                   agreement=agreement, top_dla=top_dla)  # fmt: skip

    @app.post("/api/unit", response_model=s.UnitResponse, responses=errors)
    @_queued(ex, lambda req: _unit(ex, req.unit))
    def unit(req: s.UnitRequest):
        """A unit's page: its heatmap on the prompt, its examples, histogram and statistics from the index, its logit effects."""
        with ex.busy():
            return unit_page(ex, req)

    @app.post("/api/intervene", response_model=s.InterveneResponse, responses=errors)
    @_queued(ex, lambda req: _intervention(ex, _unit(ex, req.unit), req.op, req.value))
    def intervene(req: s.InterveneRequest):
        """The next-token distribution before and after changing one unit; greedy generations with and without."""
        from mechscope.attribution import intervene
        from mechscope.attribution.effects import generate

        targets = [req.target] if req.target else []
        with ex.busy():
            _check_tokens(m, req.prompt)
            iv = _intervention(ex, _unit(ex, req.unit), req.op, req.value)
            r = intervene(m, req.prompt, [iv], k=req.k, targets=targets)
            g = generate(m, req.prompt, [iv], max_new_tokens=req.new_tokens) if req.new_tokens else None
        delta = lambda d: s.DeltaOut(token=d.token, prob_before=d.prob_before, prob_after=d.prob_after)
        return s.InterveneResponse(
            intervention=r.interventions[0], before=_tokens(r.before.top), after=_tokens(r.after.top),
            deltas=[delta(d) for d in r.deltas], target=delta(r.targets[0]) if r.targets else None, kl=r.kl,
            generation_before=g.before if g else None, generation_after=g.after if g else None,
        )  # fmt: skip

    @app.post("/api/patch", response_model=s.PatchResponse, responses=errors)
    @_queued(ex)
    def patch(req: s.PatchRequest):
        """Activation patching of one site kind, every layer at every position: a heatmap."""
        from mechscope import activation_patching

        with ex.busy():
            _check_tokens(m, req.clean, req.corrupt)
            r = activation_patching(m, req.clean, req.corrupt, req.target, req.contrast, kinds=[req.kind])[req.kind]
        return s.PatchResponse(kind=r.kind, rows=[str(layer) for layer in r.layers], cols=r.col_labels,
                               grid=[[_finite(v) or 0.0 for v in row] for row in r.grid.tolist()],
                               clean=r.clean, corrupt=r.corrupt, metric=r.metric)  # fmt: skip

    @app.post("/api/search", response_model=s.SearchResponse, responses=errors)
    @_queued(ex)
    def search(req: s.SearchRequest):
        """Which indexed units fire most on a token (the last token of `text`, after the rest of it)."""
        with ex.busy():
            if not ex.index_paths:
                raise MechscopeError("no index to search: start the server with --db DB (built by `mechscope index build`)")
            hits = [hit for index in ex.indexes for hit in index.search(req.text, req.n)]
            hits = sorted(hits, key=lambda h: (-h.hits, -h.best))[: req.n]
        return s.SearchResponse(hits=[s.SearchHitOut(unit=h.unit.name, hits=h.hits, best=h.best, max=h.max) for h in hits])

    @app.post("/api/find-feature", response_model=s.FindFeatureResponse, responses=errors)
    @_queued(ex)
    def find_feature(req: s.FindFeatureRequest):
        """The features of a dictionary most selective for a concept its texts mention."""
        from mechscope.dictionaries.find import find_features

        if req.dictionary not in ex.dictionaries:
            loaded = one_of(ex.dictionaries) if ex.dictionaries else "none (start the server with --dict DIR)"
            raise MechscopeError(f"unknown dictionary {req.dictionary!r}: loaded dictionaries are {loaded}")
        texts = [t for t in req.texts if t.strip()]
        with ex.busy():
            _check_tokens(m, *texts)
            found = find_features(m, ex.dictionaries[req.dictionary], texts, top=req.top)
        return s.FindFeatureResponse(features=[
            s.FoundFeatureOut(unit=f"f:{req.dictionary}:{f.feature}", feature=f.feature, score=f.score, concept=f.concept,
                              others=f.elsewhere) for f in found])  # fmt: skip

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app
