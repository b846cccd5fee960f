"""Tiny GELU / SoLU / TopK transformers: the model against a hand computation of its block, its folder
through `mechscope.load` against plain HF, the trainer's exact resume, and one-line refusals.

The hand computations below use only the weights, read by their HF module names, and torch's
elementary functions (erf, exp, mean): they are the check on `tiny_model`, so they do not call it.
"""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
import transformers as tf
from conftest import invoke_cli

import mechscope
from mechscope.errors import MechscopeError
from mechscope.toys import tiny_train
from mechscope.toys.tiny_model import TinyConfig, TinyForCausalLM, init_weights, parameter_count
from mechscope.toys.tiny_tokenizer import SPECIAL, train_tokenizer
from mechscope.toys.tiny_train import TinyTrainConfig, train_tiny

ACTS = ("gelu", "solu", "topk")


def small(**overrides) -> TinyTrainConfig:
    """A run of 12 steps of 8 contexts of 32 tokens on a model of width 32 (a few seconds)."""
    kw = dict(d_model=32, n_heads=4, k=6, vocab=512, ctx_len=32, batch=8, tokens=8 * 32 * 12, eval_every=4,
              eval_contexts=8, checkpoint_every=3, warmup_steps=3, threads=1)  # fmt: skip
    return TinyTrainConfig(**{**kw, **overrides})


@pytest.fixture(scope="module")
def text_corpus(tmp_path_factory):
    """60 documents of CPython's pydoc topics as a .jsonl corpus (57 train, 3 held out)."""
    from pydoc_data.topics import topics

    path = tmp_path_factory.mktemp("corpus") / "topics.jsonl"
    path.write_text("".join(json.dumps({"text": topics[key]}) + "\n" for key in sorted(topics)[:60]))
    return str(path)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, text_corpus):
    """The folder of a finished small gelu run."""
    out = tmp_path_factory.mktemp("runs") / "gelu"
    train_tiny(small(corpus=text_corpus), out, show_progress=False)
    return out


def random_tiny(act: str, dtype=torch.float64, **overrides) -> TinyForCausalLM:
    config = TinyConfig(act=act, vocab_size=50, max_position_embeddings=16, hidden_size=16, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=24, k=5, **overrides)  # fmt: skip
    model = init_weights(TinyForCausalLM(config), seed=3).to(dtype).eval()
    with torch.no_grad():  # weights well away from the init's 0.02, so every branch matters
        gen = torch.Generator().manual_seed(4)
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen, dtype=dtype))
    return model


# -- the model ------------------------------------------------------------------------------------


def layer_norm(x, ln):
    return (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + ln.eps) * ln.weight + ln.bias


def neurons_by_hand(act: str, pre: torch.Tensor, mlp) -> torch.Tensor:
    gelu = lambda x: 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))  # noqa: E731
    if act == "gelu":
        return gelu(pre)
    if act == "solu":
        return layer_norm(pre * torch.exp(pre) / torch.exp(pre).sum(-1, keepdim=True), mlp.act.ln)
    kth = pre.sort(-1, descending=True).values[..., mlp.act.k - 1 : mlp.act.k]
    return torch.where(pre >= kth, gelu(pre), torch.zeros_like(pre))


@pytest.mark.parametrize("act", ACTS)
def test_first_block_equals_a_hand_computation(act):
    hf = random_tiny(act)
    model = mechscope.load(hf)
    ids = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(0))
    out = model.run(ids, read=model.site_names(), logits=True)
    t, block = hf.transformer, hf.transformer.h[0]
    x = t.wte.weight[ids] + t.wpe.weight[:7]
    h = layer_norm(x, block.ln_1)
    q, k, v = (h @ p.weight.T + p.bias for p in (block.attn.q_proj, block.attn.k_proj, block.attn.v_proj))
    q, k, v = (a.view(2, 7, 2, 8).transpose(1, 2) for a in (q, k, v))  # [batch, head, pos, d_head]
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(8) + torch.full((7, 7), -math.inf).triu(1)
    pattern = torch.exp(scores) / torch.exp(scores).sum(-1, keepdim=True)
    z = (pattern @ v).transpose(1, 2)  # [batch, pos, head, d_head]
    mid = x + z.flatten(-2) @ block.attn.o_proj.weight.T + block.attn.o_proj.bias
    pre = layer_norm(mid, block.ln_2) @ block.mlp.fc_in.weight.T + block.mlp.fc_in.bias
    post = neurons_by_hand(act, pre, block.mlp)
    resid_post = mid + post @ block.mlp.fc_out.weight.T + block.mlp.fc_out.bias
    for site, expected in (("attn.hook_pattern", pattern), ("attn.hook_z", z), ("hook_resid_mid", mid),
                           ("mlp.hook_post", post), ("hook_resid_post", resid_post)):  # fmt: skip
        tol = (
            1e-6 if site == "attn.hook_pattern" else 1e-10
        )  # probabilities are read as the eager kernels compute them, in float32
        torch.testing.assert_close(out.cache[f"blocks.0.{site}"], expected, rtol=tol, atol=tol, msg=site)
    torch.testing.assert_close(out.cache["hook_embed"] + out.cache["hook_pos_embed"], x)


def test_topk_keeps_exactly_k_neurons_per_token():
    model = mechscope.load(random_tiny("topk"))
    ids = torch.randint(0, 50, (3, 9), generator=torch.Generator().manual_seed(1))
    post = model.run(ids, read=["blocks.0.mlp.hook_post", "blocks.1.mlp.hook_post"]).cache
    for value in post.values():
        assert ((value != 0).sum(-1) == 5).all()


def test_parameter_counts():
    counts = {}
    for act in ACTS:
        config = TinyConfig(act=act)  # the training defaults: 2 layers, d_model 256, d_mlp 1024, 4,096 tokens, 128 positions
        counts[act] = sum(p.numel() for p in TinyForCausalLM(config).parameters())
        assert counts[act] == parameter_count(config)
    assert counts["gelu"] == counts["topk"] == 3_709_952
    assert counts["solu"] == counts["gelu"] + 2 * 2 * 1024  # SoLU's LayerNorm over d_mlp, in each of 2 layers


def test_same_seed_same_start_for_every_activation():
    states = [
        dict(init_weights(TinyForCausalLM(TinyConfig(act=a, hidden_size=16, vocab_size=50)), 7).named_parameters()) for a in ACTS
    ]
    shared = set(states[0]) & set(states[1]) & set(states[2])
    assert shared == set(states[0]) == set(states[2])  # SoLU only adds its LayerNorm
    for name in shared:
        assert torch.equal(states[0][name], states[1][name]) and torch.equal(states[0][name], states[2][name]), name
    other = dict(init_weights(TinyForCausalLM(TinyConfig(hidden_size=16, vocab_size=50)), 8).named_parameters())
    assert not torch.equal(other["transformer.wte.weight"], states[0]["transformer.wte.weight"])


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(act="topk", k=25), r"k=25 is out of range for d_mlp=24: valid values are 1\.\.24"),
        (dict(act="topk", k=0), r"k=0 is out of range for d_mlp=24: valid values are 1\.\.24"),
        (dict(hidden_size=512, intermediate_size=24), r"d_model=512 is out of range: valid values are 1\.\.256"),
        (dict(num_hidden_layers=3), "layers=3 is invalid: a tiny model has 1 or 2 layers"),
        (dict(act="relu"), "unknown MLP activation 'relu': valid activations are gelu, solu, topk"),
    ],
)
def test_bad_shapes_get_one_line(overrides, message):
    kw = dict(hidden_size=16, num_attention_heads=2, intermediate_size=24, vocab_size=50) | overrides
    with pytest.raises(MechscopeError, match=message) as err:
        TinyConfig(**kw)
    assert "\n" not in str(err.value)
    train_kw = {"act": "act", "k": "k", "num_hidden_layers": "layers", "hidden_size": "d_model"}
    with pytest.raises(MechscopeError, match=message):  # the training config says the same
        small(d_mlp=24, **{train_kw[k]: v for k, v in overrides.items() if k in train_kw})


# -- a trained folder ------------------------------------------------------------------------------


def test_tokenizer_round_trip(trained):
    tokenizer = tf.AutoTokenizer.from_pretrained(trained)
    assert tokenizer.bos_token == tokenizer.eos_token == SPECIAL and len(tokenizer) <= 512
    for text in ("def f(x):\n    return x  # ok", "naïve café, 東京 and emoji 🙂", "  leading spaces\ttab"):
        ids = tokenizer(text).input_ids
        assert ids[0] == tokenizer.bos_token_id and tokenizer.bos_token_id not in ids[1:]
        assert tokenizer.decode(ids, skip_special_tokens=True) == text
    texts = ["the same text gives the same merges " * 3, "and again"]
    assert train_tokenizer(texts, 300).get_vocab() == train_tokenizer(texts, 300).get_vocab()


def test_folder_holds_what_it_should(trained):
    names = {p.name for p in trained.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "metrics.jsonl", "curves.png",
            "train.json"} <= names  # fmt: skip
    assert not trained.with_name("gelu.training").exists()
    summary = json.loads((trained / "train.json").read_text())
    log = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 13)) and [r["step"] for r in log if "held_out_loss" in r] == [4, 8, 12]
    assert summary["held_out_loss"] == log[-1]["held_out_loss"] < math.log(summary["vocab"])
    assert summary["tokens"] == 12 * 8 * 32 and summary["settings"]["act"] == "gelu"


def test_load_reads_what_plain_hf_computes(trained):
    model = mechscope.load(trained)
    hf = tf.AutoModelForCausalLM.from_pretrained(trained, attn_implementation="eager").eval()
    ids = model.to_ids("def f(x):\n    return x + 1")
    out = model.run(ids, read=model.site_names(), logits=True)
    seen = {}

    def keep(name, inputs=False):
        return lambda m, args, output: seen.__setitem__(
            name, (args[0] if inputs else output[0] if isinstance(output, tuple) else output)
        )

    t = hf.transformer
    hooks = [t.wte.register_forward_hook(keep("hook_embed")), t.wpe.register_forward_hook(keep("hook_pos_embed")),
             t.ln_f.register_forward_hook(keep("ln_final.hook_normalized"))]  # fmt: skip
    for i, block in enumerate(t.h):
        for name, module, inputs in (("hook_resid_pre", block, True), ("hook_resid_post", block, False),
                                     ("hook_attn_out", block.attn, False), ("ln2.hook_normalized", block.ln_2, False),
                                     ("mlp.hook_post", block.mlp.fc_out, True), ("hook_mlp_out", block.mlp, False),
                                     ("attn.hook_z", block.attn.o_proj, True)):  # fmt: skip
            hooks.append(module.register_forward_hook(keep(f"blocks.{i}.{name}", inputs)))
    with torch.no_grad():
        plain = hf(ids, output_attentions=True)
    for h in hooks:
        h.remove()
    with torch.no_grad():  # HF's own load, with its own (SDPA) attention, as mechscope runs it
        assert torch.equal(out.logits, tf.AutoModelForCausalLM.from_pretrained(trained)(ids).logits)
    torch.testing.assert_close(out.logits, plain.logits, rtol=1e-5, atol=1e-5)  # and eager attention
    for i in range(2):
        seen[f"blocks.{i}.hook_resid_mid"] = seen[f"blocks.{i}.hook_resid_pre"] + seen[f"blocks.{i}.hook_attn_out"]
        seen[f"blocks.{i}.attn.hook_z"] = seen[f"blocks.{i}.attn.hook_z"].unflatten(-1, (4, 8))
        seen[f"blocks.{i}.attn.hook_pattern"] = plain.attentions[i]
    assert set(seen) == set(model.site_names())
    for name, value in seen.items():
        torch.testing.assert_close(out.cache[name], value.expand_as(out.cache[name]), rtol=1e-6, atol=1e-6, msg=name)


def test_lens_and_attribution(trained):
    model = mechscope.load(trained)
    lens = mechscope.logit_lens(model, "The value of x is", [" the"])
    assert lens.probs.shape[0] == 3  # after the embeddings and each of the 2 blocks
    a = mechscope.direct_logit_attribution(model, "The value of x is", " the", vs=" a")
    assert a.neurons.shape == (2, 128) and a.heads.shape == (2, 4)
    assert a.total == pytest.approx(a.logit, rel=1e-4, abs=1e-5)


@pytest.mark.parametrize("missing", ["config.json", "model.safetensors", "tokenizer.json"])
def test_a_folder_missing_a_file_is_refused_in_one_line(trained, tmp_path, missing):
    folder = tmp_path / "copy"
    shutil.copytree(trained, folder)
    (folder / missing).unlink()
    with pytest.raises(MechscopeError, match=f"folder '{folder}' (is not an HF model folder: it )?has no {missing}") as err:
        mechscope.load(folder)
    assert "\n" not in str(err.value)


# -- training -------------------------------------------------------------------------------------


class Crash(Exception):
    pass


def test_a_killed_run_resumes_to_the_same_weights(tmp_path, text_corpus, trained, monkeypatch):
    cfg = small(corpus=text_corpus, act="solu", tokenizer=str(trained))
    whole = train_tiny(cfg, tmp_path / "whole", show_progress=False)
    real = tiny_train.batches

    def crashing(*args, **kwargs):
        for i, item in enumerate(real(*args, **kwargs)):
            if i == 7:  # after the checkpoint of step 6
                raise Crash
            yield item

    monkeypatch.setattr(tiny_train, "batches", crashing)
    with pytest.raises(Crash):
        train_tiny(cfg, tmp_path / "resumed", show_progress=False)
    assert (tmp_path / "resumed.training" / "checkpoint").is_dir() and not (tmp_path / "resumed").exists()
    monkeypatch.setattr(tiny_train, "batches", real)
    with pytest.raises(MechscopeError, match=r"holds a run with other settings: lr 0\.002 \(now 0\.001\)") as err:
        train_tiny(
            small(corpus=text_corpus, act="solu", tokenizer=str(trained), lr=1e-3), tmp_path / "resumed", show_progress=False
        )
    assert "\n" not in str(err.value)
    resumed = train_tiny(cfg, tmp_path / "resumed", show_progress=False)
    assert resumed.held_out_loss == whole.held_out_loss
    a = mechscope.load(tmp_path / "whole").hf.state_dict()
    b = mechscope.load(tmp_path / "resumed").hf.state_dict()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert (tmp_path / "whole" / "metrics.jsonl").read_text() == (tmp_path / "resumed" / "metrics.jsonl").read_text()
    assert train_tiny(cfg, tmp_path / "whole", show_progress=False) == whole._replace(folder=tmp_path / "whole")  # done
    with pytest.raises(MechscopeError, match=r"holds a finished run with other settings: act 'solu' \(now 'gelu'\)"):
        train_tiny(small(corpus=text_corpus, tokenizer=str(trained)), tmp_path / "whole", show_progress=False)


def test_every_activation_reads_the_same_tokens(text_corpus, trained):
    from mechscope.data import corpus, held_out
    from mechscope.toys.tiny_tokenizer import load_tokenizer

    tokenizer, train_text = load_tokenizer(trained), held_out(corpus(text_corpus))[0]
    gelu = tiny_train.training_contexts(small(corpus=text_corpus), tokenizer, train_text)
    topk = tiny_train.training_contexts(small(corpus=text_corpus, act="topk", lr=0.01), tokenizer, train_text)
    assert gelu.shape == (12 * 8, 32) and torch.equal(gelu, topk)
    other = tiny_train.training_contexts(small(corpus=text_corpus, seed=1), tokenizer, train_text)
    assert not torch.equal(gelu, other)


def test_cli_trains_and_refuses_in_one_line(tmp_path, monkeypatch, capsys, text_corpus, trained):
    from mechscope import cli_tiny

    out = tmp_path / "cli-topk"
    args = ["--act", "topk", "--k", "4", "--layers", "1", "--d-model", "16", "--vocab", "512", "--ctx-len", "16", "--batch", "4",
            "--tokens", "256", "--corpus", text_corpus, "--tokenizer", trained, "--threads", "1"]  # fmt: skip
    code, stdout, stderr = invoke_cli(monkeypatch, capsys, "train-tiny", *args, "--out", out, consoles=[cli_tiny])
    assert code == 0, stderr
    assert "tiny model" in stdout and "held-out loss" in stdout and "parameters" in stdout
    assert mechscope.load(out).dims.n_layers == 1
    code, _, stderr = invoke_cli(monkeypatch, capsys, "train-tiny", "--act", "topk", "--k", "2000", "--out", tmp_path / "x")
    assert code == 2 and stderr.count("\n") == 1
    assert "--k 2000 is out of range for --d-mlp 1024: valid values are 1..1024" in stderr
    assert not (tmp_path / "x").exists()


def test_an_index_and_a_dictionary_build_on_it(trained, text_corpus, tmp_path):
    from mechscope.dictionaries import TrainConfig, train_dictionary
    from mechscope.index import Index, IndexSettings, build_index

    model = mechscope.load(trained)
    settings = IndexSettings(corpus=text_corpus, tokens=1024, ctx_len=32, k=4)
    build_index(model, tmp_path / "neurons.duckdb", settings=settings, progress=False)
    with Index(tmp_path / "neurons.duckdb", model=model) as index:
        assert len(index.top("1:5", n=4)) == 4
    cfg = TrainConfig(sites=["blocks.1.mlp.hook_post"], k=8, expansion=2, tokens=2048, batch_size=256, ctx_len=32,
                      corpus=text_corpus, eval_tokens=256, chunk_contexts=32)  # fmt: skip
    sae = train_dictionary(model, cfg, tmp_path / "sae", show_progress=False)
    assert sae.d_sae == 256
