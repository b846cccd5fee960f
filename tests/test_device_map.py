"""Models placed by a device map (accelerate's big-model inference): every site read, every write, the
logit lens and predict give what the same model gives on one device.

On a CPU the placements that can be made are blocks on "cpu" and on "disk": a disk-offloaded module
keeps its weights on the meta device and accelerate's hook loads them for each forward, which is the
path a model larger than its GPUs takes for its CPU-offloaded blocks too. Placements over GPUs run
only where there are GPUs.
"""

from __future__ import annotations

import functools

import pytest
import torch
from accelerate.utils import compute_module_sizes
from conftest import FAMILIES, SMOLLM2_PROMPTS, tiny_hf

import mechscope as ms
from mechscope.models.fingerprint import model_fingerprint
from mechscope.models.hooks import add, replace

IDS = torch.randint(3, 100, (2, 8), generator=torch.Generator().manual_seed(1))
SHORT = IDS[1, :5]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Factory: `folder("llama")` is a saved copy (float32 safetensors) of that tiny family."""

    @functools.cache
    def save(family: str):
        path = tmp_path_factory.mktemp(family)
        tiny_hf(family, dtype=torch.float32).save_pretrained(path)
        return path

    return save


def split_map(model: ms.Model, on_cpu=(0,)) -> dict[str, str]:
    """Blocks `on_cpu` on the CPU; every other module (embedding, the other blocks, final norm, unembedding) on disk."""
    blocks = model.adapter.blocks
    base = blocks.rpartition(".")[0]
    device_map = {name: "disk" for name, _ in model.hf.named_children() if name != base}
    for name, _ in model.module(base).named_children():
        if f"{base}.{name}" != blocks:
            device_map[f"{base}.{name}"] = "disk"
    for layer in range(model.dims.n_layers):
        device_map[f"{blocks}.{layer}"] = "cpu" if layer in on_cpu else "disk"
    return device_map


def assert_same_run(plain: ms.Model, placed: ms.Model, write=None, **tol) -> None:
    """Every site and the logits of `placed` equal those of `plain` (exactly, unless a tolerance is given)."""
    tol = tol or dict(rtol=0, atol=0)
    sites = plain.site_names()
    a, b = plain.run(IDS, read=sites, write=write, logits=True), placed.run(IDS, read=sites, write=write, logits=True)
    torch.testing.assert_close(b.logits, a.logits.to(b.logits), **tol)
    for site in sites:
        torch.testing.assert_close(b.cache[site], a.cache[site].to(b.cache[site]), **tol, msg=site)


def edits(model: ms.Model) -> dict:
    """Writes in the offloaded blocks: the residual stream between the sub-blocks, the neurons, a pattern."""
    mid = "hook_resid_mid" if model.dims.has_resid_mid else "hook_resid_pre"
    return {
        f"blocks.1.{mid}": add(0.5),
        "blocks.2.mlp.hook_post": replace(0.25),
        "blocks.2.attn.hook_pattern": lambda p: p * 0.5,
    }


@pytest.mark.parametrize("family", FAMILIES)
def test_offloaded_blocks_read_and_write_as_on_one_device(family, folder):
    plain = ms.load(folder(family))
    placed = ms.load(folder(family), device_map=split_map(plain))
    offloaded = placed.block_module(1, placed.adapter.neurons).weight
    assert offloaded.device.type == "meta"  # accelerate loads it for each forward only
    assert_same_run(plain, placed)
    assert_same_run(plain, placed, write=edits(plain))
    written = plain.run(IDS, write=edits(plain)).logits
    assert not torch.allclose(written, plain.run(IDS).logits)  # the writes did change the output


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2"])
def test_lens_and_predict_as_on_one_device(family, folder):
    plain = ms.load(folder(family))
    placed = ms.load(folder(family), device_map=split_map(plain))
    mid = plain.dims.has_resid_mid
    a, b = ms.logit_lens(plain, IDS[0], [5, 7], mid=mid), ms.logit_lens(placed, IDS[0], [5, 7], mid=mid)
    for field in ("probs", "ranks", "top_ids", "top_probs"):
        torch.testing.assert_close(getattr(b, field), getattr(a, field), rtol=0, atol=0, msg=field)
    batch = [IDS[0], SHORT]  # two lengths: the short one's last logits go through the offloaded unembedding
    assert ms.predict(placed, batch, k=5, targets=[5, 7]) == ms.predict(plain, batch, k=5, targets=[5, 7])


def test_inputs_and_outputs_live_on_the_embedding_device(folder):
    plain = ms.load(folder("llama"))
    placed = ms.load(folder("llama"), device_map=split_map(plain))
    assert placed.module(placed.adapter.embed).weight.device.type == "meta"  # even the embedding is on disk
    assert placed.device == torch.device("cpu")  # where accelerate computes it
    out = placed.run(IDS, read=placed.site_names(), logits=True)
    assert {v.device for v in [out.logits, *out.cache.values()]} == {torch.device("cpu")}
    assert model_fingerprint(placed) == model_fingerprint(plain)  # an index built on one serves the other


def test_auto_map_within_max_memory_offloads_to_disk(folder, tmp_path):
    plain = ms.load(folder("llama"))
    budget = int(0.8 * compute_module_sizes(plain.hf)[""])  # too little for the whole model
    placed = ms.load(folder("llama"), device_map="auto", max_memory={"cpu": budget}, offload_folder=tmp_path)
    where = placed.hf.hf_device_map
    assert where["model.layers.0"] == "cpu" and "disk" in where.values(), where
    assert_same_run(plain, placed)
    assert_same_run(plain, placed, write=edits(plain))


def test_a_map_of_cpu_entries_is_the_model_on_the_cpu(folder):
    plain = ms.load(folder("gpt2"))
    placed = ms.load(folder("gpt2"), device_map={name: "cpu" for name in split_map(plain)})
    assert {p.device for p in placed.hf.parameters()} == {torch.device("cpu")}  # nothing offloaded
    assert_same_run(plain, placed, write=edits(plain))


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_bfloat16_with_a_device_map(family, folder):
    plain32 = ms.load(folder(family))
    plain16 = ms.load(folder(family), dtype="bfloat16")
    placed = ms.load(folder(family), dtype="bfloat16", device_map=split_map(plain32))
    assert placed.hf.dtype == torch.bfloat16
    assert_same_run(plain16, placed)  # the same bf16 model, offloaded or not
    a, b = ms.logit_lens(plain32, IDS[0], [5]), ms.logit_lens(placed, IDS[0], [5])
    torch.testing.assert_close(b.probs, a.probs, rtol=0, atol=5e-3)  # found: at most 1e-3
    site = "blocks.2.hook_resid_post"
    resid32, resid16 = plain32.run(IDS, read=site).cache[site], placed.run(IDS, read=site).cache[site]
    assert resid16.dtype == torch.bfloat16
    assert (
        float((resid16.float() - resid32).norm() / resid32.norm()) < 0.05
    )  # found: 0.018 (bfloat16 keeps 8 significant bits, 3 layers)


@pytest.mark.skipif(torch.cuda.device_count() < 1, reason="needs a GPU")
def test_blocks_over_gpu_and_offloaded_to_the_cpu(folder):
    """With a GPU, "cpu" entries are offloaded (meta) and compute on the GPU; over two GPUs the blocks split."""
    plain = ms.load(folder("llama"))
    gpus = torch.cuda.device_count()
    device_map = {name: 0 for name in split_map(plain)} | {"model.layers.1": "cpu", "model.layers.2": gpus - 1}
    placed = ms.load(folder("llama"), device_map=device_map)
    assert placed.device == torch.device("cuda:0")
    out = placed.run(IDS, read=placed.site_names(), logits=True)
    assert {v.device for v in [out.logits, *out.cache.values()]} == {torch.device("cuda:0")}
    tol = dict(rtol=1e-4, atol=1e-4)
    assert_same_run(plain, placed, **tol)
    assert_same_run(plain, placed, write=edits(plain), **tol)
    a, b = ms.logit_lens(plain, IDS[0], [5], mid=True), ms.logit_lens(placed, IDS[0], [5], mid=True)
    torch.testing.assert_close(b.probs, a.probs, **tol)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(device_map="fastest"), "unknown device_map 'fastest': give 'auto', 'balanced'"),
        (dict(device_map="cuda:3"), "device_map 'cuda:3' does not exist on this machine: valid devices here are cpu"),
        (dict(device_map={"": "cuda:3"}), r"device_map\[''\] 'cuda:3' does not exist on this machine: valid devices .*disk"),
        (dict(device_map={"": "gpu"}), r"device_map\[''\] 'gpu' is not a device: valid devices here are cpu"),
        (dict(device="cuda:3"), "device 'cuda:3' does not exist on this machine"),
        (dict(device="cpu", device_map="auto"), "give device or device_map, not both"),
        (dict(max_memory={"cpu": "1GB"}), "max_memory and offload_folder apply with a device_map"),
        (dict(device_map="auto", max_memory={7: "1GB"}), "max_memory key 7 does not exist on this machine"),
        (dict(device_map=["cpu"]), r"device_map \['cpu'\] is not a device map"),
    ],
)
def test_bad_placement_is_refused_in_one_line(kwargs, message, folder):
    if torch.cuda.device_count() > 3 and "cuda:3" in str(kwargs):
        pytest.skip("this machine has a cuda:3")
    with pytest.raises(ms.MechscopeError, match=message) as err:
        ms.load(folder("llama"), **kwargs)
    assert "\n" not in str(err.value)


def test_a_built_model_takes_no_device_map():
    with pytest.raises(ms.MechscopeError, match="place a built model with accelerate.dispatch_model"):
        ms.load(tiny_hf("llama"), device_map="auto")


@pytest.mark.slow
def test_smollm2_half_offloaded_to_disk(smollm2):
    from mechscope.models.load import converted_gguf, default_gguf

    placed = ms.load(converted_gguf(default_gguf()), device_map=split_map(smollm2, on_cpu=range(15)))
    prompt = SMOLLM2_PROMPTS[0]
    sites = [s for s in smollm2.site_names() if s.startswith(("blocks.20.", "ln_final"))]
    a, b = smollm2.run(prompt, read=sites, logits=True), placed.run(prompt, read=sites, logits=True)
    torch.testing.assert_close(b.logits, a.logits, rtol=0, atol=0)
    for site in sites:
        torch.testing.assert_close(b.cache[site], a.cache[site], rtol=0, atol=0, msg=site)
    la, lb = ms.logit_lens(smollm2, prompt, " questionable"), ms.logit_lens(placed, prompt, " questionable")
    torch.testing.assert_close(lb.probs, la.probs, rtol=0, atol=0)
    assert ms.predict(placed, prompt, k=5) == ms.predict(smollm2, prompt, k=5)


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2"])
def test_attribution_and_logit_effects_read_offloaded_weights(family, folder):
    """DLA, the three rankings and a neuron's output tokens read W_U, W_out and the norms' weights from the offload."""
    from mechscope.index.card import output_tokens

    plain = ms.load(folder(family))
    placed = ms.load(folder(family), device_map=split_map(plain))
    a, b = ms.direct_logit_attribution(plain, IDS[0], 5, vs=7), ms.direct_logit_attribution(placed, IDS[0], 5, vs=7)
    torch.testing.assert_close(b.neurons, a.neurons)
    torch.testing.assert_close(b.heads, a.heads)
    assert b.total == pytest.approx(a.total, abs=1e-5) and b.logit == pytest.approx(a.logit, abs=1e-5)
    assert ms.rank_units(placed, IDS[0], 5, top=3).rows == ms.rank_units(plain, IDS[0], 5, top=3).rows
    assert output_tokens(placed, 1, 3) == output_tokens(plain, 1, 3)
