"""Interventions on neurons, heads and directions, checked against hooks written by hand on plain HF models."""

import pytest
import torch
from conftest import tiny_case

import mechscope as ms
from mechscope.attribution.effects import generate, intervene
from mechscope.attribution.interventions import Intervention, from_options, resolve, unit_means, writes
from mechscope.attribution.units import Unit, parse_assignment, parse_unit, parse_units

PROMPT = "The reliability of Wikipedia is very"

# Test-side module paths, written independently of mechscope's adapters.
NEURONS_IN = {"llama": lambda hf, L: hf.model.layers[L].mlp.down_proj, "gpt2": lambda hf, L: hf.transformer.h[L].mlp.c_proj}
HEADS_IN = {"llama": lambda hf, L: hf.model.layers[L].self_attn.o_proj, "gpt2": lambda hf, L: hf.transformer.h[L].attn.c_proj}
BLOCK = {"llama": lambda hf, L: hf.model.layers[L], "gpt2": lambda hf, L: hf.transformer.h[L]}


def on_input(module, fn):
    """A plain forward pre-hook replacing a module's first input by fn(input)."""
    return module.register_forward_pre_hook(lambda m, args: (fn(args[0].clone()), *args[1:]))


def on_output(module, fn):
    def hook(m, args, out):
        return (fn(out[0]), *out[1:]) if isinstance(out, tuple) else fn(out)

    return module.register_forward_hook(hook)


def manual_logits(hf, ids, hooks):
    """Logits of a plain HF forward with hand-written hooks [(register, module, fn)] installed."""
    handles = [register(module, fn) for register, module, fn in hooks]
    try:
        with torch.inference_mode():
            return hf(ids).logits
    finally:
        for h in handles:
            h.remove()


def run(model, ids, interventions, **kw):
    with torch.inference_mode():
        return model.run(ids, write=writes(model, interventions, ids), logits=True, **kw)


# -- units ----------------------------------------------------------------------------------------


def test_units_parse_and_print(smollm2):
    assert parse_unit("12:345", smollm2) == Unit("neuron", 12, 345)
    assert parse_unit(" 5.3 ", smollm2.dims) == Unit("head", 5, 3)
    assert str(Unit("neuron", 12, 345)) == "12:345" and str(Unit("head", 5, 3)) == "5.3"
    assert parse_unit("29:1535", smollm2).site == ms.Site("mlp.hook_post", 29)
    assert parse_unit("0.8", smollm2).site.name == "blocks.0.attn.hook_z"
    assert parse_units("12:345,5.3", smollm2) == [Unit("neuron", 12, 345), Unit("head", 5, 3)]
    assert parse_assignment("12:345=3.5", smollm2) == (Unit("neuron", 12, 345), 3.5)
    assert parse_assignment("5.3=-2e-1", smollm2) == (Unit("head", 5, 3), -0.2)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda m: parse_unit("12-345", m), r"bad unit '12-345': write a neuron as LAYER:NEURON \(e.g. 12:345\)"),
        (lambda m: parse_unit("", m), "bad unit ''"),
        (lambda m: parse_unit("a:b", m), "bad unit 'a:b'"),
        (lambda m: parse_unit("30:1", m), r"layer 30 out of range in unit '30:1': valid layers are 0..29"),
        (lambda m: parse_unit("30.1", m), r"layer 30 out of range in unit '30.1': valid layers are 0..29"),
        (lambda m: parse_unit("12:1536", m), r"neuron 1536 out of range in unit '12:1536': valid neurons are 0..1535"),
        (lambda m: parse_unit("5.9", m), r"head 9 out of range in unit '5.9': valid heads are 0..8"),
        (lambda m: parse_unit(Unit("head", 1, 9), m), "head 9 out of range"),
        (lambda m: parse_assignment("12:345", m), "bad assignment '12:345': write UNIT=NUMBER"),
        (lambda m: parse_assignment("12:345=big", m), r"bad number 'big' in '12:345=big'"),
        (lambda m: parse_assignment("12:345=nan", m), "give a finite number"),
        (lambda m: parse_assignment("5.9=1", m), "head 9 out of range"),
        (lambda m: intervene(m, PROMPT, [Intervention.zero("12:345", positions=[6])]), "position 6 out of range"),
        (lambda m: intervene(m, PROMPT, [Intervention.set(["1:2", "1:3"], [1.0, 2.0, 3.0])]), "3 values for 2 units"),
        (lambda m: resolve(m, [Intervention.add_direction("blocks.3.hook_resid_post", torch.ones(5))]), "give 576 numbers"),
        (lambda m: resolve(m, [Intervention.add_direction("blocks.30.hook_resid_post", torch.ones(576))]), "layer 30"),
        (lambda m: resolve(m, [Intervention.set_projection("hook_embed", torch.zeros(576))]), "zero direction"),
        (lambda m: resolve(m, [Intervention.add_direction("blocks.1.attn.hook_pattern", torch.ones(9))]), "attn.hook_pattern"),
        (lambda m: from_options(m), "no intervention given"),
    ],
)
def test_bad_input_gets_one_line(smollm2, call, message):
    with pytest.raises(ms.MechscopeError, match=message) as err:
        call(smollm2)
    assert "\n" not in str(err.value)


# -- SmolLM2 --------------------------------------------------------------------------------------


def test_smollm2_zero_neuron_and_head_match_manual_hooks(smollm2):
    model, (L, N), (LH, H) = smollm2, (12, 345), (5, 3)
    ids = model.to_ids(PROMPT)
    d_head = model.dims.d_head

    def zero_neuron(x):
        x[..., N] = 0
        return x

    def zero_head(x):
        x[..., H * d_head : (H + 1) * d_head] = 0
        return x

    hf = model.hf
    expected = manual_logits(
        hf,
        ids,
        [(on_input, hf.model.layers[L].mlp.down_proj, zero_neuron), (on_input, hf.model.layers[LH].self_attn.o_proj, zero_head)],
    )[0, -1].log_softmax(-1)
    r = intervene(model, PROMPT, [Intervention.zero("12:345"), Intervention.zero("5.3")], k=5, targets=[" questionable"])
    assert r.interventions == ["zero-ablate 12:345", "zero-ablate 5.3"]
    assert [t.id for t in r.after.top] == expected.topk(5).indices.tolist()
    assert [t.logprob for t in r.after.top] == pytest.approx(expected.topk(5).values.tolist(), abs=1e-5)
    plain = ms.predict(model, PROMPT, k=5, targets=[" questionable"])
    assert [t.id for t in r.before.top] == [t.id for t in plain.top]
    assert [t.prob for t in r.before.top] == pytest.approx([t.prob for t in plain.top], abs=1e-6)
    q = r.targets[0]
    assert q.token == " questionable" and q.prob_before == pytest.approx(plain.targets[0].prob, abs=1e-6)
    assert q.logprob_after == pytest.approx(float(expected[q.id]), abs=1e-5)
    assert q.delta_prob == pytest.approx(q.prob_after - q.prob_before) and r.after.targets[0].prob == pytest.approx(q.prob_after)
    ids_in_deltas = [d.id for d in r.deltas]
    assert {t.id for t in r.before.top} | {t.id for t in r.after.top} == set(ids_in_deltas)
    assert r.kl >= 0


def test_smollm2_generate(smollm2):
    noop = generate(smollm2, PROMPT, [Intervention.scale(["12:345", "5.3"], 1.0)], max_new_tokens=5)
    assert noop.after == noop.before and noop.after_ids == noop.before_ids and len(noop.before_ids) == 5
    with torch.inference_mode():
        ids = smollm2.to_ids(PROMPT)
        plain = smollm2.hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False)
    assert noop.before_ids == plain[0, ids.shape[1] :].tolist()
    assert noop.before == smollm2.tokenizer.decode(noop.before_ids)
    # Steer the residual stream hard towards the embedding of " Paris": the continuation changes.
    paris = smollm2.hf.model.embed_tokens.weight[smollm2.token_ids(" Paris")[0]]
    steer = Intervention.add_direction("blocks.8.hook_resid_post", paris / paris.norm(), alpha=40.0)
    steered = generate(smollm2, PROMPT, [steer], max_new_tokens=5)
    assert steered.before == noop.before and steered.after_ids != steered.before_ids


# -- tiny models: exact identities in float64 ----------------------------------------------------


@pytest.fixture(params=["llama", "gpt2"])
def tiny(request):
    case = tiny_case(request.param)
    return request.param, case.model, case.reference, case.ids[:1]


def test_zero_neuron_matches_manual_pre_hook(tiny):
    family, model, ref, ids = tiny

    def zero(x):
        x[..., 7] = 0
        x[..., 40] = 0
        return x

    expected = manual_logits(ref, ids, [(on_input, NEURONS_IN[family](ref, 1), zero)])
    got = run(model, ids, [Intervention.zero(["1:7", "1:40"])]).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    assert (got - model.run(ids).logits).abs().max() > 1e-6  # the intervention did something


def test_zero_head_matches_manual_slice(tiny):
    family, model, ref, ids = tiny
    d_head = model.dims.d_head

    def zero(x):
        x[..., 2 * d_head : 3 * d_head] = 0
        return x

    expected = manual_logits(ref, ids, [(on_input, HEADS_IN[family](ref, 0), zero)])
    torch.testing.assert_close(run(model, ids, [Intervention.zero("0.2")]).logits, expected, rtol=0, atol=1e-12)


def test_set_scale_add_match_manual(tiny):
    family, model, ref, ids = tiny
    d_head = model.dims.d_head

    def neurons(x):
        x[..., 3] = 1.5
        x[..., 5] *= -2.0
        x[..., 5] += 0.25  # set then add on the same site, in list order
        return x

    def heads(x):
        x[..., 1 * d_head : 2 * d_head] += 0.5
        return x

    expected = manual_logits(
        ref, ids, [(on_input, NEURONS_IN[family](ref, 2), neurons), (on_input, HEADS_IN[family](ref, 2), heads)]
    )
    ivs = [Intervention.set("2:3", 1.5), Intervention.scale("2:5", -2.0), Intervention.add(["2:5", "2.1"], [0.25, 0.5])]
    w = writes(model, ivs, ids)
    assert sorted(w) == ["blocks.2.attn.hook_z", "blocks.2.mlp.hook_post"]  # grouped: one function per site
    with torch.inference_mode():
        got = model.run(ids, write=w).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


def test_noop_interventions_leave_logits_unchanged(tiny):
    _, model, _, ids = tiny
    with torch.inference_mode():
        clean = model.run(ids, read=["blocks.1.mlp.hook_post"], logits=True)
    own = float(clean.cache["blocks.1.mlp.hook_post"][0, 3, 9])
    ivs = [
        Intervention.scale(["1:9", "1:10", "0.1", "2.3"], 1.0),
        Intervention.set("1:9", own, positions=[3]),
        Intervention.add("0.0", 0.0),
        Intervention.add_direction("blocks.0.hook_resid_post", torch.ones(model.dims.d_model), alpha=0.0),
    ]
    torch.testing.assert_close(run(model, ids, ivs).logits, clean.logits, rtol=0, atol=1e-12)


def test_mean_ablation_uses_the_mean_it_says(tiny):
    family, model, ref, ids = tiny
    with torch.inference_mode():
        cache = model.run(ids, read=["blocks.1.mlp.hook_post", "blocks.0.attn.hook_z"]).cache
    neuron_mean = cache["blocks.1.mlp.hook_post"][0, :, 11].mean()
    head_mean = cache["blocks.0.attn.hook_z"][0, :, 3].mean(0)
    (iv,) = resolve(model, [Intervention.mean_ablate(["1:11", "0.3"])], ids)
    torch.testing.assert_close(iv.means[0], neuron_mean, rtol=0, atol=1e-12)
    torch.testing.assert_close(iv.means[1], head_mean, rtol=0, atol=1e-12)
    assert "mean over the prompt" in str(iv)
    d_head = model.dims.d_head

    def set_neuron(x):
        x[..., 11] = neuron_mean
        return x

    def set_head(x):
        x[..., 3 * d_head : 4 * d_head] = head_mean
        return x

    hooks = [(on_input, NEURONS_IN[family](ref, 1), set_neuron), (on_input, HEADS_IN[family](ref, 0), set_head)]
    expected = manual_logits(ref, ids, hooks)
    torch.testing.assert_close(run(model, ids, [Intervention.mean_ablate(["1:11", "0.3"])]).logits, expected, rtol=0, atol=1e-12)
    # A reference of sequences of different lengths: the mean over all their positions.
    refs = [list(range(3, 8)), list(range(10, 13))]
    with torch.inference_mode():
        acts = torch.cat([model.run(r, read=["blocks.1.mlp.hook_post"]).cache["blocks.1.mlp.hook_post"][0, :, 11] for r in refs])
        torch.testing.assert_close(unit_means(model, [Unit("neuron", 1, 11)], refs)[0], acts.mean(), rtol=0, atol=1e-12)
    (iv,) = resolve(model, [Intervention.mean_ablate("1:11", reference=refs)], ids)
    torch.testing.assert_close(iv.means[0], acts.mean(), rtol=0, atol=1e-12)


def test_direction_add_matches_manual_block_output_hook(tiny):
    family, model, ref, ids = tiny
    d = torch.randn(model.dims.d_model, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    expected = manual_logits(ref, ids, [(on_output, BLOCK[family](ref, 1), lambda x: x + 0.7 * d)])
    got = run(model, ids, [Intervention.add_direction("blocks.1.hook_resid_post", d, alpha=0.7)]).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


def test_set_projection(tiny):
    _, model, _, ids = tiny
    site = "blocks.1.hook_resid_mid"
    d = torch.randn(model.dims.d_model, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    u = d / d.norm()
    with torch.inference_mode():
        clean = model.run(ids, read=[site]).cache[site]
        out = model.run(ids, read=[site], write=writes(model, [Intervention.set_projection(site, 3 * d, 2.0)], ids), logits=True)
    written = out.cache[site]
    torch.testing.assert_close(written @ u, torch.full_like(written @ u, 2.0), rtol=0, atol=1e-12)
    orthogonal = lambda x: x - (x @ u)[..., None] * u
    torch.testing.assert_close(orthogonal(written), orthogonal(clean), rtol=0, atol=1e-12)


def test_chosen_positions_only_change_those_positions(tiny):
    _, model, _, ids = tiny
    with torch.inference_mode():
        clean = model.run(ids).logits
    got = run(model, ids, [Intervention.set(["1:4", "0.1"], 5.0, positions=[4, -2])]).logits  # -2 is position 6 of 8
    torch.testing.assert_close(got[:, :4], clean[:, :4], rtol=0, atol=1e-12)
    assert (got[:, 4] - clean[:, 4]).abs().max() > 1e-6 and (got[:, 6] - clean[:, 6]).abs().max() > 1e-6
    (iv,) = resolve(model, [Intervention.zero("1:4", positions=[-2, 4, 4])], ids)
    assert iv.positions == (4, 6) and str(iv) == "zero-ablate 1:4 at positions [4, 6]"


def manual_greedy(family, ref, ids, n, fn, prompt_only):
    """Greedy decoding with full recomputation each step and a hand-written neuron hook (prompt positions only, or all)."""
    n_prompt = ids.shape[1]

    def hook(x):
        if prompt_only:
            x[:, :n_prompt] = fn(x[:, :n_prompt].clone())
            return x
        return fn(x)

    seq = ids
    for _ in range(n):
        nxt = manual_logits(ref, seq, [(on_input, NEURONS_IN[family](ref, 1), hook)])[0, -1].argmax()
        seq = torch.cat([seq, nxt.view(1, 1)], dim=1)
        if int(nxt) == ref.config.eos_token_id:
            break
    return seq[0, n_prompt:].tolist()


@pytest.mark.parametrize("prompt_only", [False, True])
def test_generate_applies_to_new_tokens_or_only_prompt_positions(prompt_only):
    case = tiny_case("llama")
    family, model, ref, ids = "llama", case.model, case.reference, case.ids[:1]

    def set_neurons(x):
        x[..., :8] = 3.0
        return x

    units = [f"1:{i}" for i in range(8)]
    positions = list(range(ids.shape[1])) if prompt_only else None
    g = generate(model, ids, [Intervention.set(units, 3.0, positions=positions)], max_new_tokens=6)
    assert g.before_ids == manual_greedy(family, ref, ids, 6, lambda x: x, prompt_only)
    assert g.after_ids == manual_greedy(family, ref, ids, 6, set_neurons, prompt_only)
    assert g.after_ids != g.before_ids
    assert g.after == "".join(f"<{i}>" for i in g.after_ids)  # tiny models have no tokenizer


def test_from_options(smollm2):
    ivs = from_options(smollm2, set=["12:345=3.5"], scale=["5.3=0"], ablate=["1:2,3.4"], mean_ablate=["7:8"], positions=[-1])
    assert [str(iv) for iv in ivs] == [
        "set 12:345 = 3.5 at positions [-1]",
        "scale 5.3 x 0.0 at positions [-1]",
        "zero-ablate 1:2,3.4 at positions [-1]",
        "mean-ablate 7:8 (mean over the prompt) at positions [-1]",
    ]
