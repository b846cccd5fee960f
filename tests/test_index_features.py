"""Dictionary features as index units, and the feature page.

An index of two dictionaries (an SAE and a transcoder, with random weights) and one neuron site on the
tiny Llama with a real tokenizer (`conftest.tiny_lm`): stored values against `Dictionary.encode_dense`
of the model's own activations, a forward that stops after the deepest site, resume and shard merge
identical to one build, the feature card's logit effects and nearest features against the weights by
hand, and the commands (`index build --dict`, `index show/rank/search`, `feature`) with one-line errors.
"""

from __future__ import annotations

import duckdb
import numpy as np
import pytest
import torch
from conftest import invoke_cli, tiny_lm
from safetensors.torch import save_file
from test_index_build import _assert_same, _tables

from mechscope import cli_dict, cli_index
from mechscope.dictionaries import DictConfig, Dictionary, load_any, save_dictionary
from mechscope.errors import MechscopeError
from mechscope.index import store
from mechscope.index.build import IndexSettings, build_index, merge_indexes
from mechscope.index.feature_card import feature_card, feature_logits, nearest_features
from mechscope.index.features import dictionary_digest
from mechscope.index.query import Index
from mechscope.models.fingerprint import model_fingerprint

SITES = ["blocks.0.mlp.hook_post"]
SETTINGS = dict(ctx_len=32, batch_size=4, k=5, n_samples=2)


def random_dictionary(
    reads, writes, d_in=32, d_out=32, d_sae=64, activation="topk", seed=0, fingerprint=True, model=None
) -> Dictionary:
    m = model or tiny_lm()
    options = {"k": 4} if activation == "topk" else {}
    cfg = DictConfig(reads, writes, d_in, d_out, d_sae, activation=activation, activation_options=options, model=m.name,
                     model_fingerprint=model_fingerprint(m) if fingerprint else "")  # fmt: skip
    d = Dictionary(cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        d.W_dec.copy_(torch.randn(d.W_dec.shape, generator=gen))
        d.W_enc.copy_(d.W_dec[:, : len(reads) * d_in].T if d.cfg.reconstructs else torch.randn(d.W_enc.shape, generator=gen))
        d.b_enc.copy_(0.1 * torch.randn(d_sae, generator=gen))
        d.b_dec.copy_(0.1 * torch.randn(d.b_dec.shape, generator=gen))
    return d.eval()


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """An SAE on blocks.1's residual stream (in res1/dictionary, as train-dict saves) and a ReLU transcoder of block 0's MLP."""
    root = tmp_path_factory.mktemp("dicts")
    sae = random_dictionary(["blocks.1.hook_resid_post"], ["blocks.1.hook_resid_post"])
    tc = random_dictionary(["blocks.0.hook_resid_mid"], ["blocks.0.hook_mlp_out"], d_sae=32, activation="relu", seed=1)
    return save_dictionary(sae, root / "res1" / "dictionary"), save_dictionary(tc, root / "tc0")


def _build(path, folders, contexts=(0, 24), **kw):
    settings = IndexSettings(contexts=contexts, **SETTINGS)
    return build_index(tiny_lm(), path, sites=SITES, settings=settings, checkpoint_seconds=0, progress=False,
                       dictionaries=folders, **kw)  # fmt: skip


@pytest.fixture(scope="module")
def whole(folders, tmp_path_factory):
    return _build(tmp_path_factory.mktemp("index") / "whole.duckdb", folders)


def test_features_are_units_whose_values_match_the_dictionary(folders, whole):
    m = tiny_lm()
    with Index(whole, model=m) as index:
        assert [s.site for s in index.sites] == [*SITES, "f:res1", "f:tc0"] and index.n_units == 48 + 64 + 32
        assert [d["name"] for d in index.meta["dictionaries"]] == ["res1", "tc0"]
        ids = torch.from_numpy(
            index.con.execute("SELECT token FROM tokens ORDER BY ctx, pos").fetchnumpy()["token"].astype(np.int64)
        ).view(24, 32)
        for folder, name in zip(folders, ["res1", "tc0"], strict=True):
            d = load_any(folder)
            site = d.cfg.read_sites[0]
            with torch.no_grad():
                f = d.encode_dense(m.run(ids, read=[site], logits=False).cache[site])[:, 4:]  # [ctx, pos, F]
            scored = f.reshape(-1, d.d_sae)
            units = index.con.execute(
                "SELECT max, mean, density FROM units WHERE site = ? ORDER BY unit", ["f:" + name]
            ).fetchnumpy()
            np.testing.assert_allclose(units["max"], scored.max(0).values.numpy(), atol=1e-5)
            np.testing.assert_allclose(units["mean"], scored.double().mean(0).numpy(), atol=1e-5)
            np.testing.assert_allclose(units["density"], (scored > 0).double().mean(0).numpy())
            busiest = int(scored.max(0).values.argmax())
            top = index.top(f"f:{name}:{busiest}", 3)
            assert [ex.value for ex in top] == pytest.approx([float(f[ex.ctx, ex.pos - 4, busiest]) for ex in top], abs=1e-5)
            assert top[0].value == pytest.approx(float(scored[:, busiest].max()), abs=1e-5)
            assert index.rank(by="max", n=1, site=f"f:{name}")[0].unit.name == f"f:{name}:{busiest}"


def test_the_forward_stops_after_the_deepest_site(folders, tmp_path):
    """The deepest site read is blocks.1's (the SAE's): layer 2 of the 3 never runs."""
    calls = []
    hook = tiny_lm().hf.model.layers[2].register_forward_hook(lambda *_: calls.append(1))
    try:
        settings = IndexSettings(contexts=(0, 4), **SETTINGS)
        build_index(tiny_lm(), tmp_path / "i.duckdb", settings=settings, progress=False, dictionaries=[folders[0]])
    finally:
        hook.remove()
    assert calls == []
    with Index(tmp_path / "i.duckdb") as index:  # dictionaries without sites: only the features
        assert [s.site for s in index.sites] == ["f:res1"]


def test_resume_and_merge_give_the_one_build(folders, whole, tmp_path, monkeypatch):
    write, calls = store.write_stats, [0]

    def dying(*args):
        calls[0] += 1
        if calls[0] == 4:  # the empty index, two checkpoints, then the third dies in its transaction
            raise KeyboardInterrupt
        write(*args)

    monkeypatch.setattr(store, "write_stats", dying)
    with pytest.raises(KeyboardInterrupt):
        _build(tmp_path / "resumed.duckdb", folders)
    monkeypatch.setattr(store, "write_stats", write)
    assert store.read_meta(duckdb.connect(str(tmp_path / "resumed.duckdb"), read_only=True))["contexts_done"] == 8
    _build(tmp_path / "resumed.duckdb", folders)
    _assert_same(_tables(tmp_path / "resumed.duckdb"), _tables(whole))
    first = _build(tmp_path / "a.duckdb", folders, contexts=(0, 12))
    second = _build(tmp_path / "b.duckdb", folders, contexts=(12, 24))
    merged = merge_indexes([second, first], tmp_path / "merged.duckdb")
    _assert_same(_tables(merged), _tables(whole), exact_sums=False)
    retrained = random_dictionary(["blocks.1.hook_resid_post"], ["blocks.1.hook_resid_post"], seed=5)
    with pytest.raises(MechscopeError, match="was built with dictionaries="):  # other weights under the same name
        _build(tmp_path / "a.duckdb", {"res1": retrained, "tc0": folders[1]})


def test_logit_effects_and_nearest_features_by_hand(folders, whole):
    m, hf = tiny_lm(), tiny_lm().hf
    sae = load_any(folders[0], model=m)
    with Index(whole, model=m) as index:
        card = feature_card(m, sae, 7, index=index, n_out=5)
        assert card.name == "f:res1:7" and card.unit.stats == index.stats("f:res1:7") and card.note is None
    manual = hf.lm_head.weight @ (hf.model.norm.weight * sae.W_dec[7])
    manual = manual - manual.mean()  # centred as a neuron's output tokens are
    assert [t.token_id for t in card.promoted] == manual.topk(5).indices.tolist()
    assert [t.token_id for t in card.suppressed] == (-manual).topk(5).indices.tolist()
    assert card.unit.promoted == card.promoted and card.promoted[0].weight == pytest.approx(float(manual.max()), rel=1e-5)
    rows = sae.W_dec / sae.W_dec.norm(dim=-1, keepdim=True)
    cosine = rows @ rows[7]
    cosine[7] = -2
    assert [n.feature for n in card.nearest] == cosine.topk(5).indices.tolist()
    assert card.nearest[0].cosine == pytest.approx(float(cosine.max()), rel=1e-5)
    alone = feature_card(m, sae, 7, name="res1", n_out=5)  # no index: the same effects, and a note on what an index adds
    assert alone.unit is None and alone.promoted == card.promoted and "index build --dict" in alone.note
    with pytest.raises(MechscopeError, match=r"feature 64 out of range: res1 has features 0..63"):
        feature_card(m, sae, 64, name="res1")


def test_logit_effects_of_other_kinds_of_dictionary():
    """A crosscoder's deepest residual stream only; neurons through the MLP's output projection; z has none."""
    m, hf = tiny_lm(), tiny_lm().hf
    layers = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    crosscoder = random_dictionary(layers, layers)
    logits, via = feature_logits(m, crosscoder, 3)
    torch.testing.assert_close(logits, hf.lm_head.weight @ (hf.model.norm.weight * crosscoder.W_dec[3, 32:]))
    assert via == "blocks.1.hook_resid_post"
    neurons = random_dictionary(["blocks.1.mlp.hook_post"], ["blocks.1.mlp.hook_post"], d_in=48, d_out=48)
    logits, _ = feature_logits(m, neurons, 3)
    w_out = hf.model.layers[1].mlp.down_proj.weight  # [d_model, d_mlp]
    torch.testing.assert_close(logits, hf.lm_head.weight @ (hf.model.norm.weight * (w_out @ neurons.W_dec[3])))
    z = random_dictionary(["blocks.1.attn.hook_z"], ["blocks.1.attn.hook_z"], d_in=8, d_out=8)
    assert feature_logits(m, z, 0)[0] is None
    assert len(nearest_features(z, 0, n=100)) == 63


@pytest.fixture
def run(monkeypatch, capsys):
    """The `mechscope` command in-process on the tiny model: (exit code, stdout + stderr)."""
    for module in (cli_index, cli_dict):
        monkeypatch.setattr(module, "_load", lambda *_: tiny_lm())

    def invoke(*args):
        code, out, err = invoke_cli(monkeypatch, capsys, *args, width=160, consoles=(cli_dict,))
        return code, out + err

    return invoke


def test_feature_commands(folders, run, tmp_path):
    db = tmp_path / "f.duckdb"
    build = ("index", "build", "--dict", folders[0], "--dict", f"tc={folders[1]}", "--tokens", 512, "--ctx-len", 32)
    code, out = run(*build, "--k", 5, "--out", db)
    assert code == 0 and "f:res1, f:tc" in out, out
    code, out = run("index", "show", "f:tc:3", "--db", db, "--n", 3)
    assert code == 0 and "unit f:tc:3" in out and "top 3 examples" in out and "mechscope feature DIR F" in out, out
    code, out = run("index", "info", "--db", db)
    assert code == 0 and "f:tc " in out and "32 features of a dictionary reading blocks.0.hook_resid_mid" in out, out
    code, out = run("index", "rank", "--site", "f:res1", "--by", "max", "--n", 2, "--db", db)
    assert code == 0 and out.count("│ f:res1:") == 2, out
    code, out = run("index", "search", " the", "--n", 96, "--db", db)
    assert code == 0 and "│ f:tc:" in out, out
    html, png = tmp_path / "f.html", tmp_path / "f.png"
    code, out = run("feature", folders[1], 3, "--db", db, "--n", 3, "--html", html, "--png", png)
    assert code == 0 and "f:tc:3" in out and "promotes" in out and "nearest features" in out and "top 3 examples" in out, out
    assert "via blocks.0.hook_mlp_out" in out and "Nearest features" in html.read_text() and png.read_bytes()[:4] == b"\x89PNG"
    assert "a transcoder feature: reads blocks.0.hook_resid_mid; writes blocks.0.hook_mlp_out" in out, out
    code, out = run("feature", folders[0], 5, "--html", html)
    assert code == 0 and "promotes" in out and "index build --dict" in out and "f:res1:5" in out, out
    assert "index build --dict" in html.read_text()


def test_feature_finds_an_index_of_the_models_that_holds_its_dictionary(folders, run, tmp_path, monkeypatch):
    from mechscope.index.build import default_index_path

    monkeypatch.setenv("MECHSCOPE_CACHE", str(tmp_path / "cache"))
    name = tiny_lm().name
    code, out = run("index", "build", "--dict", f"tc={folders[1]}", "--tokens", 512, "--ctx-len", 32, "--k", 5,
                    "--out", default_index_path(name).with_name(f"{name}-tc.duckdb"))  # fmt: skip
    assert code == 0, out
    code, out = run("feature", folders[1], 3, "--n", 2)  # no --db, and no default index: the one beside it
    assert code == 0 and "f:tc:3" in out and "top 2 examples" in out, out
    code, out = run("feature", folders[0], 3)  # a dictionary no index holds
    assert code == 0 and "index build --dict" in out, out


def _broken(tmp_path, folders):
    """Dictionaries that do not fit the tiny model, or whose files are damaged."""
    other = random_dictionary(["blocks.1.hook_resid_post"], ["blocks.1.hook_resid_post"])
    other.cfg.model_fingerprint = "feedfacefeedface"
    narrow = random_dictionary(["blocks.1.hook_resid_post"], ["blocks.1.hook_resid_post"], d_in=16, d_out=16, fingerprint=False)
    corrupt = save_dictionary(random_dictionary(["blocks.1.hook_resid_post"], ["blocks.1.hook_resid_post"]), tmp_path / "corrupt")
    weights = corrupt / "dictionary.safetensors"
    weights.write_bytes(weights.read_bytes()[:300])
    shapes = save_dictionary(random_dictionary(["blocks.1.hook_resid_post"], ["blocks.1.hook_resid_post"]), tmp_path / "shapes")
    save_file({"W_dec": torch.zeros(3, 3)}, str(shapes / "dictionary.safetensors"))
    return {
        "other": save_dictionary(other, tmp_path / "other"),
        "narrow": save_dictionary(narrow, tmp_path / "narrow"),
        "corrupt": corrupt,
        "shapes": shapes,
    }


def test_bad_input_gets_one_line(folders, run, tmp_path):
    bad = _broken(tmp_path, folders)
    db = tmp_path / "b.duckdb"
    assert run("index", "build", "--dict", folders[0], "--tokens", 256, "--ctx-len", 32, "--out", db)[0] == 0
    cases = [
        (("feature", folders[0], 64), "feature 64 out of range: "),
        (("feature", folders[0], "--", -1), "feature -1 out of range"),
        (("index", "show", "f:res1:64", "--db", db), "unit 'f:res1:64' out of range: f:res1 has units 0..63"),
        (("steer", "The cat", "--feature", f"{folders[0]}:64=5", "--generate", 2), "feature 64 out of range"),
        (("feature", bad["other"], 1), "was trained on"),
        (("feature", bad["narrow"], 1), "reads d_in=16"),
        (("feature", bad["corrupt"], 1), "is damaged or truncated"),
        (("feature", bad["shapes"], 1), "has no tensor"),
        (("index", "build", "--dict", bad["other"], "--out", tmp_path / "x.duckdb"), "was trained on"),
        (("index", "build", "--dict", bad["narrow"], "--out", tmp_path / "x.duckdb"), "reads d_in=16"),
        (("index", "build", "--dict", f"a={folders[0]}", "--dict", f"a={folders[1]}"), "two dictionaries are named 'a'"),
        (("index", "build", "--dict", f"a:b={folders[0]}", "--out", tmp_path / "x.duckdb"), "dictionary name 'a:b'"),
        (("index", "build", "--dict", tmp_path / "nothing", "--out", tmp_path / "x.duckdb"), "no dictionary folder"),
    ]
    for args, message in cases:
        code, out = run(*args)
        assert code == 2 and message in out and len(out.strip().splitlines()) == 1, (args, out)
    assert not (tmp_path / "x.duckdb").exists()


def test_the_digest_names_the_weights_not_the_folder(folders, tmp_path):
    a, b = load_any(folders[0]), load_any(folders[0])
    assert dictionary_digest(a) == dictionary_digest(b)
    scaled = random_dictionary(["blocks.1.hook_resid_post"], ["blocks.1.hook_resid_post"], seed=3)
    scaled.input_scale.fill_(2.0)  # as in training: normalised inputs, folded into the weights when saved
    scaled.output_scale.fill_(2.0)
    assert dictionary_digest(scaled) == dictionary_digest(load_any(save_dictionary(scaled, tmp_path / "scaled")))
    with torch.no_grad():
        b.W_dec[0, 0] += 1e-3
    assert dictionary_digest(a) != dictionary_digest(b)


@pytest.mark.slow
def test_features_of_a_real_model(smollm2, tmp_path):
    """SmolLM2, a few tokens: stored feature values against encode_dense, logit effects against its weights by hand."""
    site = "blocks.3.hook_resid_post"
    sae = random_dictionary([site], [site], d_in=576, d_out=576, d_sae=256, model=smollm2)
    settings = IndexSettings(contexts=(0, 4), **SETTINGS)
    db = build_index(smollm2, tmp_path / "s.duckdb", sites=["blocks.3.mlp.hook_post"], settings=settings, progress=False,
                     dictionaries={"sae": sae})  # fmt: skip
    with Index(db, model=smollm2) as index:
        ids = torch.from_numpy(
            index.con.execute("SELECT token FROM tokens ORDER BY ctx, pos").fetchnumpy()["token"].astype(np.int64)
        ).view(4, 32)
        with torch.no_grad():
            f = sae.encode_dense(smollm2.run(ids, read=[site], logits=False).cache[site])[:, 4:].reshape(-1, 256)
        units = index.con.execute("SELECT max, density FROM units WHERE site = 'f:sae' ORDER BY unit").fetchnumpy()
        np.testing.assert_allclose(units["max"], f.max(0).values.numpy(), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(units["density"], (f > 0).double().mean(0).numpy())
        busiest = int(f.max(0).values.argmax())
        card = feature_card(smollm2, sae, busiest, index=index, n_out=5)
    hf = smollm2.hf
    manual = hf.lm_head.weight @ (hf.model.norm.weight * sae.W_dec[busiest])
    assert [t.token_id for t in card.promoted] == (manual - manual.mean()).topk(5).indices.tolist()
    assert card.unit.stats.max == pytest.approx(float(f[:, busiest].max()), rel=1e-4)


def test_a_clt_is_indexed_feature_by_feature(tmp_path):
    """A cross-layer transcoder over layers 0-1: its features are units numbered layer by layer, their values
    those of the CLT on the clean forward's resid_mid of each layer, and a layer-1 feature's logit effects go
    through layer 1's MLP output only."""
    m = tiny_lm()
    reads, writes = ["blocks.0.hook_resid_mid", "blocks.1.hook_resid_mid"], ["blocks.0.hook_mlp_out", "blocks.1.hook_mlp_out"]
    cfg = DictConfig(
        reads, writes, 32, 32, 64, "topk", {"k": 3}, layered=True, model=m.name, model_fingerprint=model_fingerprint(m)
    )
    d = Dictionary(cfg)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in d.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
        d.mask_decoder_(d.W_dec.data)
    folder = save_dictionary(d.eval(), tmp_path / "clt01")
    path = build_index(m, tmp_path / "clt.duckdb", sites=SITES, settings=IndexSettings(contexts=(0, 8), **SETTINGS),
                       checkpoint_seconds=0, progress=False, dictionaries=[folder])  # fmt: skip
    with Index(path, model=m) as index:
        ids = torch.from_numpy(
            index.con.execute("SELECT token FROM tokens ORDER BY ctx, pos").fetchnumpy()["token"].astype(np.int64)
        )
        ids = ids.view(8, 32)
        cache = m.run(ids, read=reads, logits=False).cache
        with torch.no_grad():
            f = d.encode_dense(torch.stack([cache[s] for s in reads], dim=2))[:, 4:].reshape(-1, 64)
        units = index.con.execute("SELECT max FROM units WHERE site = 'f:clt01' ORDER BY unit").fetchnumpy()
        np.testing.assert_allclose(units["max"], f.max(0).values.numpy(), atol=1e-5)
    _, via = feature_logits(m, load_any(folder), 40)
    assert via == "blocks.1.hook_mlp_out"


def test_the_shipped_dictionarys_digest_is_stable():
    """Indexes built with the demo's dictionary in earlier versions still match it: fields added to the config
    since (at their defaults) leave the digest alone."""
    from pathlib import Path

    import mechscope

    asset = Path(mechscope.__file__).parent / "assets" / "sae-smollm2-l15"
    assert dictionary_digest(load_any(asset)) == "7542c00a938282f4"
