"""The dictionary trainer: it learns, resumes to the very same weights after a crash, and N processes
under torchrun train what one process trains with the same global batch.

Runs on a tiny random-weight Llama with a real tokenizer (`conftest.tiny_lm`) over the built-in corpus;
the SmolLM2 quality figures are in bench/RESULTS.md.
"""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_lm

import mechscope.dictionaries.train as train_module
from mechscope.dictionaries import TrainConfig, load_dictionary, train_dictionary
from mechscope.errors import MechscopeError

SITE = "blocks.1.hook_resid_post"


def config(**overrides) -> TrainConfig:
    base = dict(sites=[SITE], expansion=4, k=4, tokens=64 * 40, batch_size=64, chunk_contexts=16, ctx_len=32,
                eval_every=10, eval_tokens=256, corpus="builtin", dead_tokens=640, warmup_steps=5)  # fmt: skip
    return TrainConfig(**{**base, **overrides})


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("activation", ["topk", "batchtopk", "relu", "jumprelu"])
def test_training_lowers_the_loss_and_saves_a_dictionary(tmp_path, activation):
    # The default lr grows as 1/sqrt(d_sae) below 2^14 latents: 8x at these 256, too much for the penalty-trained ones.
    extra = {"sparsity": 0.05, "lr": 2e-3} if activation in ("relu", "jumprelu") else {}
    d = train_dictionary(tiny_lm(), config(activation=activation, **extra), tmp_path, show_progress=False)
    log = metrics(tmp_path)
    assert len(log) == 40 and log[-1]["tokens"] == 40 * 64
    assert log[-1]["eval_fvu"] < 0.9 * log[0]["fvu"]  # it learned
    back = load_dictionary(tmp_path / "dictionary", model=tiny_lm())
    x = tiny_lm().run("The reliability of Wikipedia", read=[SITE]).cache[SITE][0, 4:]
    torch.testing.assert_close(back.encode_dense(x), d.encode_dense(x), rtol=1e-4, atol=1e-4)
    assert not (tmp_path / "checkpoint").exists()


def test_a_finished_run_is_not_trained_again(tmp_path):
    d = train_dictionary(tiny_lm(), config(tokens=64 * 12), tmp_path, show_progress=False)
    log = (tmp_path / "metrics.jsonl").read_text()
    again = train_dictionary(tiny_lm(), config(tokens=64 * 12, checkpoint_seconds=5.0), tmp_path, show_progress=False)
    assert (tmp_path / "metrics.jsonl").read_text() == log  # the log is kept, nothing retrained
    x = tiny_lm().run("The reliability of Wikipedia", read=[SITE]).cache[SITE][0, 4:]
    torch.testing.assert_close(again.encode_dense(x), d.encode_dense(x), rtol=1e-4, atol=1e-4)
    with pytest.raises(MechscopeError, match="holds a finished run with other settings"):
        train_dictionary(tiny_lm(), config(tokens=64 * 13), tmp_path, show_progress=False)


def test_matryoshka_and_transcoder(tmp_path):
    train_dictionary(tiny_lm(), config(matryoshka=[32, 128]), tmp_path / "m", show_progress=False)
    transcoder = config(sites=["blocks.1.hook_resid_mid"], write_sites=["blocks.1.hook_mlp_out"], skip_connection=True)
    d = train_dictionary(tiny_lm(), transcoder, tmp_path / "t", show_progress=False)
    assert d.cfg.kind == "skip_transcoder" and metrics(tmp_path / "t")[-1]["eval_fvu"] < 1


class Crash(Exception):
    pass


def test_a_crashed_run_resumes_to_the_same_weights(tmp_path, monkeypatch):
    cfg = config(checkpoint_seconds=0.0)  # a checkpoint after every step
    whole = train_dictionary(tiny_lm(), cfg, tmp_path / "whole", show_progress=False)
    real = train_module.batches

    def crashing(*args, **kwargs):
        for i, item in enumerate(real(*args, **kwargs)):
            if i == 23:
                raise Crash
            yield item

    monkeypatch.setattr(train_module, "batches", crashing)
    with pytest.raises(Crash):
        train_dictionary(tiny_lm(), cfg, tmp_path / "resumed", show_progress=False)
    assert (tmp_path / "resumed" / "checkpoint").exists()
    monkeypatch.setattr(train_module, "batches", real)
    other = dataclasses.replace(cfg, k=cfg.k // 2)
    with pytest.raises(MechscopeError, match=r"checkpoint in .* is of a run with other settings: k \d+ \(now \d+\)"):
        train_dictionary(tiny_lm(), other, tmp_path / "resumed", show_progress=False)  # never resumed as the old k
    resumed = train_dictionary(tiny_lm(), cfg, tmp_path / "resumed", show_progress=False)
    for (name, a), (_, b) in zip(whole.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    untimed = lambda log: [{k: v for k, v in r.items() if k != "seconds"} for r in log]  # noqa: E731
    assert untimed(metrics(tmp_path / "whole")) == untimed(metrics(tmp_path / "resumed"))


def test_bad_settings_get_one_line(tmp_path):
    with pytest.raises(MechscopeError, match="unknown activation 'gelu'"):
        config(activation="gelu")
    with pytest.raises(MechscopeError, match="batch_size=0 is invalid"):
        config(batch_size=0)
    with pytest.raises(MechscopeError, match="unknown site"):
        train_dictionary(tiny_lm(), config(sites=["blocks.1.hook_nothing"]), tmp_path, show_progress=False)
    with pytest.raises(MechscopeError, match="layer 9 out of range"):
        train_dictionary(tiny_lm(), config(sites=["blocks.9.hook_resid_post"]), tmp_path, show_progress=False)
    with pytest.raises(MechscopeError, match="k=400 is invalid for 128 latents"):
        train_dictionary(tiny_lm(), config(k=400), tmp_path, show_progress=False)
    kinds = [
        (dict(kind="clt", layers=[1, 2, 3]), "layer 3 out of range in site 'blocks.3.hook_resid_mid': valid layers are 0..2"),
        (dict(sites=[SITE, "blocks.0.mlp.hook_post"]), "have different widths [32, 48]: one dictionary reads sites of one width"),
        (dict(kind="clt", layers=[0, 1], k=200), "k=200 is invalid for 128 latents per layer"),
        (dict(kind="clt", layers=[0, 1], d_sae=129), "d_sae=129 does not split into 2 equal blocks"),
        (dict(kind="clt", layers=[0, 1], activation="batchtopk"), "cannot have batchtopk"),
        (dict(jumprelu_penalty="tanh", sites=[SITE]), "jumprelu_penalty='tanh' applies to jumprelu only, not topk"),
    ]
    kinds += [
        (dict(kind="crosscoder", layers=[0, 1], skip_connection=True), "a skip connection is for a transcoder"),
        (dict(sites=[SITE], skip_connection=True), "an SAE or crosscoder with one would learn to copy its input"),
        (dict(layers=[1]), "layers name the sites of a kind: give kind sae, transcoder, crosscoder or clt too"),
        (dict(kind="sae"), "kind 'sae' needs the layers it covers"),
        (dict(kind="foo"), "unknown dictionary kind 'foo': valid kinds are sae, transcoder, crosscoder, clt"),
    ]
    for overrides, message in kinds:
        overrides.setdefault("sites", None)
        with pytest.raises(MechscopeError, match=re.escape(message)) as err:
            train_dictionary(tiny_lm(), config(**overrides), tmp_path, show_progress=False)
        assert "\n" not in str(err.value)


DDP_SCRIPT = """
import sys, torch
sys.path.insert(0, {tests!r})
from conftest import tiny_lm
from test_train_dict import config
from mechscope.dictionaries import train_dictionary
torch.set_num_threads(1)
d = train_dictionary(tiny_lm(), config(tokens=64 * 12), {out!r}, show_progress=False)
"""


def test_two_processes_train_what_one_trains(tmp_path):
    script = tmp_path / "two.py"
    script.write_text(DDP_SCRIPT.format(tests=str(Path(__file__).parent), out=str(tmp_path / "two")))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master-port", "29513", str(script)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    train_dictionary(tiny_lm(), config(tokens=64 * 12), tmp_path / "one", show_progress=False)  # one process, here
    one, two = load_dictionary(tmp_path / "one" / "dictionary"), load_dictionary(tmp_path / "two" / "dictionary")
    for (name, a), (_, b) in zip(one.state_dict().items(), two.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)  # gradients summed in another order


def test_training_on_tensors_alone(tmp_path):
    """No model: activations from memory, evaluated on a held-out tensor."""
    from mechscope.activations import TensorSource

    gen = torch.Generator().manual_seed(0)
    basis = torch.randn(64, 32, generator=gen)
    codes = torch.rand(5000, 64, generator=gen) * (torch.rand(5000, 64, generator=gen) < 0.05)
    acts = (codes @ basis)[:, None]  # sparse combinations of 64 directions: an SAE can find them
    cfg = config(tokens=64 * 60, eval_tokens=500)
    train, held = TensorSource(acts[:4500], [SITE], 1024), TensorSource(acts[4500:], [SITE])
    d = train_dictionary(None, cfg, tmp_path, show_progress=False, source=train, eval_source=held)
    log = metrics(tmp_path)
    assert d.cfg.model_fingerprint == "" and log[-1]["eval_fvu"] < 0.8 * log[0]["fvu"]
    assert all(r["seconds"] >= 0 for r in log)


def test_jumprelu_starts_at_about_k_latents_per_token(tmp_path):
    """JumpReLU's thresholds start where each latent fires on a share k/F of a sample, so the first steps
    are as sparse as TopK's (the paper's θ = 0.001 fires about half the latents at first)."""
    cfg = config(activation="jumprelu", k=6, tokens=64 * 2, sparsity=0.05)
    train_dictionary(tiny_lm(), cfg, tmp_path, show_progress=False)
    first = metrics(tmp_path)[0]
    assert 3 <= first["l0"] <= 12, first


def test_kinds_name_their_sites():
    from mechscope.dictionaries.train import kind_sites

    assert kind_sites("sae", [15]) == (["blocks.15.hook_resid_post"], ["blocks.15.hook_resid_post"])
    assert kind_sites("transcoder", [15]) == (["blocks.15.ln2.hook_normalized"], ["blocks.15.hook_mlp_out"])
    assert kind_sites("transcoder", [15], "resid_mid") == (["blocks.15.hook_resid_mid"], ["blocks.15.hook_mlp_out"])
    read, write = kind_sites("crosscoder", [13, 14, 15])
    assert read == write == [f"blocks.{n}.hook_resid_post" for n in (13, 14, 15)]
    read, write = kind_sites("clt", [3, 4])
    assert (read, write) == (
        ["blocks.3.hook_resid_mid", "blocks.4.hook_resid_mid"],
        ["blocks.3.hook_mlp_out", "blocks.4.hook_mlp_out"],
    )
    bad = [
        (("tc", [1, 2]), "unknown dictionary kind 'tc': valid kinds are sae, transcoder, crosscoder, clt"),
        (("clt", [1, 3]), "two or more consecutive layers, ascending"),
        (("clt", [2, 1]), "two or more consecutive layers, ascending"),
        (("clt", [1]), "two or more consecutive layers"),
        (("crosscoder", [3, 3, 4]), "each once, in ascending order"),
        (("crosscoder", [5, 4]), "each once, in ascending order"),
        (("crosscoder", [5]), "two or more layers"),
        (("sae", [1, 2]), "kind sae takes one layer"),
        (("transcoder", [-1]), "needs layer numbers"),
        (("transcoder", [1], "post"), "transcoder_input='post' is invalid: give normed, resid_mid"),
    ]
    for args, message in bad:
        with pytest.raises(MechscopeError, match=re.escape(message)):
            kind_sites(*args)
    with pytest.raises(MechscopeError, match="not both"):
        TrainConfig(kind="sae", layers=[1], sites=["blocks.0.hook_resid_post"])


@pytest.mark.parametrize(("kind", "layers"), [("transcoder", [1]), ("crosscoder", [0, 1]), ("clt", [0, 1, 2])])
def test_kinds_train_from_their_layers(tmp_path, kind, layers):
    cfg = config(tokens=64 * 10, eval_every=5, kind=kind, layers=layers, sites=None)
    d = train_dictionary(tiny_lm(), cfg, tmp_path, show_progress=False)
    read, write = train_module.kind_sites(kind, layers)
    assert (d.cfg.read_sites, d.cfg.write_sites, d.cfg.kind) == (read, write, kind)
    log = metrics(tmp_path)
    assert log[-1]["eval_fvu"] < 1 and min(m["fvu"] for m in log) < log[0]["fvu"]  # a transcoder starts fitted to its sample
    again = train_dictionary(tiny_lm(), cfg, tmp_path, show_progress=False)  # the finished run, not trained again
    assert again.cfg.read_sites == read


def test_a_crosscoders_decoder_profile_shows_where_its_features_write(tmp_path):
    """The profile is each latent's decoder norm per written site, raw units; `sites_carrying` counts the fewest
    sites holding 80 % of its squared norm; eval-dict's figure and plot and the feature page show them."""
    from mechscope.dictionaries.evaluate import evaluate_dictionary, sites_carrying
    from mechscope.index.feature_card import feature_card
    from mechscope.viz.dict_plots import decoder_profile_png

    profile = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 0.1], [1.0, 1.0, 1.0], [0.2, 0.0, 3.0]])
    assert sites_carrying(profile).tolist() == [1, 2, 3, 1]
    d = train_dictionary(
        tiny_lm(), config(tokens=64 * 4, kind="crosscoder", layers=[0, 1], sites=None), tmp_path, show_progress=False
    )
    folded = d.folded()
    raw = folded.W_dec.detach().view(d.d_sae, 2, -1).norm(dim=-1)
    torch.testing.assert_close(d.decoder_profile(), raw)  # the same in training units and once folded
    torch.testing.assert_close(folded.decoder_profile(), raw)
    result = evaluate_dictionary(tiny_lm(), d, "builtin", tokens=64, ctx_len=32)
    assert sum(result.sites_carrying) == sum(x > 0 for x in result.density) and len(result.sites_carrying) == 2
    decoder_profile_png(d.decoder_profile(), d.cfg.write_sites, tmp_path / "profile.png")
    assert (tmp_path / "profile.png").stat().st_size > 10_000
    card = feature_card(tiny_lm(), d, 3)
    assert [site for site, _ in card.profile] == d.cfg.write_sites and card.profile[0][1] == pytest.approx(float(raw[3, 0]))


def test_k_above_the_latents_is_refused_before_any_forward_pass(tmp_path, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("the model ran before the settings were checked")

    monkeypatch.setattr(train_module.ModelSource, "chunks", never)
    monkeypatch.setattr(train_module.ModelSource, "contexts", never)
    with pytest.raises(MechscopeError, match=re.escape("k=300 is invalid for 128 latents: k must be 1..128")):
        train_dictionary(tiny_lm(), config(k=300), tmp_path, show_progress=False)


def test_a_short_run_from_the_model_reads_no_more_contexts_than_it_needs(tmp_path):
    """A chunk holds at most the contexts the run reads (here 3 of 28 scored tokens for 64 tokens), not chunk_contexts."""
    trainer = train_module.Trainer(tiny_lm(), config(tokens=64, chunk_contexts=1024), tmp_path)
    assert trainer.source.spec.chunk_contexts == 3


@pytest.mark.parametrize("activation", ["topk", "jumprelu"])
def test_a_clt_trains_and_its_replacement_model_is_spliced_layer_by_layer(tmp_path, activation):
    """A CLT over every layer of the tiny model: its decoder never writes a layer before its own, and the
    replacement model's CE equals a hand-run forward in which each MLP's output is computed from that
    forward's own residual stream (not the clean one's)."""
    from mechscope.data import corpus, held_out, pack
    from mechscope.dictionaries.evaluate import evaluate_dictionary

    penalty = "tanh" if activation == "jumprelu" else "l0"
    cfg = config(tokens=64 * 8, kind="clt", layers=[0, 1, 2], sites=None, activation=activation, k=2, jumprelu_penalty=penalty)
    d = train_dictionary(tiny_lm(), cfg, tmp_path, show_progress=False)
    assert d.cfg.kind == "clt" and d.d_sae == 3 * 4 * 32
    profile = d.decoder_profile()
    block = d.d_sae // 3
    assert bool((profile[block : 2 * block, 0] == 0).all()) and bool((profile[2 * block :, :2] == 0).all())
    assert float(profile[:block, 2].sum()) > 0  # layer 0's features do write layer 2
    model = tiny_lm()
    result = evaluate_dictionary(model, d, "builtin", tokens=60, ctx_len=32, batch_contexts=2)
    assert result.sites_carrying is not None and sum(result.sites_carrying) == sum(x > 0 for x in result.density)

    skip = result.skip
    ids = next(iter(pack(held_out(corpus("builtin"))[1], model.tokenizer, 32, seed=0, batch_size=2, max_contexts=2))).tokens
    folded = d.folded()
    features = torch.zeros(2, 32 - skip, d.d_sae)
    writes = {}
    for layer in range(3):

        def read(x, layer=layer):  # this forward's resid_mid -> the features of this layer's block
            z = (
                x[:, skip:] @ folded.W_enc[:, layer * block : (layer + 1) * block]
                + folded.b_enc[layer * block : (layer + 1) * block]
            )
            if activation == "jumprelu":
                f = z * (z > folded.activation.threshold[layer * block : (layer + 1) * block])
            else:
                f = torch.where(z >= z.topk(2, dim=-1).values[..., -1:], z.relu(), torch.zeros_like(z))
            features[..., layer * block : (layer + 1) * block] = f
            return x

        def write(x, layer=layer):
            out = x.clone()
            W = folded.W_dec.view(d.d_sae, 3, -1)[:, layer]
            out[:, skip:] = features[..., : (layer + 1) * block] @ W[: (layer + 1) * block] + folded.b_dec.view(3, -1)[layer]
            return out

        writes[f"blocks.{layer}.hook_resid_mid"] = read
        writes[f"blocks.{layer}.hook_mlp_out"] = write
    logits = model.run(ids, write=writes, logits=True).logits[:, skip:-1]
    ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), ids[:, skip + 1 :].flatten())
    by_eval = evaluate_dictionary(model, d, "builtin", tokens=2 * (32 - skip), ctx_len=32, batch_contexts=2)
    assert by_eval.ce_spliced == pytest.approx(float(ce), rel=1e-4)
