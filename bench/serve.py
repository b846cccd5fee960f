"""The web explorer (issue 13) on the embedded SmolLM2: `.venv/bin/python bench/serve.py`.

W1. Latency: POST /api/predict (the next-token distribution and the 31-row logit lens) over loopback with a
    persistent httpx.Client, the JSON decoded by the client, against the two Python calls the route makes
    (`predict(k=10)`, then `logit_lens(k=5)`), for prompts of 6, 40 and 120 tokens. Interleaved after a
    warm-up; medians and p95 (target: HTTP at most 1.5x the API). Where the extra time goes: the route's
    conversion to pydantic objects, FastAPI's response validation, the JSON encoding and the client's
    decoding, each timed alone on the same answer, and the garbage collector's time during the timed calls.
W2. Load: 20 clients (asyncio, one httpx.AsyncClient each) each send 10 mixed requests at once: predict,
    unit, intervene, attribute and invalid ones. Every answer must equal the one the same request got alone
    before the load (numbers within 1e-6; an invalid request: the same 4xx and `{"error": ...}`).

Everything runs in one process: uvicorn serves `create_app(open_explorer(model))` on 127.0.0.1 from a
background thread. Results go to bench/out/serve.json and to the section of RESULTS.md between MARK_BEGIN
and MARK_END (also written by `bench/run.py --only serve`).
"""

from __future__ import annotations

import asyncio
import gc
import json
import math
import random
import socket
import statistics
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from common import log  # noqa: E402

MARK_BEGIN = "<!-- serve section: begin (regenerated alone by `bench/serve.py` or `bench/run.py --only serve`) -->"
MARK_END = "<!-- serve section: end -->"
OUT = common.BENCH_DIR / "out" / "serve.json"
TARGET_RATIO = 1.5
REPEATS = {6: 20, 40: 20, 120: 12}
"""Prompt tokens: clean timed calls wanted of each of the API and HTTP (up to twice as many rounds if the machine is busy)."""
DOCS_START = 5000
"""Where in the tokenised documentation the 40- and 120-token prompts start."""
CLIENTS, PER_CLIENT = 20, 10
TOL = 1e-6


# -- the server ---------------------------------------------------------------------------------------------------


@contextmanager
def serving(model):
    """The explorer over `model`, served by uvicorn on a free loopback port from a background thread: (url, app)."""
    import uvicorn

    from mechscope.server import create_app, open_explorer

    app = create_app(open_explorer(model))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError(f"uvicorn did not start on 127.0.0.1:{port}")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}", app
    finally:
        server.should_exit = True
        thread.join(timeout=30)


class GcClock:
    """Seconds Python's cyclic garbage collector has run (any thread), counted through `gc.callbacks` while open."""

    def __init__(self):
        self.total, self._start = 0.0, 0.0

    def __call__(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.total += time.perf_counter() - self._start

    def __enter__(self) -> GcClock:
        gc.callbacks.append(self)
        return self

    def __exit__(self, *exc) -> None:
        gc.callbacks.remove(self)


def _summary(samples: list[tuple[float, float]], want: int) -> dict:
    """`common.summarise` (median over clean calls, else over all and noisy) plus the p95 of the same calls."""
    out = common.summarise(samples, want)
    clean = [t for t, bg in samples if bg < common.CLEAN_CORES]
    return out | {"p95": _p95(clean if not out["noisy"] else [t for t, _ in samples])}


def _p95(xs: list[float]) -> float:
    return statistics.quantiles(xs, n=20, method="inclusive")[-1] if len(xs) > 1 else xs[0]


# -- W1. latency ---------------------------------------------------------------------------------------------------


def latency_prompts(model) -> dict[str, tuple[str, str, int]]:
    """{label: (prompt, target, repeats)} for each length of REPEATS: figure 3's lens prompt (6 tokens), else that
    many tokens of the documentation from DOCS_START."""
    ids = model.tokenizer(common.docs_text(), add_special_tokens=False).input_ids
    out = {}
    for n, repeats in REPEATS.items():
        if n == 6:
            out["lens prompt, 6 tokens"] = (common.LENS_PROMPT, common.LENS_TARGET, repeats)
        else:
            out[f"docs, {n} tokens"] = (model.tokenizer.decode(ids[DOCS_START : DOCS_START + n]), " the", repeats)
    return out


def _api(model, prompt: str, target: str):
    """What /api/predict computes: the distribution (k = 10) and the lens (k = 5), with the target."""
    import mechscope

    return mechscope.predict(model, prompt, k=10, targets=[target]), mechscope.logit_lens(model, prompt, targets=[target], k=5)


def _same_answer(answer: dict, p, lens) -> float:
    """The route's JSON carries the API's answer (same ids, probabilities within 1e-6): the largest difference."""
    top_ids = [[[t["id"] for t in cell] for cell in row] for row in answer["lens"]["top"]]
    if [t["id"] for t in answer["top"]] != [t.id for t in p.top] or top_ids != lens.top_ids.tolist():
        raise AssertionError("/api/predict's top tokens differ from mechscope.predict's and logit_lens's")
    probs = [t["prob"] for t in answer["top"]] + [x for row in answer["lens"]["target_prob"] for x in row]
    expected = [t.prob for t in p.top] + lens.probs[..., 0].flatten().tolist()
    worst = max(abs(a - b) for a, b in zip(probs, expected, strict=True))
    if worst > TOL:
        raise AssertionError(f"/api/predict's probabilities differ from the API's by {worst:.3g}")
    return worst


def latency(model, client, app) -> dict:
    """W1 for each prompt: API and HTTP timings, their ratio, and the steps HTTP adds (`breakdown`)."""
    rows = {}
    for label, (prompt, target, want) in latency_prompts(model).items():
        body = {"prompt": prompt, "target": target}
        fns = {"api": lambda p=prompt, t=target: _api(model, p, t),
               "http": lambda b=body: client.post("/api/predict", json=b).raise_for_status().json()}  # fmt: skip
        answer = client.post("/api/predict", json=body)
        worst = _same_answer(answer.json(), *fns["api"]())
        log(f"W1 {label}: {want} clean calls of each of the API and HTTP")
        common.wait_quiet(f"W1 {label}")
        fns["api"](), fns["http"]()  # warm-up (the first calls above warmed the model)
        samples: dict[str, list] = {"api": [], "http": []}
        collecting: dict[str, list] = {"api": [], "http": []}  # seconds in the garbage collector, per call
        with GcClock() as clock:
            for i in range(2 * want):
                if i >= want and min(sum(bg < common.CLEAN_CORES for _, bg in s) for s in samples.values()) >= want:
                    break
                for name in ("api", "http") if i % 2 == 0 else ("http", "api"):
                    before = clock.total
                    samples[name].append(common.timed(fns[name]))
                    collecting[name].append(clock.total - before)
        api, http = _summary(samples["api"], want), _summary(samples["http"], want)
        api["gc_mean"], http["gc_mean"] = statistics.mean(collecting["api"]), statistics.mean(collecting["http"])
        tokens = len(model.to_ids(prompt)[0])
        rows[label] = {"tokens": tokens, "prompt": prompt, "target": target, "bytes": len(answer.content), "max_prob_diff": worst,
                       "api": api, "http": http, "ratio": http["median"] / api["median"],
                       "parts": breakdown(model, app, prompt, target)}  # fmt: skip
    return rows


def breakdown(model, app, prompt: str, target: str, repeats: int = 7) -> dict:
    """Median seconds of each step the HTTP answer adds to the API calls, each timed alone on this prompt's answer.

    `convert` is the route itself with `mechscope.predict` and `logit_lens` answering from a cache (tokenising
    the prompt, the lock and building the pydantic response); `validate` and `encode` are what FastAPI then does
    with it (the response model's validation, pydantic-core's JSON); `decode` is the client's `json.loads`."""
    import mechscope
    from mechscope.server import schemas as s

    route = next(r for r in app.routes if getattr(r, "path", "") == "/api/predict")
    p, lens = _api(model, prompt, target)
    req = s.PredictRequest(prompt=prompt, target=target)
    saved = mechscope.predict, mechscope.logit_lens
    mechscope.predict, mechscope.logit_lens = (lambda *a, **k: p), (lambda *a, **k: lens)
    try:
        convert = _median_s(lambda: route.endpoint(req), repeats)
        response = route.endpoint(req)
    finally:
        mechscope.predict, mechscope.logit_lens = saved
    field = route.response_field
    value = field.validate(response, {}, loc=("response",))[0]
    encoded = field.serialize_json(value)
    return {
        "convert": convert,
        "validate": _median_s(lambda: field.validate(response, {}, loc=("response",)), repeats),
        "encode": _median_s(lambda: field.serialize_json(value), repeats),
        "decode": _median_s(lambda: json.loads(encoded), repeats),
        "lens_cells": len(lens.rows) * len(p.tokens),
    }


def _median_s(fn, repeats: int) -> float:
    fn()
    return statistics.median(common.timed(fn)[0] for _ in range(repeats))


# -- W2. load ------------------------------------------------------------------------------------------------------


class Req(NamedTuple):
    kind: str
    path: str
    body: dict | bytes | None = None
    method: str = "POST"


WIKI, WIKI_TARGET = common.LENS_PROMPT, common.LENS_TARGET
IOI = "When Mary and John went to the store, John gave a drink to"
PARIS = "The Eiffel Tower is in the city of"
REQUESTS = {
    "predict wiki": Req("predict", "/api/predict", {"prompt": WIKI, "target": WIKI_TARGET}),
    "predict ioi": Req("predict", "/api/predict", {"prompt": IOI, "target": " Mary"}),
    "predict paris": Req("predict", "/api/predict", {"prompt": PARIS, "target": " Paris"}),
    "unit 20:100 wiki": Req("unit", "/api/unit", {"unit": "20:100", "prompt": WIKI}),
    "unit 20:100 ioi": Req("unit", "/api/unit", {"unit": "20:100", "prompt": IOI}),
    "unit 5.3 paris": Req("unit", "/api/unit", {"unit": "5.3", "prompt": PARIS}),
    "unit 29:288": Req("unit", "/api/unit", {"unit": "29:288"}),
    "ablate 20:100 wiki": Req("intervene", "/api/intervene", {"prompt": WIKI, "unit": "20:100", "op": "ablate",
                                                               "target": WIKI_TARGET}),
    "ablate 29:288 paris +4": Req("intervene", "/api/intervene", {"prompt": PARIS, "unit": "29:288", "op": "ablate",
                                                                   "new_tokens": 4}),
    "scale 9.6 ioi": Req("intervene", "/api/intervene", {"prompt": IOI, "unit": "9.6", "op": "scale", "value": 0.5,
                                                          "target": " Mary"}),
    "attribute wiki": Req("attribute", "/api/attribute", {"prompt": WIKI, "target": WIKI_TARGET, "top": 5}),
    "attribute ioi vs John": Req("attribute", "/api/attribute", {"prompt": IOI, "target": " Mary", "contrast": " John",
                                                                  "top": 5}),
    "layer out of range (400)": Req("invalid", "/api/unit", {"unit": "99:1", "prompt": WIKI}),
    "op add on a neuron (400)": Req("invalid", "/api/intervene", {"prompt": WIKI, "unit": "20:100", "op": "add"}),
    "300 tokens (400)": Req("invalid", "/api/predict", {"prompt": " the" * 300}),
    "empty prompt (422)": Req("invalid", "/api/predict", {"prompt": ""}),
    "unknown field (422)": Req("invalid", "/api/predict", {"prompt": WIKI, "temperature": 1}),
    "broken JSON (422)": Req("invalid", "/api/predict", b'{"prompt": "The'),
    "body over 64 KiB (413)": Req("invalid", "/api/predict", b'{"prompt": "' + b"x" * 70_000 + b'"}'),
    "unknown route (404)": Req("invalid", "/api/nothing", {}),
    "GET a POST route (405)": Req("invalid", "/api/predict", None, "GET"),
}  # fmt: skip
"""The distinct requests of the load, by name; `body` is JSON, or bytes sent as they are."""
KINDS = ("predict", "unit", "intervene", "attribute", "invalid")
MIX = ["predict"] * 6 + ["unit"] * 5 + ["intervene"] * 4 + ["attribute"] * 2 + ["invalid"] * 3
"""The kinds of each two clients' 20 requests (attribute, the slowest, least often)."""


def plans(seed: int = 0) -> list[list[str]]:
    """Each client's request names, in order: its half of MIX, shuffled, each kind's request drawn (seeded)."""
    by_kind = {kind: [name for name, r in REQUESTS.items() if r.kind == kind] for kind in KINDS}
    out = []
    for c in range(CLIENTS):
        rng = random.Random(seed * 1000 + c)
        kinds = MIX[(c % 2) * PER_CLIENT : (c % 2 + 1) * PER_CLIENT]
        rng.shuffle(kinds)
        out.append([rng.choice(by_kind[kind]) for kind in kinds])
    return out


def _send(client, name: str):
    """The request `name` through `client` (sync or async): the call to await or the response."""
    r = REQUESTS[name]
    if isinstance(r.body, bytes):
        return client.request(r.method, r.path, content=r.body, headers={"content-type": "application/json"})
    return client.request(r.method, r.path, json=r.body)


def _answer(response) -> tuple[int, object]:
    try:
        return response.status_code, response.json()
    except ValueError:
        return response.status_code, {"not JSON": response.text[:200]}


def _max_diff(a, b) -> float:
    """Largest |difference| between the numbers of two JSON values; inf where they differ in anything else."""
    if isinstance(a, dict) and isinstance(b, dict):
        return max((_max_diff(a[k], b[k]) for k in a), default=0.0) if a.keys() == b.keys() else math.inf
    if isinstance(a, list) and isinstance(b, list):
        return max((_max_diff(x, y) for x, y in zip(a, b, strict=True)), default=0.0) if len(a) == len(b) else math.inf
    numbers = all(isinstance(x, int | float) and not isinstance(x, bool) for x in (a, b))
    return abs(a - b) if numbers else (0.0 if a == b else math.inf)


def _problem(name: str, status: int, body) -> str | None:
    """What is wrong with an answer taken alone: a valid request must get 200, an invalid one a 4xx `{"error": ...}`."""
    if REQUESTS[name].kind == "invalid":
        ok = 400 <= status < 500 and isinstance(body, dict) and isinstance(body.get("error"), str)
    else:
        ok = status == 200
    return None if ok else f"{name}: {status} {str(body)[:200]}"


def expected(url: str) -> dict:
    """Each distinct request sent alone, one after another: {name: {"status", "body", "alone_s"}}."""
    import httpx

    out = {}
    with httpx.Client(base_url=url, timeout=600) as client:
        for name in REQUESTS:
            _send(client, name)  # warm-up: first calls of a route import what it needs
            start = time.perf_counter()
            status, body = _answer(_send(client, name))
            out[name] = {"status": status, "body": body, "alone_s": time.perf_counter() - start}
    return out


async def _one_client(url: str, plan: list[str], got: list) -> None:
    import httpx

    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        for name in plan:
            start = time.perf_counter()
            try:
                status, body = _answer(await _send(client, name))
            except httpx.HTTPError as err:  # no answer: status 0
                status, body = 0, {"exception": f"{type(err).__name__}: {err}"}
            got.append((name, time.perf_counter() - start, status, body))


async def _all_clients(url: str, plans_: list[list[str]]) -> tuple[list, float]:
    got: list = []
    start = time.perf_counter()
    await asyncio.gather(*(_one_client(url, plan, got) for plan in plans_))
    return got, time.perf_counter() - start


def load(url: str) -> dict:
    """W2: the expected answers, then all clients at once; counts, latency per kind, wall time, throughput."""
    log(f"W2: {len(REQUESTS)} distinct requests alone, for the expected answers")
    alone = expected(url)
    problems = [p for name, a in alone.items() if (p := _problem(name, a["status"], a["body"]))]
    todo = plans()
    log(f"W2: {CLIENTS} clients x {PER_CLIENT} requests at once")
    common.wait_quiet("W2")
    before = common.cpu_snapshot()
    got, wall = asyncio.run(_all_clients(url, todo))
    others = common.other_cores(before, common.cpu_snapshot())
    diffs = [_max_diff(body, alone[name]["body"]) if status == alone[name]["status"] else math.inf
             for name, _, status, body in got]  # fmt: skip
    wrong = [f"{name}: {status}, differs by {d:.3g}" for (name, _, status, _), d in zip(got, diffs, strict=True) if d > TOL]
    problems += [p for name, _, status, body in got if (p := _problem(name, status, body))]
    kinds = {}
    for kind in (*KINDS, "all"):
        chosen = [i for i, (name, *_) in enumerate(got) if kind in ("all", REQUESTS[name].kind)]
        mine, statuses = [(got[i][1], diffs[i]) for i in chosen], [got[i][2] for i in chosen]
        times = [t for t, _ in mine]
        kinds[kind] = {"count": len(mine), "answered": sum(st > 0 for st in statuses),
                       "correct": sum(d <= TOL for _, d in mine), "p50": statistics.median(times), "p95": _p95(times),
                       "max": max(times)}  # fmt: skip
    return {"sent": CLIENTS * PER_CLIENT, "answered": kinds["all"]["answered"], "wall_s": wall, "other_cores": others,
            "throughput": kinds["all"]["answered"] / wall, "serial_s": sum(alone[name]["alone_s"] for name, *_ in got),
            "kinds": kinds, "max_diff": max((d for d in diffs if d <= TOL), default=0.0), "wrong": wrong[:20],
            "problems": problems[:20], "status_counts": _status_counts(got),
            "alone": {name: {"status": a["status"], "alone_s": a["alone_s"]} for name, a in alone.items()}}  # fmt: skip


def _status_counts(got: list) -> dict[str, int]:
    counts: dict[str, int] = {}
    for _, _, status, _ in got:
        counts[str(status)] = counts.get(str(status), 0) + 1
    return dict(sorted(counts.items()))


# -- the whole run and RESULTS.md ----------------------------------------------------------------------------------


def run(model) -> dict:
    """W1 and W2 against one live server over `model`."""
    import httpx

    load_start = common.load_average()
    with serving(model) as (url, app), httpx.Client(base_url=url, timeout=600) as client:
        w1 = latency(model, client, app)
        last = list(w1.values())[-1]
        collector = gc_costs(client, last["prompt"], last["target"])
        w2 = load(url)
    info = common.machine_info()
    return {"latency": w1, "gc": collector, "load": w2, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "commit": info["mechscope commit"], "cpu": info["CPU"], "cores": info["cores (os.cpu_count)"],
            "torch_threads": info["torch threads (intra / inter-op)"],
            "load_average": [load_start, common.load_average()]}  # fmt: skip


def _ms(x: float) -> str:
    return f"{x * 1e3:,.0f} ms" if abs(x) >= 0.1 else f"{x * 1e3:.1f} ms" if abs(x) >= 1e-3 else f"{x * 1e3:.2f} ms"


def gc_costs(client, prompt: str, target: str, repeats: int = 4) -> dict:
    """The objects the garbage collector tracks in this process and the seconds of one full collection; then
    `repeats` HTTP calls of `prompt` after `gc.freeze()` (every object alive now out of the collector's reach,
    undone afterwards): their median seconds and the collector's mean seconds per call."""
    objects = len(gc.get_objects())
    full = _median_s(gc.collect, 3)
    body = {"prompt": prompt, "target": target}
    gc.freeze()
    try:
        with GcClock() as clock:
            times = [common.timed(lambda: client.post("/api/predict", json=body).json())[0] for _ in range(repeats)]
    finally:
        gc.unfreeze()
    return {"objects": objects, "full_s": full, "frozen_http_s": statistics.median(times), "frozen_gc_s": clock.total / repeats}


def _render_latency(rows: dict, gc_note: dict) -> list[str]:
    lines = ["### W1. Prompt → distribution + lens: HTTP against the Python API", "",
             "| prompt | tokens | response | Python API median / p95 | HTTP median / p95 | HTTP / API (medians) | "
             "target | met? |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for label, r in rows.items():
        a, h = r["api"], r["http"]
        noisy = " (noisy)" if a["noisy"] or h["noisy"] else ""
        met = "**yes**" if r["ratio"] <= TARGET_RATIO else "**NO**"
        lines.append(f"| {label} | {r['tokens']} | {r['bytes'] / 1024:,.0f} KiB | {_ms(a['median'])} / {_ms(a['p95'])} | "
                     f"{_ms(h['median'])} / {_ms(h['p95'])} | {r['ratio']:.3f}× | ≤ {TARGET_RATIO:g}× | "
                     f"{met}{noisy} |")  # fmt: skip
    calls = ", ".join(f"{r['api']['n_clean']}/{r['api']['n']} and {r['http']['n_clean']}/{r['http']['n']}" for r in rows.values())
    lines += ["", f"Clean calls / calls (API and HTTP, by prompt): {calls}. Before timing, each HTTP answer was checked "
              "to carry the API's (same top ids everywhere; probabilities within "
              f"{max(r['max_prob_diff'] for r in rows.values()):.1g}).", "",
              "Where HTTP's extra time goes: each step timed alone on the same answer (medians), and the time Python's "
              "garbage collector ran during the timed calls above (mean per call, HTTP − API):", "",
              "| prompt | lens cells (× 5 tokens) | route: tokenise, lock, pydantic objects | FastAPI's response validation | "
              "JSON encoding | client's JSON decoding | garbage collection | sum | HTTP − API (medians) |",
              "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for label, r in rows.items():
        p = r["parts"]
        collecting = r["http"]["gc_mean"] - r["api"]["gc_mean"]
        total = p["convert"] + p["validate"] + p["encode"] + p["decode"] + collecting
        extra = r["http"]["median"] - r["api"]["median"]
        lines.append(f"| {label} | {p['lens_cells']:,} | {_ms(p['convert'])} | {_ms(p['validate'])} | {_ms(p['encode'])} | "
                     f"{_ms(p['decode'])} | {_ms(collecting)} | {_ms(total)} | {_ms(extra)} |")  # fmt: skip
    g, (label, last) = gc_note, list(rows.items())[-1]
    lines += ["", "The lens is sent as one pydantic object per cell and token (31 rows × tokens × 5), and the client "
              "decodes as many dicts: tens of thousands of objects per answer, which live long enough to set off Python's "
              f"full (generation-2) garbage collections. Each walks every object the process tracks ({g['objects']:,} "
              f"with the model loaded and the server running; one full collection takes {_ms(g['full_s'])}). For long "
              f"prompts those collections are a large part of the extra time. With `gc.freeze()` (the objects alive "
              f"after loading moved out of the collector's reach), {label}: HTTP {_ms(g['frozen_http_s'])} "
              f"({g['frozen_http_s'] / last['api']['median']:.3f}× the API's median above), the collector "
              f"{_ms(g['frozen_gc_s'])} per call instead of {_ms(last['http']['gc_mean'])}."]  # fmt: skip
    return lines


def _render_load(w: dict) -> list[str]:
    lines = [f"### W2. Load: {CLIENTS} clients × {PER_CLIENT} mixed requests at once, over loopback", "",
             "| request | sent | answered | correct | p50 | p95 | max | alone (one at a time) |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for kind, k in w["kinds"].items():
        names = [n for n, r in REQUESTS.items() if kind in ("all", r.kind)]
        alone = [w["alone"][n]["alone_s"] for n in names]
        spread = f"{_ms(min(alone))} – {_ms(max(alone))}"
        label = "**all**" if kind == "all" else kind
        times = f"{_ms(k['p50'])} | {_ms(k['p95'])} | {_ms(k['max'])}"
        lines.append(f"| {label} | {k['count']} | {k['answered']} | {k['correct']} | {times} | {spread} |")
    statuses = ", ".join(f"{n} × {s}" for s, n in w["status_counts"].items())
    invalid = "; ".join(name for name, r in REQUESTS.items() if r.kind == "invalid")
    lines += ["", f"- Answered {w['answered']} of {w['sent']} ({statuses}); {w['kinds']['all']['correct']} equal to the "
              f"answer the same request got alone (largest difference in a number {w['max_diff']:.2g}).",
              f"- Wall time {w['wall_s']:.1f} s (other processes used {w['other_cores']:.2f} cores meanwhile), "
              f"{w['throughput']:.2f} requests/s. The same {w['answered']} requests one "
              f"at a time would take {w['serial_s']:.1f} s (each at its time alone): the lock serialises the model, so "
              "latency under load is mostly the wait for it.",
              f"- The invalid requests: {invalid}. The 400s are refused by the functions (under the lock), so they "
              "wait their turn like valid requests; the others are refused before any route runs."]  # fmt: skip
    for what in ("wrong", "problems"):
        if w[what]:
            lines.append(f"- **{what}**: " + "; ".join(w[what][:5]))
    return lines


def render(r: dict) -> str:
    head = [MARK_BEGIN, "## Web explorer (issue 13)", "",
            f"Measured {r['date']}, mechscope commit {r['commit']}, on {r['cpu']} ({r['cores']} cores, torch threads "
            f"{r['torch_threads']}), load average {r['load_average'][0]} at start, {r['load_average'][1]} at the end. "
            "SmolLM2-135M-Instruct (`mechscope.load('default')`), float32 on the CPU. One process: uvicorn serves "
            "`create_app(open_explorer(model))` (no index, no dictionary) on 127.0.0.1 from a background thread; the "
            "clients are httpx in the main thread. Baseline of W1: the Python calls the route makes, "
            "`predict(model, prompt, k=10, targets=[target])` then `logit_lens(model, prompt, targets=[target], k=5)`; "
            "HTTP: `POST /api/predict` with a persistent `httpx.Client`, JSON decoded. Interleaved after a warm-up; "
            f"calls during which other processes used {common.CLEAN_CORES} cores or more are left out where enough are clean.",
            ""]  # fmt: skip
    return "\n".join([*head, *_render_latency(r["latency"], r["gc"]), "", *_render_load(r["load"]), "", MARK_END]) + "\n"


def splice(text: str, section: str) -> str:
    """`text` with its serve section replaced by `section` (appended when there is none)."""
    return common.splice_section(text, section, MARK_BEGIN, MARK_END)


def save(result: dict) -> str:
    """Write `result` to bench/out/serve.json; its section of RESULTS.md."""
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=1))
    return render(result)


def main() -> None:
    import mechscope

    start = time.perf_counter()
    log("loading the default model")
    section = save(run(mechscope.load("default")))
    common.write_section(section, MARK_BEGIN, MARK_END, "serve")
    log(f"done in {time.perf_counter() - start:.0f} s")
    print(section)


if __name__ == "__main__":
    main()
