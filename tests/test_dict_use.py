"""Using a trained dictionary: evaluation against an independent computation, steering against a manual
re-computation, finding a concept's features, and the dictionary commands end to end.

Runs on the tiny Llama with a real tokenizer (`conftest.tiny_lm`), saved to a folder for the CLI.
"""

from __future__ import annotations

import functools
import itertools
import json

import pytest
import torch
from conftest import invoke_cli, tiny_lm
from test_train_dict import config

import mechscope
from mechscope import cli_dict
from mechscope.attribution import generate, intervene
from mechscope.dictionaries import load_dictionary, train_dictionary
from mechscope.dictionaries.evaluate import evaluate_dictionary
from mechscope.dictionaries.find import find_features
from mechscope.dictionaries.steer import FeatureSteer
from mechscope.errors import MechscopeError

SITE = "blocks.1.hook_resid_post"
TEXT = "The reliability of Wikipedia is very"


@functools.cache
def trained(tmp_root: str):
    train_dictionary(tiny_lm(), config(), f"{tmp_root}/run", show_progress=False)
    return load_dictionary(f"{tmp_root}/run/dictionary", model=tiny_lm())


@pytest.fixture(scope="module")
def sae(tmp_path_factory):
    return trained(str(tmp_path_factory.mktemp("sae")))


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny") / "model"
    tiny_lm().hf.save_pretrained(folder)
    tiny_lm().tokenizer.save_pretrained(folder)
    return folder


def test_evaluation_matches_a_direct_computation(sae):
    """One batch of held-out contexts, every figure recomputed here from the model's own forward passes."""
    from mechscope.data import corpus, held_out, pack

    m = tiny_lm()
    r = evaluate_dictionary(m, sae, "builtin", tokens=4 * 28, ctx_len=32, batch_contexts=4)
    assert r.tokens == 4 * 28 and r.skip == 4 and len(r.density) == sae.d_sae and r.l0 == pytest.approx(4)
    ids = next(pack(held_out(corpus("builtin"))[1], m.tokenizer, 32, seed=0, batch_size=4)).tokens
    clean = m.run(ids, read=[SITE], logits=True)
    x = clean.cache[SITE][:, 4:]
    recon = sae(x.reshape(-1, 32)).recon.reshape(x.shape)
    fvu = ((x - recon).double() ** 2).sum() / ((x.reshape(-1, 32) - x.reshape(-1, 32).mean(0)).double() ** 2).sum()
    assert r.fvu == pytest.approx(float(fvu), rel=1e-5)

    def put(value):
        def write(v):
            v = v.clone()
            v[:, 4:] = value
            return v

        return {SITE: write}

    def ce(logits):  # positions 4..30 predict 5..31
        logp = logits[:, 4:-1].log_softmax(-1)
        return -logp.gather(-1, ids[:, 5:, None]).mean()

    spliced = m.run(ids, write=put(recon), logits=True).logits
    ablated = m.run(ids, write=put(torch.zeros_like(x)), logits=True).logits
    assert r.ce_clean == pytest.approx(float(ce(clean.logits)), rel=1e-5)
    assert r.ce_spliced == pytest.approx(float(ce(spliced)), rel=1e-5)
    assert r.ce_ablated == pytest.approx(float(ce(ablated)), rel=1e-5)
    p, q = clean.logits[:, 4:-1].log_softmax(-1), spliced[:, 4:-1].log_softmax(-1)
    assert r.kl == pytest.approx(float((p.exp() * (p - q)).sum(-1).mean()), rel=1e-4)
    assert r.ce_recovered == pytest.approx((r.ce_ablated - r.ce_spliced) / (r.ce_ablated - r.ce_clean))


def test_steering_matches_a_manual_recomputation(sae):
    m = tiny_lm()
    x = m.run(TEXT, read=[SITE]).cache[SITE][0]
    feature = int(sae.encode_dense(x)[-1].argmax())
    f = sae.encode_dense(x)[..., feature]
    direction = sae.W_dec[feature].detach()
    ablated = m.run(TEXT, write={SITE: lambda v: v - f[None, :, None] * direction}).logits[0, -1].log_softmax(-1)
    r = intervene(m, TEXT, FeatureSteer.ablate(sae, feature), k=5)
    assert r.after.top[0].logprob == pytest.approx(float(ablated[r.after.top[0].id]), abs=1e-5)
    clamped = m.run(TEXT, write={SITE: lambda v: v + (3.0 - f[None, :, None]) * direction}).logits[0, -1].log_softmax(-1)
    r = intervene(m, TEXT, FeatureSteer.clamp(sae, feature, 3.0), k=5)
    assert r.after.top[0].logprob == pytest.approx(float(clamped[r.after.top[0].id]), abs=1e-5)
    added = m.run(TEXT, write={SITE: lambda v: v + 5.0 * direction}).logits[0, -1].log_softmax(-1)
    r = intervene(m, TEXT, FeatureSteer.add(sae, feature, 5.0), k=5)
    assert r.after.top[0].logprob == pytest.approx(float(added[r.after.top[0].id]), abs=1e-5)
    g = generate(m, TEXT, [FeatureSteer.add(sae, feature, 50.0)], max_new_tokens=4)
    assert g.before_ids != g.after_ids


def test_steering_bad_input(sae):
    with pytest.raises(MechscopeError, match="feature 999 out of range: dictionary has features 0..127"):
        intervene(tiny_lm(), TEXT, FeatureSteer.add(sae, 999, 1.0))
    other = mechscope.load(tiny_lm().hf, tokenizer=tiny_lm().tokenizer)
    other.config.rope_theta = 1.0  # the fingerprint covers the config
    with pytest.raises(MechscopeError, match="was trained on"):
        intervene(other, TEXT, FeatureSteer.add(sae, 1, 1.0))
    other.config.rope_theta = tiny_lm().config.rope_theta


def test_find_features_ranks_a_feature_that_fires_on_the_concept(sae):
    m = tiny_lm()
    x = m.run("def function(x): return x", read=[SITE]).cache[SITE][0]
    found = find_features(m, sae, ["def function(x): return x"], others=["The weather is nice today."], top=3)
    assert found[0].coverage == 1 and found[0].concept > found[0].elsewhere
    assert found[0].concept == pytest.approx(float(sae.encode_dense(x)[4:, found[0].feature].max()), rel=1e-5)
    with pytest.raises(MechscopeError, match="no concept texts"):
        find_features(m, sae, [])


@pytest.fixture
def run(monkeypatch, capsys):
    """Run the `mechscope` command in-process through its entry point (exit codes and one-line errors included)."""

    def invoke(*args):
        code, out, err = invoke_cli(monkeypatch, capsys, *args, width=200, consoles=(cli_dict,))
        return code, out + err

    return invoke


def test_dictionary_commands_end_to_end(tmp_path, model_folder, run):
    m = ["--model", model_folder]
    code, out = run("harvest", SITE, "--out", tmp_path / "store", "--tokens", 2000, "--ctx-len", 32, "--shard-contexts", 16, *m)
    assert code == 0, out
    assert json.loads((tmp_path / "store" / "manifest.json").read_text())["complete"]
    train = ["--sites", SITE, "--expansion", 4, "--k", 4, "--tokens", 1280, "--batch-size", 64, "--ctx-len", 32]
    code, out = run("train-dict", "--out", tmp_path / "run", *train, "--store", tmp_path / "store", "--eval-tokens", 256, *m)
    assert code == 0, out
    assert (tmp_path / "run" / "curves.png").stat().st_size > 10_000
    folder = tmp_path / "run" / "dictionary"
    evaluate = (
        "eval-dict",
        folder,
        "--tokens",
        300,
        "--ctx-len",
        32,
        "--corpus",
        "builtin",
        "--json",
        "--png",
        tmp_path / "d.png",
    )
    code, out = run(*evaluate, *m)
    assert code == 0, out
    assert "ce_recovered" in json.loads(out[out.index("{") :]) and (tmp_path / "d.png").exists()
    code, out = run("find-feature", "def function(x): return x", "--dict", folder, "--top", 3, *m)
    assert code == 0 and "coverage" in out, out
    code, out = run("steer", TEXT, "--feature", f"{folder}:1=20", "--generate", 4, *m)
    assert code == 0 and "without" in out, out


@pytest.mark.parametrize(
    "args, message",
    [
        (("steer", TEXT, "--feature", "nofolder"), "write DIR:FEATURE"),
        (("steer", TEXT), "no steering given"),
        (("eval-dict", "/no/such/dict"), "no dictionary folder"),
        (("train-dict", "--out", "/tmp/x", "--k", "0"), "--k 0 is invalid"),
        (("train-dict", "--out", "/tmp/x", "--activation", "gelu"), "unknown --activation 'gelu'"),
        (("harvest", SITE, "--out", "/tmp/h", "--tokens", "0"), "--tokens 0 is out of range"),
    ],
)
def test_dictionary_commands_refuse_bad_input_in_one_line(args, message, run):
    code, out = run(*args)
    assert code == 2 and message in out and len(out.strip().splitlines()) == 1, out


def test_train_dict_refuses_a_bad_store_or_setting_in_one_line(tmp_path, run, monkeypatch):
    """A store that is missing, partial (manifest complete=false), short of a shard or holding a truncated one;
    k above the latents or at most 0; an unknown activation or write site."""
    import shutil

    from mechscope.activations import HarvestSettings, StreamSpec, harvest

    monkeypatch.setattr(cli_dict, "_load", lambda *_: tiny_lm())
    good = tmp_path / "store"
    harvest(
        tiny_lm(), StreamSpec((SITE,), "builtin", ctx_len=32), good, HarvestSettings(tokens=448, shard_contexts=8), progress=False
    )

    def damaged(name, damage):
        folder = tmp_path / name
        shutil.copytree(good, folder)
        damage(folder)
        return folder

    def unfinished(folder):
        manifest = json.loads((folder / "manifest.json").read_text())
        (folder / "manifest.json").write_text(json.dumps({**manifest, "complete": False}))

    def truncate(folder):
        shard = folder / "shard-00001.safetensors"
        shard.write_bytes(shard.read_bytes()[:1000])

    stores = {
        "missing": tmp_path / "nothing",
        "partial": damaged("partial", unfinished),
        "short": damaged("short", lambda folder: (folder / "shard-00001.safetensors").unlink()),
        "truncated": damaged("truncated", truncate),
    }
    train = ["train-dict", "--sites", SITE, "--expansion", 4, "--tokens", 256, "--batch-size", 64, "--ctx-len", 32]
    train += ["--eval-tokens", 64, "--no-png"]
    cases = [
        (("--store", stores["missing"]), "is not an activation store: it has no manifest.json"),
        (("--store", stores["partial"]), "is partial"),
        (("--store", stores["short"]), "is missing shard-00001.safetensors"),
        (("--store", stores["truncated"]), "shard-00001.safetensors' cannot be read"),
        (("--k", 129), "k=129 is invalid for 128 latents"),
        (("--k", -3), "--k -3 is invalid"),
        (("--activation", "softmax"), "unknown --activation 'softmax'"),
        (("--write-sites", "blocks.1.hook_nothing"), "unknown site"),
        (
            ("--store", good, "--write-sites", "blocks.0.hook_resid_post"),
            "has no blocks.0.hook_resid_post: it holds blocks.1.hook_resid_post",
        ),
    ]
    for i, (args, message) in enumerate(cases):
        code, out = run(*train, "--out", tmp_path / f"run{i}", *args)
        assert code == 2 and message in out and len(out.strip().splitlines()) == 1, (args, out)


def test_convert_dict_keeps_the_feature_activations(tmp_path, run):
    from mechscope.dictionaries import DictConfig, Dictionary, load_any, save_dictionary

    cfg = DictConfig([SITE], [SITE], 16, 16, 64, "topk", {"k": 4}, input_scale=[2.0], output_scale=[2.0])
    d = Dictionary(cfg)
    with torch.no_grad():
        for p in d.parameters():
            p.copy_(torch.randn_like(p, generator=None) * 0.3)
    save_dictionary(d, tmp_path / "own", extra={"final": {"fvu": 0.1}})
    x = torch.randn(32, 16) * 3
    want = load_any(tmp_path / "own").encode_dense(x[:, None])
    code, out = run("convert-dict", tmp_path / "own", "--out", tmp_path / "half", "--dtype", "float16")
    assert code == 0, out
    half_cfg = json.loads((tmp_path / "half" / "cfg.json").read_text())
    assert half_cfg["dtype"] == "float16" and half_cfg["training"] == {"final": {"fvu": 0.1}}  # says what it holds, and whence
    half_bytes = (tmp_path / "half" / "dictionary.safetensors").stat().st_size
    assert half_bytes < 0.6 * (tmp_path / "own" / "dictionary.safetensors").stat().st_size
    assert (load_any(tmp_path / "half").encode_dense(x[:, None]) - want).abs().max() < 2e-2 * want.abs().max()
    code, out = run("convert-dict", tmp_path / "own", "--out", tmp_path / "sl", "--to", "saelens")
    assert code == 0 and (tmp_path / "sl" / "sae_weights.safetensors").is_file(), out
    assert torch.allclose(load_any(tmp_path / "sl").encode_dense(x[:, None]), want, atol=1e-5)
    for args, message in (
        (["--to", "onnx"], "--to 'onnx' is not a format"),
        (["--dtype", "int8"], "--dtype 'int8' is not a dtype"),
        (["--to", "saelens", "--dtype", "float16"], "mechscope format only"),
    ):
        code, out = run("convert-dict", tmp_path / "own", "--out", tmp_path / "x", *args)
        assert code == 2 and message in out and "Traceback" not in out and len(out.strip().splitlines()) == 1, out
    code, out = run("convert-dict", tmp_path / "own", "--out", tmp_path / "own")
    assert code == 2 and "being converted" in out
    code, out = run("convert-dict", tmp_path / "nothing", "--out", tmp_path / "y")
    assert code == 2 and "nothing" in out


def test_a_store_pass_reads_every_slice_once_mixing_many_shards(tmp_path):
    """Each chunk holds `shards_per_chunk` shards' worth of tokens from `parts` slices of as many shards; one
    pass reads every slice of the store exactly once (the slices left over by whole chunks aside), and a
    chunk is the same whenever it is asked for (resuming). The shards' rows are overwritten with their
    own (shard, row) numbers, so that each row read says where it came from."""
    from safetensors.torch import load_file, save_file

    from mechscope.activations import HarvestSettings, StoreSource, StreamSpec, harvest

    folder = tmp_path / "store"
    harvest(
        tiny_lm(),
        StreamSpec((SITE,), "builtin", ctx_len=32),
        folder,
        HarvestSettings(tokens=2800, shard_contexts=8),
        progress=False,
    )
    source = StoreSource(folder, shards_per_chunk=2, parts=4)
    n_shards, shard_tokens = len(source.shards), int(source.manifest["shard_tokens"])
    for i, path in enumerate(source.shards):
        acts = load_file(path)["acts"]
        numbered = torch.arange(i * shard_tokens, (i + 1) * shard_tokens)[:, None, None].expand(acts.shape)
        save_file({"acts": numbered.to(acts.dtype)}, path)  # float32 (the default): exact
    chunks = dict(itertools.islice(source.chunks(), n_shards // 2))
    assert source.chunk_tokens == 2 * shard_tokens and all(len(c) == source.chunk_tokens for c in chunks.values())
    read = torch.cat(list(chunks.values()))[:, 0, 0].long()
    assert len(set(read.tolist())) == len(read) == n_shards // 2 * 2 * shard_tokens  # no row twice
    slices = read // (shard_tokens // 4)
    assert all(torch.equal(read[slices == s], torch.sort(read[slices == s]).values) for s in slices.unique())  # whole slices
    first = set((chunks[0][:, 0, 0].long() // shard_tokens).tolist())
    assert len(first) > 2  # more shards than whole shards would give
    again = dict(itertools.islice(source.chunks(start=1), 1))
    assert torch.equal(again[1], chunks[1])


def test_steering_a_clt_feature_writes_its_layer_and_the_later_ones(tmp_path):
    """A CLT feature of layer 1 (of 0..2) is added at layers 1 and 2's MLP outputs and nowhere else; clamping
    it reads layer 1's resid_mid first. Both checked against hand-written forwards."""
    m = tiny_lm()
    d = train_dictionary(m, config(tokens=64 * 4, kind="clt", layers=[0, 1, 2], sites=None, k=2), tmp_path, show_progress=False)
    block = d.d_sae // 3
    feature = block + 5
    direction = (d.W_dec[feature] / d.output_scale).detach().view(3, -1)
    assert float(direction[0].abs().max()) == 0
    adds = {f"blocks.{w}.hook_mlp_out": (lambda v, w=w: v + 4.0 * direction[w]) for w in (1, 2)}
    added = m.run(TEXT, write=adds).logits[0, -1].log_softmax(-1)
    r = intervene(m, TEXT, FeatureSteer.add(d, feature, 4.0), k=5)
    assert r.after.top[0].logprob == pytest.approx(float(added[r.after.top[0].id]), abs=1e-5)

    mid = m.run(TEXT, read=["blocks.1.hook_resid_mid"]).cache["blocks.1.hook_resid_mid"][0]
    x = torch.zeros(mid.shape[0], 3, mid.shape[1])
    x[:, 1] = mid
    f = d.encode_dense(x)[:, feature]
    clamps = {f"blocks.{w}.hook_mlp_out": (lambda v, w=w: v + (2.0 - f[None, :, None]) * direction[w]) for w in (1, 2)}
    clamped = m.run(TEXT, write=clamps).logits[0, -1].log_softmax(-1)
    r = intervene(m, TEXT, FeatureSteer.clamp(d, feature, 2.0), k=5)
    assert r.after.top[0].logprob == pytest.approx(float(clamped[r.after.top[0].id]), abs=1e-5)
    g = generate(m, TEXT, [FeatureSteer.clamp(d, feature, 50.0)], max_new_tokens=3)  # one-token passes after the prompt
    assert len(g.after_ids) == len(g.before_ids)


def test_convert_dict_writes_circuit_tracer_sets_and_clts(tmp_path, run):
    """--to circuit-tracer takes one CLT, or one transcoder per layer from 0; both read back with the same features."""
    from test_format_circuit_tracer import clt, transcoder

    from mechscope.dictionaries import load_any, save_dictionary

    save_dictionary(clt("jumprelu"), tmp_path / "clt")
    code, out = run("convert-dict", tmp_path / "clt", "--out", tmp_path / "ct-clt", "--to", "circuit-tracer")
    assert code == 0 and (tmp_path / "ct-clt" / "W_dec_2.safetensors").is_file(), out
    x = torch.randn(8, 3, 32)
    torch.testing.assert_close(
        load_any(tmp_path / "ct-clt").encode_dense(x), load_any(tmp_path / "clt").encode_dense(x), atol=1e-4, rtol=1e-4
    )
    for layer in (0, 1):
        save_dictionary(transcoder(layer, "relu", {}, False), tmp_path / f"t{layer}")
    code, out = run("convert-dict", tmp_path / "t1", tmp_path / "t0", "--out", tmp_path / "ct-set", "--to", "circuit-tracer")
    assert code == 0 and "2 transcoders" in out and (tmp_path / "ct-set" / "layer_1.safetensors").is_file(), out
    for args, message in (
        ([tmp_path / "t1", "--to", "circuit-tracer"], "cover layers [1]"),
        ([tmp_path / "t0", tmp_path / "t1"], "only --to circuit-tracer takes several"),
        ([tmp_path / "ct-set"], "give the site one of them reads"),
        ([tmp_path / "clt", "--to", "saelens"], "a clt cannot be exported for SAELens"),
    ):
        code, out = run("convert-dict", *args, "--out", tmp_path / "x")
        assert code == 2 and message in out and "Traceback" not in out and len(out.strip().splitlines()) == 1, out


def test_a_store_of_many_sites_feeds_a_dictionary_of_some(tmp_path):
    """One harvest of several sites serves a dictionary of a subset: its chunks are those of a store of that site alone."""
    from mechscope.activations import HarvestSettings, StoreSource, StreamSpec, harvest

    both = ("blocks.0.hook_resid_post", SITE)
    for name, sites in (("both", both), ("one", (SITE,))):
        spec = StreamSpec(sites, "builtin", ctx_len=32)
        harvest(tiny_lm(), spec, tmp_path / name, HarvestSettings(tokens=448, shard_contexts=8), progress=False)
    picked = next(StoreSource(tmp_path / "both", sites=[SITE]).chunks(0))[1]
    alone = next(StoreSource(tmp_path / "one").chunks(0))[1]
    assert picked.shape == alone.shape and torch.equal(picked, alone)
    with pytest.raises(
        MechscopeError, match="has no blocks.2.hook_resid_post: it holds blocks.0.hook_resid_post, blocks.1.hook_resid_post"
    ):
        StoreSource(tmp_path / "both", sites=["blocks.2.hook_resid_post"])


def test_a_harvest_resumed_over_a_damaged_shard_writes_it_again(tmp_path):
    """A listed shard truncated (or removed) after the fact is harvested again on resume, not taken as whole."""
    from mechscope.activations import HarvestSettings, StoreSource, StreamSpec, harvest

    spec, settings = StreamSpec((SITE,), "builtin", ctx_len=32), HarvestSettings(tokens=448, shard_contexts=4)
    reference = harvest(tiny_lm(), spec, tmp_path / "ref", settings, progress=False)
    harvest(tiny_lm(), spec, tmp_path / "s", settings, progress=False)
    shard = tmp_path / "s" / "shard-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    (tmp_path / "s" / "shard-00002.safetensors").unlink()
    again = harvest(tiny_lm(), spec, tmp_path / "s", settings, progress=False)
    assert again["complete"] and again["shards"] == reference["shards"] and again["corpus_hash"] == reference["corpus_hash"]
    chunks = [itertools.islice(StoreSource(tmp_path / name).chunks(0), 6) for name in ("s", "ref")]  # endless epochs
    for a, b in zip(*chunks, strict=True):
        assert torch.equal(a[1], b[1])
