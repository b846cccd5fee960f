"""The explorer's JSON routes: each answer equals the Python API's, bad input is a 4xx JSON error in one line,
no file route leaves its folder, no CORS, bounded bodies, and 20 clients x 10 mixed requests all answered right.

Most tests run on the tiny Llama with a real tokenizer (`conftest.tiny_lm`); the feature routes run on SmolLM2
with the SAE that ships with mechscope (marked slow).
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch
import uvicorn
from conftest import invoke_cli, tiny_lm
from fastapi.testclient import TestClient

import mechscope
from mechscope.attribution import Intervention, unit_activations
from mechscope.attribution.effects import generate
from mechscope.server import create_app, open_explorer
from mechscope.server import schemas as s

PROMPT = "The reliability of Wikipedia is very"
TARGET = " the"  # one token for the tiny tokenizer and for SmolLM2
SAE = Path(mechscope.__file__).parent / "assets" / "sae-smollm2-l15"


@pytest.fixture(scope="module")
def model():
    return tiny_lm()


@pytest.fixture(scope="module")
def client(model):
    return TestClient(create_app(open_explorer(model)), raise_server_exceptions=False)


def close(a, b, tol=1e-5):
    return a == pytest.approx(b, abs=tol, rel=tol)


# -- answers equal the Python API's -----------------------------------------------------------------------------------


def test_info_names_the_model_and_the_limits(client, model):
    info = client.get("/api/info").json()
    assert info["n_layers"] == model.dims.n_layers and info["d_mlp"] == model.dims.d_mlp
    assert info["indexes"] == [] and info["dictionaries"] == [] and info["limits"]["prompt_tokens"] == s.MAX_PROMPT_TOKENS


def test_predict_is_predict_and_the_lens(client, model):
    r = client.post("/api/predict", json={"prompt": PROMPT, "target": TARGET, "k": 7, "lens_k": 3})
    assert r.status_code == 200, r.text
    got = r.json()
    want = mechscope.predict(model, PROMPT, k=7, targets=[TARGET])
    lens = mechscope.logit_lens(model, PROMPT, targets=[TARGET], k=3)
    assert got["tokens"] == want.tokens
    assert [t["id"] for t in got["top"]] == [t.id for t in want.top]
    assert all(close(a["prob"], b.prob) for a, b in zip(got["top"], want.top, strict=True))
    assert got["target"]["rank"] == want.targets[0].rank and close(got["target"]["prob"], want.targets[0].prob)
    assert got["lens"]["rows"] == lens.rows
    assert torch.allclose(torch.tensor(got["lens"]["target_prob"]), lens.probs[..., 0], atol=1e-6)
    assert [[[t["id"] for t in cell] for cell in row] for row in got["lens"]["top"]] == lens.top_ids.tolist()


def test_predict_without_a_target(client):
    got = client.post("/api/predict", json={"prompt": PROMPT}).json()
    assert got["target"] is None and got["lens"]["target_prob"] is None and len(got["top"]) == 10


def test_attribute_is_rank_units(client, model):
    got = client.post("/api/attribute", json={"prompt": PROMPT, "target": TARGET, "top": 4, "contrast": " a"}).json()
    want = mechscope.rank_units(model, PROMPT, TARGET, top=4)
    assert [r["unit"] for r in got["rows"]] == [r.unit for r in want.rows]
    assert all(close(a["real_effect"], b.real_effect, 1e-4) for a, b in zip(got["rows"], want.rows, strict=True))
    assert got["ranks"]["dla"] == want.ranks("dla")
    dla = mechscope.direct_logit_attribution(model, PROMPT, TARGET, vs=" a")
    assert [u["unit"] for u in got["top_dla"]] == [u for u, _ in dla.top(4)]


def test_neuron_and_head_pages(client, model):
    got = client.post("/api/unit", json={"unit": "1:3", "prompt": PROMPT}).json()
    want = unit_activations(model, PROMPT, "1:3")
    assert got["kind"] == "neuron" and got["heatmap"]["tokens"] == want.tokens
    assert torch.allclose(torch.tensor(got["heatmap"]["values"]), want.values, atol=1e-6)
    assert got["promoted"] and got["ops"] == ["ablate", "set", "scale"] and "no index" in got["note"]
    head = client.post("/api/unit", json={"unit": "0.1", "prompt": PROMPT}).json()
    want = unit_activations(model, PROMPT, "0.1").values
    assert head["kind"] == "head" and torch.allclose(torch.tensor(head["heatmap"]["values"]), want)


CHANGES = [
    ("ablate", 0, Intervention.zero("1:3")),
    ("scale", 5, Intervention.scale("1:3", 5)),
    ("set", 2, Intervention.set("0.1", 2)),
]


@pytest.mark.parametrize(("op", "value", "iv"), CHANGES)
def test_intervene_is_intervene_and_generate(client, model, op, value, iv):
    unit = iv.units[0]
    body = {"prompt": PROMPT, "unit": unit, "op": op, "value": value, "target": TARGET, "new_tokens": 4}
    got = client.post("/api/intervene", json=body).json()
    want = mechscope.intervene(model, PROMPT, [iv], targets=[TARGET])
    g = generate(model, PROMPT, [iv], max_new_tokens=4)
    assert got["intervention"] == want.interventions[0] and close(got["kl"], want.kl, 1e-4)
    assert close(got["target"]["prob_after"], want.targets[0].prob_after)
    assert [t["id"] for t in got["after"]] == [t.id for t in want.after.top]
    assert (got["generation_before"], got["generation_after"]) == (g.before, g.after)


def test_patch_is_activation_patching(client, model):
    body = {"clean": "The capital of France is", "corrupt": "The capital of Italy is", "target": " the", "contrast": " a"}
    got = client.post("/api/patch", json=body).json()
    want = mechscope.activation_patching(model, body["clean"], body["corrupt"], " the", " a", kinds=["hook_resid_pre"])
    grid = want["hook_resid_pre"].grid
    assert got["cols"] == want["hook_resid_pre"].col_labels and len(got["rows"]) == grid.shape[0]
    assert torch.allclose(torch.tensor(got["grid"]), torch.nan_to_num(grid.float()), atol=1e-5)


# -- bad input: a 4xx JSON error in words, never a 500 ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("route", "body", "status", "words"),
    [
        ("/api/unit", {"unit": "99:1"}, 400, "layer 99 out of range"),
        ("/api/unit", {"unit": "0:99999"}, 400, "out of range"),
        ("/api/unit", {"unit": "banana"}, 400, "banana"),
        ("/api/unit", {"unit": "f:sae:1"}, 400, "unknown dictionary 'sae'"),
        ("/api/intervene", {"prompt": PROMPT, "unit": "1:3", "op": "clamp"}, 400, "valid ops are ablate, set, scale"),
        ("/api/intervene", {"prompt": PROMPT, "unit": "1:3", "op": "explode"}, 422, "op:"),
        ("/api/intervene", {"prompt": PROMPT, "unit": "1:3", "op": "set", "value": 1e9}, 422, "value:"),
        ("/api/intervene", {"prompt": PROMPT, "unit": "1:3", "op": "set", "new_tokens": 10_000}, 422, "new_tokens:"),
        ("/api/predict", {"prompt": ""}, 422, "prompt: String should have at least 1 character"),
        ("/api/predict", {"prompt": "x" * (s.MAX_PROMPT_CHARS + 1)}, 422, "prompt:"),
        ("/api/predict", {"prompt": PROMPT, "k": 0}, 422, "k:"),
        ("/api/predict", {"prompt": PROMPT, "k": 10_000}, 422, "k: Input should be less than or equal to 50"),
        ("/api/predict", {"prompt": PROMPT, "surprise": 1}, 422, "surprise:"),
        ("/api/predict", {"prompt": "word " * 400}, 400, "tokens"),
        ("/api/predict", {"prompt": PROMPT, "target": ""}, 422, "target:"),
        ("/api/attribute", {"prompt": PROMPT}, 422, "target: Field required"),
        ("/api/patch", {"clean": "a b", "corrupt": "a b c", "target": " x"}, 400, ""),
        ("/api/search", {"text": " the"}, 400, "no index to search"),
        ("/api/find-feature", {"dictionary": "sae", "texts": ["cat"]}, 400, "unknown dictionary"),
    ],
)
def test_bad_input_is_a_worded_4xx(client, route, body, status, words):
    r = client.post(route, json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert words in error and "\n" not in error and "Traceback" not in error


def test_bodies_that_are_not_json_or_too_large(client):
    r = client.post("/api/predict", content=b"not json", headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["error"].startswith("the request body is not valid JSON (")
    big = b'{"prompt": "' + b"x" * (s.MAX_BODY_BYTES + 10) + b'"}'
    r = client.post("/api/predict", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and "65,536 bytes" in r.json()["error"]

    def chunks():  # no Content-Length: the limit still holds while the body streams
        for _ in range(10):
            yield b"x" * (s.MAX_BODY_BYTES // 4)

    r = client.post("/api/predict", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413


def test_unknown_routes_and_methods_are_json(client):
    r = client.get("/api/nothing")
    assert r.status_code == 404 and r.json()["error"] == "no such page: /api/nothing"
    r = client.get("/api/predict")
    assert r.status_code == 405 and r.json()["error"]


def test_an_internal_failure_is_a_one_line_500_without_traceback(model, monkeypatch):
    app = create_app(open_explorer(model))
    monkeypatch.setattr(mechscope, "predict", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom\nsecond line")))
    r = TestClient(app, raise_server_exceptions=False).post("/api/predict", json={"prompt": PROMPT})
    assert r.status_code == 500 and r.json() == {"error": "internal error (RuntimeError): boom"}


def test_no_cors(client):
    r = client.get("/api/info", headers={"Origin": "http://evil.example"})
    assert "access-control-allow-origin" not in r.headers
    r = client.options("/api/predict", headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"})
    assert r.status_code >= 400 and "access-control-allow-origin" not in r.headers


def test_the_page_and_its_assets_come_from_the_package(client):
    page = client.get("/")
    assert page.status_code == 200 and "/static/app.js" in page.text
    for asset in ("/static/app.js", "/static/style.css", "/docs", "/openapi.json"):
        assert client.get(asset).status_code == 200, asset
    for text in (page.text, client.get("/static/app.js").text, client.get("/docs").text):
        assert "http://" not in text.replace("http://www.w3.org/2000/svg", "") and "https://" not in text
    schema = client.get("/openapi.json").json()
    assert {"/api/predict", "/api/unit", "/api/intervene", "/api/patch", "/api/attribute"} <= set(schema["paths"])


# -- a live server on loopback: raw paths and the load test ----------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def live(model):
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(open_explorer(model)), host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", port
    server.should_exit = True
    thread.join(10)


def _raw_get(port: int, path: str) -> tuple[int, bytes]:
    """GET `path` exactly as written (no client normalises it)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := conn.recv(65536):
            data += chunk
    status = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/") else 400
    return status, data


@pytest.mark.parametrize(
    "path",
    [
        "/static/../app.py",
        "/static/../../pyproject.toml",
        "/static/%2e%2e/app.py",
        "/static/%2e%2e/%2e%2e/server/app.py",
        "/static/%2E%2E%2Fapp.py",
        "/static/..%2f..%2fcli.py",
        "/static/..%5capp.py",
        "/static//etc/passwd",
        "/static/%2fetc%2fpasswd",
        "/static/" + str(Path(mechscope.__file__).parent / "server" / "app.py"),
        "/static/....//app.py",
    ],
)
def test_no_file_route_leaves_its_folder(live, path):
    status, data = _raw_get(live[1], path)
    assert status in (400, 404), (status, data[:200])
    assert b"def create_app" not in data and b"root:" not in data and b"[project]" not in data


def test_the_server_binds_loopback_by_default(live):
    assert live[0].startswith("http://127.0.0.1:")


def test_twenty_clients_times_ten_mixed_requests(live, model):
    """Every answer under load equals the answer alone (model calls are serialised by one lock)."""
    url = live[0]
    requests = [
        ("/api/predict", {"prompt": PROMPT, "target": TARGET}),
        ("/api/predict", {"prompt": "The capital of France is", "k": 5}),
        ("/api/unit", {"unit": "1:3", "prompt": PROMPT}),
        ("/api/intervene", {"prompt": PROMPT, "unit": "1:3", "op": "scale", "value": 3, "target": TARGET}),
        ("/api/attribute", {"prompt": PROMPT, "target": TARGET, "top": 3}),
        ("/api/patch", {"clean": "The capital of France is", "corrupt": "The capital of Italy is", "target": " the"}),
        ("/api/unit", {"unit": "99:1"}),  # bad input under load: still a 400
        ("/api/predict", {"prompt": ""}),
    ]
    with httpx.Client(base_url=url, timeout=60) as c:
        expected = [(r.status_code, r.json()) for r in (c.post(route, json=body) for route, body in requests)]
    assert [code for code, _ in expected] == [200] * 6 + [400, 422]

    async def client(i: int) -> list[tuple[int, float, bool]]:
        results = []
        async with httpx.AsyncClient(base_url=url, timeout=120) as c:
            for j in range(10):
                which = (i + 3 * j) % len(requests)
                start = time.perf_counter()
                r = await c.post(requests[which][0], json=requests[which][1])
                results.append((which, time.perf_counter() - start, (r.status_code, r.json()) == expected[which]))
        return results

    async def everyone():
        return await asyncio.gather(*(client(i) for i in range(20)))

    with ThreadPoolExecutor(1) as own_thread:  # its own event loop: another test's (Playwright's) may be running here
        answered = own_thread.submit(lambda: asyncio.run(everyone())).result()
    results = [r for per_client in answered for r in per_client]
    assert len(results) == 200 and all(ok for _, _, ok in results)
    assert {which for which, _, _ in results} == set(range(len(requests)))


# -- the command ------------------------------------------------------------------------------------------------------


def _serve(monkeypatch, capsys, *argv):
    import mechscope.server as server

    seen = {}
    monkeypatch.setattr(server, "serve", lambda ex, host, port: seen.update(ex=ex, host=host, port=port))
    monkeypatch.setattr(mechscope, "load", lambda name, **kw: tiny_lm())
    code, out, err = invoke_cli(monkeypatch, capsys, "serve", *argv)
    return code, out, err, seen


def test_serve_binds_loopback_and_prints_the_url(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("MECHSCOPE_CACHE", str(tmp_path))
    code, out, _, seen = _serve(monkeypatch, capsys, "--port", str(_free_port()))
    assert code == 0 and seen["host"] == "127.0.0.1" and f"http://127.0.0.1:{seen['port']}/" in out
    assert "warning" not in out


def test_serve_on_another_host_warns(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("MECHSCOPE_CACHE", str(tmp_path))
    code, out, _, seen = _serve(monkeypatch, capsys, "--host", "0.0.0.0", "--port", str(_free_port()))
    assert code == 0 and seen["host"] == "0.0.0.0" and "warning: serving on 0.0.0.0" in out


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (("--port", "0"), "--port 0 is out of range: valid values are 1..65535"),
        (("--port", "70000"), "--port 70000 is out of range"),
        (("--db", "/nonexistent/x.duckdb"), "--db '/nonexistent/x.duckdb' is not a file"),
        (("--dict", "/nonexistent/sae"), "/nonexistent/sae"),
    ],
)
def test_serve_refuses_bad_options_in_one_line(monkeypatch, capsys, tmp_path, argv, words):
    monkeypatch.setenv("MECHSCOPE_CACHE", str(tmp_path))
    code, out, err, seen = (
        _serve(monkeypatch, capsys, *argv, "--port", str(_free_port()))
        if "--port" not in argv
        else _serve(monkeypatch, capsys, *argv)
    )
    assert code == 2 and not seen and words in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_serve_refuses_a_port_in_use(monkeypatch, capsys, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, _, err, seen = _serve(monkeypatch, capsys, "--port", str(port))
    assert code == 2 and not seen and f"--port {port} on 127.0.0.1 cannot be used" in err


# -- features, on SmolLM2 with the SAE that ships with mechscope -----------------------------------------------------


@pytest.fixture(scope="module")
def smol_client(smollm2):
    return TestClient(create_app(open_explorer(smollm2, dictionaries=[f"sae={SAE}"])), raise_server_exceptions=False)


@pytest.mark.slow
def test_a_feature_page_and_steering(smol_client, smollm2):
    from mechscope.dictionaries import load_any
    from mechscope.dictionaries.steer import FeatureSteer

    sae = load_any(SAE, model=smollm2)
    assert smol_client.get("/api/info").json()["dictionaries"] == ["sae"]
    got = smol_client.post("/api/unit", json={"unit": "f:sae:7", "prompt": PROMPT}).json()
    x = smollm2.run(smollm2.to_ids(PROMPT), read=["blocks.15.hook_resid_post"]).cache["blocks.15.hook_resid_post"]
    want, skip = sae.encode_dense(x.float())[0, :, 7], sae.cfg.skip_positions
    values = got["heatmap"]["values"]
    assert got["kind"] == "feature" and values[:skip] == [None] * skip and skip == 4  # positions it was not trained on
    assert torch.allclose(torch.tensor(values[skip:]), want[skip:], atol=1e-4)
    assert "reads blocks.15.hook_resid_post" in got["about"] and got["promoted"] and got["ops"] == ["ablate", "add", "clamp"]
    body = {"prompt": PROMPT, "unit": "f:sae:7", "op": "add", "value": 20, "target": TARGET}
    r = smol_client.post("/api/intervene", json=body).json()
    direct = mechscope.intervene(smollm2, PROMPT, [FeatureSteer.add(sae, 7, 20, name="sae")], targets=[TARGET])
    assert r["intervention"] == "add 20 x feature sae:7" and close(r["target"]["prob_after"], direct.targets[0].prob_after)
    assert smol_client.post("/api/unit", json={"unit": f"f:sae:{sae.d_sae}"}).status_code == 400
    long = smol_client.post("/api/predict", json={"prompt": "word " * 300})
    words = "the prompt has 301 tokens: the explorer takes at most 256"  # 300 words and a start token
    assert long.status_code == 400 and long.json()["error"] == words
    concept = {"dictionary": "sae", "texts": ["The cat sat.", "A cat and a dog."]}
    found = smol_client.post("/api/find-feature", json=concept).json()
    assert len(found["features"]) == 10 and found["features"][0]["unit"].startswith("f:sae:")


def test_bad_units_are_answered_while_the_model_is_busy(model):
    """A unit or op that cannot be is refused at once: it does not queue behind model work."""
    ex = open_explorer(model)
    c = TestClient(create_app(ex), raise_server_exceptions=False)
    with ex.busy():  # the model thread would wait for this lock
        start = time.perf_counter()
        bad = [
            c.post("/api/unit", json={"unit": "99:1"}),
            c.post("/api/intervene", json={"prompt": PROMPT, "unit": "1:3", "op": "clamp"}),
        ]
        assert time.perf_counter() - start < 5
    assert [r.status_code for r in bad] == [400, 400]
    assert c.post("/api/unit", json={"unit": "1:3"}).status_code == 200  # and the queue runs once the model is free
