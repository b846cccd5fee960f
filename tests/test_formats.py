"""Dictionary files exchanged with SAELens and sparsify, checked by the peers' own code.

The independent side is each peer itself, installed from PyPI (`pip install -e '.[exchange]'`):
SAELens builds, saves and loads its SAEs and transcoders, sparsify builds and saves its sparse
coders, all on seeded random weights and offline. mechscope reads what they wrote, or writes what
they read, and the feature activations and reconstructions must agree to 1e-5. Each test records
its largest difference as the `max_diff` property (see `--junitxml`).
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_case
from safetensors.torch import load_file, save_file

from mechscope.dictionaries import DictConfig, Dictionary, export_saelens, import_saelens, import_sparsify, load_any
from mechscope.dictionaries import save_dictionary as save_own
from mechscope.errors import MechscopeError

TOL = 1e-5
SITE, OUT = "blocks.1.hook_resid_post", "blocks.1.hook_mlp_out"
MLP_IN = "blocks.1.ln2.hook_normalized"
D, F = 32, 128


@pytest.fixture(scope="module")
def sl():
    """SAELens, imported once for the tests that need it (the import alone takes seconds)."""
    return pytest.importorskip("sae_lens")


@pytest.fixture(scope="module")
def sparsify():
    return pytest.importorskip("sparsify")


def randomize(module: torch.nn.Module, seed: int) -> None:
    """Seeded random weights: every parameter ~ 0.3·N(0, 1); JumpReLU thresholds in [-0.1, 0.9)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name == "threshold":
                p.copy_(torch.rand(p.shape, generator=gen) - 0.1)
            else:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen).to(p.dtype))


def inputs(d: int = D, n: int = 64, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def max_diff(*pairs) -> float:
    return max(float((a.detach().double() - b.detach().double()).abs().max()) for a, b in pairs)


def ours(dictionary: Dictionary, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Feature activations [B, F] and reconstruction [B, d_out] of one-site dictionary."""
    return dictionary.encode_dense(x), dictionary(x).recon.squeeze(1)


def theirs(sae, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The same from a SAELens SAE: `forward` adds a skip transcoder's skip term, which `decode` leaves out."""
    with torch.no_grad():
        return sae.encode(x), sae(x)


# ---- SAELens -> mechscope ----------------------------------------------------------------------

SAELENS_CASES = {
    "standard": ("standard", {}),
    "standard_no_b_dec_in": ("standard", {"apply_b_dec_to_input": False}),
    "topk": ("topk", {"k": 8}),
    "topk_rescaled": ("topk", {"k": 8, "rescale_acts_by_decoder_norm": True}),
    "jumprelu": ("jumprelu", {}),
    "transcoder": ("transcoder", {"d_out": 24, "apply_b_dec_to_input": False}),
    "skip_transcoder": ("skip_transcoder", {"d_out": 24, "apply_b_dec_to_input": False}),
    "jumprelu_transcoder": ("jumprelu_transcoder", {"d_out": 24, "apply_b_dec_to_input": False}),
    "jumprelu_skip_transcoder": ("jumprelu_skip_transcoder", {"d_out": 24, "apply_b_dec_to_input": False}),
}


def saelens_sae(sl, architecture: str, seed: int = 0, d_in: int = D, **fields):
    """A SAELens inference SAE of `architecture`, built by SAELens from its config class, random weights."""
    from sae_lens.registry import get_sae_class
    from sae_lens.saes.sae import SAEMetadata

    sae_class, cfg_class = get_sae_class(architecture)
    outs = {"hook_name_out": OUT} if "d_out" in fields else {}
    cfg = cfg_class(
        d_in=d_in, d_sae=F, metadata=SAEMetadata(hook_name=MLP_IN if outs else SITE, model_name="tiny", **outs), **fields
    )
    sae = sae_class(cfg)
    randomize(sae, seed)
    return sae.eval()


@pytest.mark.parametrize("case", list(SAELENS_CASES))
def test_what_saelens_saves_reads_the_same(sl, tmp_path, case, record_property):
    architecture, fields = SAELENS_CASES[case]
    sae = saelens_sae(sl, architecture, **fields)
    sae.save_model(tmp_path / "sae")
    d = import_saelens(tmp_path / "sae")
    transcoder = "d_out" in fields
    assert (d.cfg.read_sites, d.cfg.write_sites) == (([MLP_IN], [OUT]) if transcoder else ([SITE], [SITE]))
    assert d.cfg.model == "tiny" and d.cfg.d_out == fields.get("d_out", D)
    x = inputs()
    acts, recon = theirs(sae, x)
    assert 0 < (acts > 0).sum() < acts.numel()  # some latents fire, some do not
    diff = max_diff((ours(d, x)[0], acts), (ours(d, x)[1], recon))
    record_property("max_diff", diff)
    assert diff < TOL
    assert load_any(tmp_path / "sae").cfg == d.cfg


@pytest.mark.parametrize("training", ["batchtopk", "matryoshka_batchtopk"])
def test_saelens_batchtopk_reads_the_same_as_a_checkpoint_and_as_its_inference_save(sl, tmp_path, training, record_property):
    """SAELens saves a trained BatchTopK as `jumprelu`; its checkpoints keep the training class and one threshold."""
    from sae_lens.registry import get_sae_training_class
    from sae_lens.saes.sae import SAEMetadata

    sae_class, cfg_class = get_sae_training_class(training)
    extra = {"matryoshka_widths": [32, 64, F]} if training == "matryoshka_batchtopk" else {}
    sae = sae_class(cfg_class(d_in=D, d_sae=F, k=8, metadata=SAEMetadata(hook_name=SITE), **extra))  # rescales by ‖W_dec‖
    randomize(sae, 0)
    sae.topk_threshold = torch.tensor(0.6, dtype=torch.float64)
    sae.save_inference_model(tmp_path / "inference")
    sae.save_model(tmp_path / "checkpoint")
    assert json.loads((tmp_path / "inference" / "cfg.json").read_text())["architecture"] == "jumprelu"
    reference = sl.SAE.load_from_disk(tmp_path / "inference").eval()
    x = inputs()
    acts, recon = theirs(reference, x)
    diffs = []
    for folder in ("inference", "checkpoint"):
        d = import_saelens(tmp_path / folder)
        assert d.cfg.activation == ("jumprelu" if folder == "inference" else "batchtopk")
        diffs.append(max_diff((ours(d, x)[0], acts), (ours(d, x)[1], recon)))
    assert import_saelens(tmp_path / "checkpoint").cfg.matryoshka == ([32, 64, F] if extra else None)
    record_property("max_diff", max(diffs))
    assert max(diffs) < TOL


@pytest.mark.parametrize("scaler", [None, 2.5])
def test_expected_average_only_in_is_the_identity_unless_a_scaler_is_left_beside_the_weights(
    sl, tmp_path, scaler, record_property
):
    from sae_lens.training.activation_scaler import ActivationScaler

    sae = saelens_sae(sl, "topk", k=8, normalize_activations="expected_average_only_in")
    sae.save_model(tmp_path / "sae")
    if scaler is not None:  # a checkpoint from before the final save: the scale is not in the weights yet
        ActivationScaler(scaling_factor=scaler).save(str(tmp_path / "sae" / "activation_scaler.json"))
    d = import_saelens(tmp_path / "sae")
    x = inputs()
    s = scaler or 1.0
    with torch.no_grad():  # what the trainer computed: scale, encode, decode, unscale
        acts = sae.encode(x * s)
        recon = sae.decode(acts) / s
    diff = max_diff((ours(d, x)[0], acts), (ours(d, x)[1], recon))
    record_property("max_diff", diff)
    assert diff < TOL
    if scaler is None:  # and what SAELens's own loader gives
        loaded = sl.SAE.load_from_disk(tmp_path / "sae")
        assert max_diff((ours(d, x)[0], theirs(loaded, x)[0])) < TOL


# ---- mechscope -> SAELens ----------------------------------------------------------------------

EXPORT_CASES = {
    # name: (activation, options, transcoder, skip, matryoshka, expected architecture)
    "relu": ("relu", {}, False, False, None, "standard"),
    "topk": ("topk", {"k": 8}, False, False, None, "topk"),
    "jumprelu": ("jumprelu", {}, False, False, None, "jumprelu"),
    "batchtopk": ("batchtopk", {"k": 8, "threshold": 0.6}, False, False, None, "jumprelu"),
    "matryoshka_batchtopk": ("batchtopk", {"k": 8, "threshold": 0.6}, False, False, [32, 64, F], "jumprelu"),
    "matryoshka_topk": ("topk", {"k": 8}, False, False, [32, 64, F], "topk"),
    "relu_transcoder": ("relu", {}, True, False, None, "transcoder"),
    "relu_skip_transcoder": ("relu", {}, True, True, None, "skip_transcoder"),
    "jumprelu_transcoder": ("jumprelu", {}, True, False, None, "jumprelu_transcoder"),
    "batchtopk_skip_transcoder": ("batchtopk", {"k": 8, "threshold": 0.6}, True, True, None, "jumprelu_skip_transcoder"),
}


def our_dictionary(activation, options, transcoder=False, skip=False, matryoshka=None, seed=0) -> Dictionary:
    """A random mechscope dictionary whose normalisation is not folded yet (scales 2.0 and 0.5)."""
    reads, writes, d_out = ([MLP_IN], [OUT], 24) if transcoder else ([SITE], [SITE], D)
    cfg = DictConfig(reads, writes, D, d_out, F, activation, options, skip_connection=skip, matryoshka=matryoshka,
                     input_scale=[2.0], output_scale=[0.5 if transcoder else 2.0], model="tiny")  # fmt: skip
    d = Dictionary(cfg)
    randomize(d, seed)
    if activation == "jumprelu":
        with torch.no_grad():
            d.activation.log_threshold.copy_(torch.rand(F, generator=torch.Generator().manual_seed(seed)).log())
    return d.eval()


@pytest.mark.parametrize("case", list(EXPORT_CASES))
def test_what_we_export_saelens_reads_the_same(sl, tmp_path, case, record_property):
    activation, options, transcoder, skip, matryoshka, architecture = EXPORT_CASES[case]
    d = our_dictionary(activation, options, transcoder, skip, matryoshka)
    export_saelens(d, tmp_path / "sae")
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert cfg["architecture"] == architecture and cfg["dtype"] == "float32" and cfg["metadata"]["sae_lens_version"]
    sae = sl.SAE.load_from_disk(tmp_path / "sae")
    assert sae.cfg.metadata.hook_name == d.cfg.read_sites[0] and sae.cfg.metadata.model_name == "tiny"
    if transcoder:
        assert sae.cfg.metadata.hook_name_out == OUT
    x = inputs()
    acts, recon = theirs(sae, x)
    assert 0 < (acts > 0).sum() < acts.numel()
    diff = max_diff((ours(d, x)[0], acts), (ours(d, x)[1], recon))
    back = import_saelens(tmp_path / "sae")  # and back again
    diff = max(diff, max_diff((ours(back, x)[0], acts), (ours(back, x)[1], recon)))
    record_property("max_diff", diff)
    assert diff < TOL


def test_the_layout_version_keeps_the_hook_name_in_saelens(sl, tmp_path):
    """Without `metadata.sae_lens_version`, SAELens reads a config in its older layout and drops the hook name."""
    export_saelens(our_dictionary("topk", {"k": 8}), tmp_path / "sae")
    assert sl.SAE.load_from_disk(tmp_path / "sae").cfg.metadata.hook_name == SITE
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    del cfg["metadata"]["sae_lens_version"]
    (tmp_path / "sae" / "cfg.json").write_text(json.dumps(cfg))
    assert sl.SAE.load_from_disk(tmp_path / "sae").cfg.metadata.hook_name is None


def test_a_config_in_the_older_layout_reads_as_saelens_reads_it(sl, tmp_path, record_property):
    """Before 6.0: no metadata, the hook name at the top, TopK named by the activation function, a bool normalisation."""
    sae = saelens_sae(sl, "topk", k=8)
    sae.save_model(tmp_path / "sae")
    old = {"d_in": D, "d_sae": F, "dtype": "float32", "hook_name": SITE, "model_name": "tiny", "apply_b_dec_to_input": True}
    old |= {"activation_fn_str": "topk", "activation_fn_kwargs": {"k": 8}, "normalize_activations": False}
    (tmp_path / "sae" / "cfg.json").write_text(json.dumps(old))
    reference = sl.SAE.load_from_disk(tmp_path / "sae")
    assert reference.cfg.architecture() == "topk" and reference.cfg.metadata.hook_name == SITE
    d = import_saelens(tmp_path / "sae")
    assert d.cfg.read_sites == [SITE] and d.activation.k == 8
    x = inputs()
    acts, recon = theirs(reference, x)
    diff = max_diff((ours(d, x)[0], acts), (ours(d, x)[1], recon))
    record_property("max_diff", diff)
    assert diff < TOL


def test_dictionaries_saelens_has_no_architecture_for_are_refused_in_one_line(tmp_path):
    crosscoder = Dictionary(DictConfig(["blocks.0.hook_resid_post", SITE], ["blocks.0.hook_resid_post", SITE], D, D, F))
    cases = [
        (crosscoder, "a crosscoder cannot be exported for SAELens"),
        (our_dictionary("topk", {"k": 8}, transcoder=True), "a TopK transcoder cannot be exported"),
        (Dictionary(DictConfig([SITE], [SITE], D, D, F, skip_connection=True)), "an SAE with a skip connection"),
        (our_dictionary("batchtopk", {"k": 8}), "no inference threshold yet"),
    ]
    for dictionary, message in cases:
        with pytest.raises(MechscopeError, match=message) as err:
            export_saelens(dictionary, tmp_path / "sae")
        assert "\n" not in str(err.value)
    assert not (tmp_path / "sae").exists()


# ---- sparsify -> mechscope ---------------------------------------------------------------------


def sparse_coder(sparsify, transcode=False, skip=False, seed=0):
    from sparsify import SparseCoder, SparseCoderConfig

    coder = SparseCoder(D, SparseCoderConfig(num_latents=F, k=8, transcode=transcode, skip_connection=skip))
    randomize(coder, seed)
    return coder.eval()


@pytest.mark.parametrize("transcode", [False, True], ids=["sae", "transcoder"])
@pytest.mark.parametrize("skip", [False, True], ids=["plain", "skip"])
def test_what_sparsify_saves_reads_the_same(sparsify, tmp_path, transcode, skip, record_property):
    coder = sparse_coder(sparsify, transcode, skip)
    coder.save_to_disk(tmp_path / "run" / "layers.1.mlp")
    d = import_sparsify(tmp_path / "run" / "layers.1.mlp")
    assert (d.cfg.read_sites, d.cfg.write_sites) == (([MLP_IN], [OUT]) if transcode else ([OUT], [OUT]))
    assert d.cfg.apply_b_dec_to_input == (not transcode)  # SAEs subtract b_dec from their input, transcoders do not
    x = inputs()
    with torch.no_grad():
        top = coder.encode(x)
        recon = coder(x).sae_out
    dense = torch.zeros(len(x), F).scatter(-1, top.top_indices, top.top_acts)
    active = ours(d, x)[0]
    for b in range(len(x)):  # the same latents fire (ReLU then top-k lists zeros where ours does not)
        assert set(top.top_indices[b][top.top_acts[b] > 0].tolist()) == set(active[b].nonzero().flatten().tolist())
    diff = max_diff((active, dense), (ours(d, x)[1], recon))
    record_property("max_diff", diff)
    assert diff < TOL


def test_a_sparsify_run_folder_is_read_by_hookpoint(sparsify, tmp_path, record_property):
    sae, transcoder = sparse_coder(sparsify, seed=1), sparse_coder(sparsify, transcode=True, seed=2)
    sae.save_to_disk(tmp_path / "run" / "layers.0")
    transcoder.save_to_disk(tmp_path / "run" / "layers.1.mlp")
    with pytest.raises(MechscopeError, match=r"holds a coder per hookpoint \(give one with site=\): layers.0, layers.1.mlp"):
        load_any(tmp_path / "run")
    with pytest.raises(MechscopeError, match="'blocks.2.hook_resid_post' is none of them"):
        load_any(tmp_path / "run", site="blocks.2.hook_resid_post")
    by_site = load_any(tmp_path / "run", site="blocks.0.hook_resid_post")
    by_name = load_any(tmp_path / "run", site="layers.1.mlp")
    assert by_site.cfg.read_sites == ["blocks.0.hook_resid_post"] and by_name.cfg.write_sites == [OUT]
    x = inputs()
    with torch.no_grad():
        diff = max_diff((ours(by_site, x)[1], sae(x).sae_out), (ours(by_name, x)[1], transcoder(x).sae_out))
    record_property("max_diff", diff)
    assert diff < TOL
    with pytest.raises(MechscopeError, match="names no site mechscope knows: give the site it reads with site="):
        sae.save_to_disk(tmp_path / "odd" / "encoder_out")
        import_sparsify(tmp_path / "odd" / "encoder_out")
    assert import_sparsify(tmp_path / "odd" / "encoder_out", site=SITE).cfg.read_sites == [SITE]


# ---- one entry point, checked against a model ----------------------------------------------------


def test_load_any_checks_an_imported_dictionary_against_the_model(sl, tmp_path, record_property):
    model = tiny_case("llama").model  # d_model 32
    sae = saelens_sae(sl, "topk", k=8)
    sae.save_model(tmp_path / "sae")
    d = load_any(tmp_path / "sae" / "sae_weights.safetensors", model=model)
    x = model.run(tiny_case("llama").ids, read=[SITE]).cache[SITE].float()
    diff = max_diff((d.encode_dense(x).reshape(-1, F), theirs(sae, x)[0].reshape(-1, F)))
    record_property("max_diff", diff)
    assert diff < TOL
    saelens_sae(sl, "topk", d_in=16, k=8).save_model(tmp_path / "narrow")
    with pytest.raises(MechscopeError, match=f"reads d_in=16 but {SITE} of .* has width 32"):
        load_any(tmp_path / "narrow", model=model)
    with pytest.raises(MechscopeError, match="is no dictionary folder mechscope reads"):
        load_any(tmp_path)
    save_own(d, tmp_path / "own")  # and mechscope's own folder
    assert max_diff((load_any(tmp_path / "own", model=model).encode_dense(x), d.encode_dense(x))) == 0


# ---- bad files: one line naming the file, for every reader -------------------------------------


def own_folder(folder):
    save_own(our_dictionary("topk", {"k": 8}), folder)
    return folder / "dictionary.safetensors"


def saelens_folder(folder):
    export_saelens(our_dictionary("jumprelu", {}), folder)
    return folder / "sae_weights.safetensors"


def sparsify_folder(folder):
    """A sparsify folder as its own code writes it (written here by hand, so these tests run without it)."""
    folder.mkdir(parents=True)
    (folder / "cfg.json").write_text(json.dumps({"activation": "topk", "num_latents": F, "k": 8, "d_in": D, "transcode": False}))
    tensors = {
        "encoder.weight": torch.randn(F, D),
        "encoder.bias": torch.randn(F),
        "W_dec": torch.randn(F, D),
        "b_dec": torch.randn(D),
    }
    save_file(tensors, str(folder / "sae.safetensors"))
    return folder / "sae.safetensors"


def wrong_shapes(f):
    save_file({k: torch.zeros(3) for k in load_file(str(f))}, str(f))


def drop_a_tensor(f):
    tensors = load_file(str(f))
    save_file(dict(list(tensors.items())[1:]), str(f))


def add_a_tensor(f):
    save_file({**load_file(str(f)), "surprise": torch.zeros(3)}, str(f))


DAMAGES = {
    "truncated_header": (lambda f: f.write_bytes(f.read_bytes()[:10]), "is damaged or truncated"),
    "truncated_half": (lambda f: f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2]), "is damaged or truncated"),
    "empty": (lambda f: f.write_bytes(b""), "is damaged or truncated"),
    "wrong_shapes": (wrong_shapes, "but the config makes it"),
    "missing_tensor": (drop_a_tensor, "has no tensor"),
    "unknown_tensor": (add_a_tensor, "holds a tensor 'surprise'|has no tensor 'surprise'|unexpected"),
    "bad_json": (lambda f: (f.parent / "cfg.json").write_text("{oops"), "is not valid JSON"),
    "json_list": (lambda f: (f.parent / "cfg.json").write_text("[1, 2]"), "is not a config|not a dictionary config"),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
@pytest.mark.parametrize("layout", [own_folder, saelens_folder, sparsify_folder], ids=["own", "saelens", "sparsify"])
def test_a_damaged_file_gets_one_line_naming_it(tmp_path, layout, damage):
    if (layout, damage) == (own_folder, "unknown_tensor"):
        pytest.skip("mechscope's own reader ignores tensors it does not use")
    weights = layout(tmp_path / "layers.1")
    action, message = DAMAGES[damage]
    action(weights)
    with pytest.raises(MechscopeError, match=message) as err:
        load_any(tmp_path / "layers.1")
    text = str(err.value)
    assert "\n" not in text and str(tmp_path / "layers.1") in text


@pytest.mark.parametrize(
    "edit, message",
    [
        ({"architecture": "gated"}, "architecture 'gated' cannot be read: valid architectures are standard, topk"),
        ({"normalize_activations": "layer_norm"}, "normalises each token at run time"),
        ({"d_sae": 0}, "d_sae=0 is invalid"),
        ({"metadata": {"sae_lens_version": "6.0.0"}}, r"names no hook \(metadata.hook_name\): give the site it reads with site="),
        (
            {"architecture": "jumprelu_transcoder", "d_out": D, "apply_b_dec_to_input": False, "metadata": {"hook_name": SITE}},
            "a transcoder reading blocks.1.hook_resid_post with no hook_name_out",
        ),  # fmt: skip
    ],
)
def test_saelens_configs_mechscope_cannot_read_exactly_get_one_line(tmp_path, edit, message):
    saelens_folder(tmp_path / "sae")
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    (tmp_path / "sae" / "cfg.json").write_text(json.dumps(cfg | edit))
    with pytest.raises(MechscopeError, match=message) as err:
        import_saelens(tmp_path / "sae")
    assert "\n" not in str(err.value)


def test_sparsify_configs_mechscope_cannot_read_exactly_get_one_line(tmp_path):
    sparsify_folder(tmp_path / "layers.1")
    cfg = json.loads((tmp_path / "layers.1" / "cfg.json").read_text())
    for edit, message in [
        ({"activation": "groupmax"}, "activation 'groupmax' cannot be read: valid are topk"),
        ({"k": F + 1}, f"k={F + 1} is invalid for {F} latents"),
        ({"d_in": D + 1}, "encoder.weight is .* but the config makes it"),
    ]:
        (tmp_path / "layers.1" / "cfg.json").write_text(json.dumps(cfg | edit))
        with pytest.raises(MechscopeError, match=message) as err:
            import_sparsify(tmp_path / "layers.1")
        assert "\n" not in str(err.value) and "layers.1" in str(err.value)


def test_a_train_dict_run_folder_reads_as_the_dictionary_it_saved(tmp_path):
    dictionary = our_dictionary("topk", {"k": 4})
    save_own(dictionary, tmp_path / "run" / "dictionary")
    (tmp_path / "run" / "metrics.jsonl").write_text("")
    loaded, saved = load_any(tmp_path / "run"), load_any(tmp_path / "run" / "dictionary")
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), saved.state_dict().values(), strict=True))
