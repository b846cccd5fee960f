"""`Dictionary`: one encoder / activation / decoder family for every kind, as a pair of site lists.

A dictionary reads R sites of width d_in and writes W sites of width d_out through F latents:

    f   = act(Σ_r (x_r - b_dec,r·[reads = writes]) W_enc,r + b_enc)          [B, F]
    x̂_w = Σ_i f_i W_dec,i,w + b_dec,w  (+ Σ_r x_r W_skip,r,w with a skip connection)   [B, W, d_out]

| kind | reads | writes |
|---|---|---|
| SAE | one site | the same site |
| crosscoder | several sites (e.g. residual streams of several layers) | the same sites |
| transcoder | an MLP's input (`blocks.L.ln2.hook_normalized` or `hook_resid_mid`) | that MLP's output |
| cross-layer transcoder (CLT) | `blocks.l.hook_resid_mid` of R layers | `blocks.l.hook_mlp_out` of the same layers |

A CLT (`layered=True`) splits its F latents into R blocks of F/R, one per layer: the latents of block r
read only read site r (their encoder is [d_in, F/R], not [R·d_in, F/R]) and write only the write sites
r..R−1, the MLP outputs of their own layer and every later one (Anthropic, "Circuit Tracing", 2025).
W_dec keeps the full [F, W·d_out] shape with the blocks below the diagonal held at zero, so that
decoding, steering and decoder profiles are those of every other kind.

The input subtracts the decoder bias (`apply_b_dec_to_input`) only where a dictionary reconstructs
what it reads (SAE, crosscoder), as in Gao et al. 2024. Activations are normalised before they reach
the weights: each site's values are multiplied by a stored scale (`input_scale`, `output_scale`) that
gives them a mean norm of √d during training; `folded()` moves the scales into the weights, which
leaves every feature activation unchanged, so a saved dictionary reads and writes raw activations.

Shapes: B tokens, R read sites, W write sites, D = d_in (or d_out), F = d_sae.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import Tensor, nn

from mechscope.dictionaries.activations import make_activation
from mechscope.dictionaries.sparse import Active, gather_pre, sparse_decode
from mechscope.errors import MechscopeError

FORMAT_VERSION = 1


@dataclass
class DictConfig:
    """What a dictionary is: where it reads and writes, its sizes, activation and normalisation."""

    read_sites: list[str]
    """Sites the encoder reads, e.g. ["blocks.15.hook_resid_post"]."""
    write_sites: list[str]
    """Sites the decoder writes (the same as `read_sites` for an SAE or a crosscoder)."""
    d_in: int
    """Width of each read site."""
    d_out: int
    """Width of each write site."""
    d_sae: int
    """Number of latents F."""
    activation: str = "topk"
    """Registered activation: relu, topk, batchtopk or jumprelu (see `activations.py`)."""
    activation_options: dict = field(default_factory=dict)
    """Options of the activation, e.g. {"k": 64}."""
    apply_b_dec_to_input: bool | None = None
    """Subtract b_dec from the input before encoding. None: only when the dictionary reads what it writes."""
    skip_connection: bool = False
    """An affine skip W_skip from what is read to what is written (skip transcoders)."""
    input_scale: list[float] | None = None
    """Per read site: the factor raw activations are multiplied by before encoding (1.0 once folded)."""
    output_scale: list[float] | None = None
    """Per write site: the factor the targets were multiplied by; reconstructions are divided by it."""
    matryoshka: list[int] | None = None
    """Nested prefix sizes (ascending, the last one F) whose reconstruction losses add up in training."""
    model: str = ""
    """Name of the model the dictionary was trained on."""
    model_fingerprint: str = ""
    """`mechscope.models.fingerprint.model_fingerprint` of that model."""
    skip_positions: int = 0
    """The first positions of each context left out of training and evaluation."""
    dtype: str = "float32"
    """The weights' precision on disk (float32, bfloat16 or float16); loaded weights are float32."""
    layered: bool = False
    """A cross-layer transcoder: latents in one block per read site, block r reading site r and writing
    sites r.. (see the module docstring)."""
    format_version: int = FORMAT_VERSION

    def __post_init__(self):
        if not self.read_sites or not self.write_sites:
            raise MechscopeError("a dictionary needs at least one read site and one write site")
        for name in ("d_in", "d_out", "d_sae"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise MechscopeError(f"{name}={value!r} is invalid: it must be a positive integer")
        if self.apply_b_dec_to_input is None:
            self.apply_b_dec_to_input = self.reconstructs
        if self.apply_b_dec_to_input and not self.reconstructs:
            raise MechscopeError("apply_b_dec_to_input needs the dictionary to write the sites it reads (an SAE or crosscoder)")
        self.input_scale = [1.0] * len(self.read_sites) if self.input_scale is None else [float(s) for s in self.input_scale]
        self.output_scale = [1.0] * len(self.write_sites) if self.output_scale is None else [float(s) for s in self.output_scale]
        if self.apply_b_dec_to_input and self.input_scale != self.output_scale:
            raise MechscopeError(
                f"input_scale {self.input_scale} and output_scale {self.output_scale} differ: a dictionary that "
                "subtracts its decoder bias from its input reads and writes in one scale"
            )
        if self.layered:
            self._check_layered()
        if self.matryoshka is not None:
            sizes = [int(m) for m in self.matryoshka]
            if sizes != sorted(set(sizes)) or sizes[0] < 1 or sizes[-1] != self.d_sae:
                raise MechscopeError(
                    f"matryoshka prefixes {self.matryoshka} are invalid: give ascending sizes ending at d_sae={self.d_sae}"
                )
            self.matryoshka = sizes

    def _check_layered(self) -> None:
        R = len(self.read_sites)
        if len(self.write_sites) != R or self.reconstructs:
            raise MechscopeError(
                "a cross-layer transcoder reads one site per layer and writes another per layer: "
                f"it got {R} read and {len(self.write_sites)} write sites"
            )
        if self.d_sae % R:
            raise MechscopeError(f"d_sae={self.d_sae} does not split into {R} equal blocks, one per layer")
        check_clt_options(self.activation, self.matryoshka, self.skip_connection)

    @property
    def reconstructs(self) -> bool:
        """Whether the dictionary writes exactly the sites it reads (SAE, crosscoder)."""
        return list(self.read_sites) == list(self.write_sites) and self.d_in == self.d_out

    @property
    def kind(self) -> str:
        if self.layered:
            return "clt"
        if self.reconstructs:
            return "sae" if len(self.read_sites) == 1 else "crosscoder"
        return "skip_transcoder" if self.skip_connection else "transcoder"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


SKIP_NEEDS_OTHER_SITES = (
    "a skip connection is for a transcoder, which writes other sites than it reads: an SAE or crosscoder "
    "with one would learn to copy its input"
)


def check_clt_options(activation: str, matryoshka, skip_connection: bool) -> None:
    """One-line error for what a cross-layer transcoder cannot have: batchtopk, Matryoshka prefixes, a skip."""
    if skip_connection:
        raise MechscopeError("a cross-layer transcoder cannot have a skip connection: train it without one")
    if matryoshka:
        raise MechscopeError("a cross-layer transcoder cannot have Matryoshka prefixes: train it without them")
    if activation == "batchtopk":
        raise MechscopeError("a cross-layer transcoder cannot have batchtopk: use relu, topk or jumprelu")


class DictOutput(NamedTuple):
    """One forward pass of a dictionary."""

    recon: Tensor
    """[B, W, d_out] reconstruction of the written sites (normalised units inside training, raw outside)."""
    active: Active
    """The active latents: N (token, latent) pairs and their activations."""
    z_pairs: Tensor
    """[N] pre-activations of the active pairs."""


class Dictionary(nn.Module):
    """A sparse dictionary over lists of sites. Build one from a `DictConfig`; load one with `load_dictionary`.

    >>> d = Dictionary(DictConfig(["blocks.15.hook_resid_post"] * 1, ["blocks.15.hook_resid_post"], 576, 576, 9216))
    >>> acts = d.encode(x)          # x: [B, 576] raw activations -> sparse.Active
    >>> x_hat = d.decode(acts)      # [B, 576]
    """

    def __init__(self, cfg: DictConfig):
        super().__init__()
        self.cfg = cfg
        R, W, D_in, D_out, F = len(cfg.read_sites), len(cfg.write_sites), cfg.d_in, cfg.d_out, cfg.d_sae
        # [R·d_in, F] ([d_in, F] for a CLT, each latent reading one site), stored latent-major (the transpose
        # of a contiguous [F, ·]): each latent's encoder column is contiguous, as the sparse products read it.
        self.W_enc = nn.Parameter(torch.zeros(F, (1 if cfg.layered else R) * D_in).T)
        self.b_enc = nn.Parameter(torch.zeros(F))
        self.W_dec = nn.Parameter(torch.zeros(F, W * D_out))
        self.b_dec = nn.Parameter(torch.zeros(W * D_out))
        self.W_skip = nn.Parameter(torch.zeros(R * D_in, W * D_out)) if cfg.skip_connection else None
        options = {**cfg.activation_options, **({"blocks": R} if cfg.layered and cfg.activation == "topk" else {})}
        self.activation = make_activation(cfg.activation, F, **options)
        self.register_buffer("input_scale", torch.tensor(cfg.input_scale).repeat_interleave(D_in))
        self.register_buffer("output_scale", torch.tensor(cfg.output_scale).repeat_interleave(D_out))

    # -- sizes ------------------------------------------------------------------------------------

    @property
    def d_sae(self) -> int:
        return self.cfg.d_sae

    @property
    def n_read(self) -> int:
        return len(self.cfg.read_sites)

    @property
    def n_write(self) -> int:
        return len(self.cfg.write_sites)

    @property
    def blocks(self) -> int:
        """R for a cross-layer transcoder (one block of latents per layer), else 1."""
        return self.n_read if self.cfg.layered else 1

    def latent_site(self, features: Tensor) -> Tensor:
        """The read site (0..R−1) each latent of `features` [N] reads: its block for a CLT, else 0."""
        return features // (self.d_sae // self.blocks)

    def written_sites(self, feature: int) -> list[int]:
        """The write sites (indices) latent `feature` can write: all of them, or for a CLT its layer's and later."""
        first = int(self.latent_site(torch.tensor(feature))) if self.cfg.layered else 0
        return list(range(first, self.n_write))

    @torch.no_grad()
    def mask_decoder_(self, tensor: Tensor) -> Tensor:
        """Zero, in place, the parts of a [F, W·d_out] tensor (W_dec or its gradient) a CLT's latents cannot
        write: block r's columns at sites before r. Nothing for other kinds. Returns the tensor."""
        if self.cfg.layered:
            R = self.blocks
            view = tensor.view(R, self.d_sae // R, self.n_write, self.cfg.d_out)
            for r in range(1, R):
                view[r, :, :r] = 0
        return tensor

    def decoder_profile(self) -> Tensor:
        """[F, W] each latent's decoder norm at each site it writes, in raw activation units (the output
        scales divided out): where across the sites (layers, for a crosscoder) a feature writes."""
        with torch.no_grad():
            return (self.W_dec / self.output_scale).view(self.d_sae, self.n_write, self.cfg.d_out).norm(dim=-1)

    def decoder_norms(self) -> Tensor:
        """[F] each latent's decoder norm, as the sparsity penalties weight it (training units).

        A crosscoder sums its per-site norms, Σ_w ‖W_dec,i,w‖, so that a feature pays for every layer it
        writes (Lindsey et al. 2024); every other kind takes the norm of the whole row, over all the sites
        it writes (for a CLT, the concatenation of its decoders, as in Anthropic's 2025 recipe)."""
        if self.cfg.reconstructs and self.n_write > 1:
            return self.W_dec.view(self.d_sae, self.n_write, self.cfg.d_out).norm(dim=-1).sum(-1)
        return self.W_dec.norm(dim=-1)

    # -- normalised space (training) --------------------------------------------------------------

    def pre_activations(self, x: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        """z = (x - b_pre) W_enc + b_enc [B, F] without autograd; x [B, R·d_in] normalised.

        With a lower `dtype` (bfloat16) the product runs in it: fast on CPUs with bfloat16 matrix units,
        and good for choosing which latents are active, whose values `sparse.gather_pre` then computes exactly.
        """
        with torch.no_grad():
            if self.cfg.layered:
                return self._layered_pre(x, dtype or x.dtype)
            x_in = x - self.b_dec if self.cfg.apply_b_dec_to_input else x
            if dtype is None or dtype == x.dtype:
                return torch.addmm(self.b_enc, x_in, self.W_enc)
            # the bias as one more input column: the product writes z in one pass, with no bias copy before it
            ones = torch.ones(x_in.shape[0], 1, dtype=dtype, device=x.device)
            weights = torch.cat([self.W_enc.T, self.b_enc[:, None]], dim=1).to(dtype)  # [F, R·d_in + 1]
            return torch.cat([x_in.to(dtype), ones], dim=1) @ weights.T

    def _layered_pre(self, x: Tensor, dtype: torch.dtype) -> Tensor:
        """A CLT's z [B, F]: block r is x_r W_enc[:, block r] + b_enc[block r], x_r the r-th site of x [B, R·d_in]."""
        R, D, width = self.blocks, self.cfg.d_in, self.d_sae // self.blocks
        x, W, b = x.to(dtype), self.W_enc.to(dtype), self.b_enc.to(dtype)
        z = torch.empty(x.shape[0], self.d_sae, dtype=dtype, device=x.device)
        for r in range(R):  # each product writes its block of z in place
            block = slice(r * width, (r + 1) * width)
            torch.addmm(b[block], x[:, r * D : (r + 1) * D], W[:, block], out=z[:, block])
        return z

    def gather(self, z: Tensor, x: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
        """The pre-activations [N] of the pairs (rows, cols), differentiable in the encoder (`sparse.gather_pre`);
        z [B, F] from `pre_activations`, x [B, R·d_in] normalised."""
        b_pre = self.b_dec if self.cfg.apply_b_dec_to_input else None
        if not self.cfg.layered:
            return gather_pre(z, x, b_pre, self.W_enc, self.b_enc, rows, cols)
        x_sites = x.reshape(x.shape[0] * self.blocks, self.cfg.d_in)  # [B·R, d_in]: token b's site r is row b·R + r
        return gather_pre(z, x_sites, None, self.W_enc, self.b_enc, rows, cols, rows * self.blocks + self.latent_site(cols))

    def forward_normalised(self, x: Tensor) -> DictOutput:
        """Encode and decode normalised inputs x [B, R·d_in]; the reconstruction is [B, W·d_out], normalised."""
        z = self.pre_activations(x)
        rows, cols = self.activation.select(z)
        z_pairs = self.gather(z, x, rows, cols)
        active = Active(self.activation.values(z_pairs, cols), rows, cols, x.shape[0], self.d_sae)
        return DictOutput(self.decode_normalised(active, x), active, z_pairs)

    def decode_normalised(self, active: Active, x: Tensor | None = None) -> Tensor:
        """[B, W·d_out] from the active latents (and, with a skip connection, the normalised input x)."""
        out = sparse_decode(active, self.W_dec) + self.b_dec
        if self.W_skip is not None:
            if x is None:
                raise MechscopeError("a skip transcoder's decode needs the input it read")
            out = out + x @ self.W_skip
        return out

    # -- raw activations --------------------------------------------------------------------------

    def _flat_input(self, x: Tensor) -> tuple[Tensor, tuple[int, ...]]:
        """Raw x [..., R, d_in] (or [..., d_in] for one site) as [B, R·d_in], and the leading shape."""
        width = self.n_read * self.cfg.d_in
        if self.n_read > 1:
            if x.shape[-2:] != (self.n_read, self.cfg.d_in):
                raise MechscopeError(
                    f"input of shape {list(x.shape)} does not fit: expected [..., {self.n_read}, {self.cfg.d_in}]"
                )
            lead = x.shape[:-2]
        else:
            if x.shape[-1] != self.cfg.d_in:
                raise MechscopeError(f"input of width {x.shape[-1]} does not fit: this dictionary reads d_in={self.cfg.d_in}")
            lead = x.shape[:-1]
        return x.reshape(-1, width).to(self.W_enc.dtype) * self.input_scale, lead

    def encode(self, x: Tensor) -> Active:
        """The active latents of raw activations x [..., R, d_in] ([..., d_in] for one site), flattened to B tokens."""
        flat, _ = self._flat_input(x)
        return self.forward_normalised(flat).active

    def encode_dense(self, x: Tensor) -> Tensor:
        """Feature activations [..., F] of raw activations x (zeros where inactive)."""
        flat, lead = self._flat_input(x)
        return self.forward_normalised(flat).active.dense().reshape(*lead, self.d_sae)

    def decode(self, active: Active, x: Tensor | None = None) -> Tensor:
        """Raw reconstruction [B, W, d_out] ([B, d_out] for one site) of the active latents."""
        flat = None if x is None else self._flat_input(x)[0]
        out = self.decode_normalised(active, flat) / self.output_scale
        return (
            out.reshape(active.batch, self.n_write, self.cfg.d_out).squeeze(1)
            if self.n_write == 1
            else out.reshape(active.batch, self.n_write, self.cfg.d_out)
        )

    def forward(self, x: Tensor) -> DictOutput:
        """Encode and decode raw activations x [..., R, d_in]; the reconstruction is raw, [B, W, d_out]."""
        flat, _ = self._flat_input(x)
        out = self.forward_normalised(flat)
        recon = (out.recon / self.output_scale).reshape(-1, self.n_write, self.cfg.d_out)
        return DictOutput(recon, out.active, out.z_pairs)

    # -- normalisation folded into the weights ----------------------------------------------------

    @torch.no_grad()
    def folded(self) -> Dictionary:
        """A copy whose weights read and write raw activations (scales 1.0), with the same feature activations.

        With s the input scale and t the output scale (per site): W_enc·s, b_dec/t (which, for a
        dictionary that subtracts it from its input, has s = t), W_dec/t, W_skip·s/t.
        """
        cfg = dataclasses.replace(
            self.cfg,
            input_scale=[1.0] * self.n_read,
            output_scale=[1.0] * self.n_write,
            activation_options=self.activation.options(),
        )
        out = Dictionary(cfg).to(self.W_enc.device, self.W_enc.dtype)
        state = {k: v.clone() for k, v in self.state_dict().items() if k not in ("input_scale", "output_scale")}
        s, t = self.input_scale, self.output_scale
        if self.cfg.layered:  # latent j reads site j // (F/R): its column takes that site's scale
            per_latent = torch.tensor(self.cfg.input_scale, device=s.device).repeat_interleave(self.d_sae // self.blocks)
            state["W_enc"] = self.W_enc * per_latent[None, :]
        else:
            state["W_enc"] = self.W_enc * s[:, None]
        state["W_dec"] = self.W_dec / t
        state["b_dec"] = self.b_dec / t
        if self.W_skip is not None:
            state["W_skip"] = self.W_skip * s[:, None] / t
        out.load_state_dict(state, strict=False)
        return out.train(self.training)
