"""Evaluating a dictionary on held-out text: reconstruction, sparsity, and the model's own loss with it spliced in.

Definitions (each over the evaluated tokens, positions `skip`.. of every context; the first positions,
attention sinks with outlier norms, are left out of every figure and kept clean in every forward pass):

- FVU = Σ‖x − x̂‖² / Σ‖x − x̄‖², pooled over tokens, per written site and over all of them; explained
  variance = 1 − FVU.
- L0: active latents per token, averaged.
- dead fraction: latents that never fire on the evaluated tokens; dense fractions: latents firing on
  more than 1 % / 10 % of them. `density` holds each latent's firing fraction (for the histogram).
- CE: next-token cross-entropy (nats per token) of the clean model, of the model with the
  reconstruction written at every written site at once (the replacement model for transcoders), and with
  those sites zero-ablated (or mean-ablated: the site's mean over the evaluated tokens of each batch).
  delta CE = CE_spliced − CE_clean; CE-loss recovered = (CE_ablated − CE_spliced) / (CE_ablated − CE_clean).
- KL = KL(p_clean ‖ p_spliced) of the next-token distributions, per token, averaged.
- sites carrying a latent (several written sites only): the fewest of its written sites whose squared
  decoder norms hold 80 % of its total, counted over the latents that fired on the evaluated tokens: 1 for
  a feature of one layer, up to W for one spread over every layer (cross-layer superposition, Lindsey et
  al. 2024). Latents that never fired are left out: their decoder rows are still about where they started
  (random, spread evenly over the sites), and would read as spread features.

FVU is computed from the clean forward pass's reads. For CE and KL, a dictionary that reconstructs what
it reads (SAE, crosscoder) is spliced from those clean reads in a second pass, so a crosscoder, which
reads layers after the first one it writes, is spliced in as it was trained. Transcoders and cross-layer
transcoders are spliced as a *replacement model*: each covered MLP's output is replaced by the
dictionary's output computed from what that same pass reads, so that errors of earlier layers flow into
later ones, as they would in a model whose MLPs were the dictionary (`replacement_writes`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from mechscope.data import corpus, held_out, pack
from mechscope.dictionaries.dictionary import Dictionary
from mechscope.errors import MechscopeError
from mechscope.runtime import progress

ABLATIONS = ("zero", "mean")


@dataclass
class EvalResult:
    tokens: int
    """Tokens evaluated (skipped positions excluded)."""
    fvu: float
    fvu_per_site: list[float]
    l0: float
    dead_fraction: float
    dense_1pct: float
    dense_10pct: float
    ce_clean: float
    ce_spliced: float
    ce_ablated: float
    ablation: str
    ce_recovered: float
    delta_ce: float
    kl: float
    skip: int
    """The first positions of each context, left out of every figure."""
    density: list[float]
    """Each latent's firing fraction."""
    sites_carrying: list[int] | None = None
    """For a dictionary that writes several sites: how many of the latents that fired need 1, 2, ..., W of
    their written sites to hold PROFILE_SHARE of their squared decoder norm (`sites_carrying`); None for one
    written site."""

    def summary(self) -> dict:
        """Every figure but the per-latent densities."""
        return {k: v for k, v in asdict(self).items() if k != "density"}


PROFILE_SHARE = 0.8


def sites_carrying(profile: Tensor, share: float = PROFILE_SHARE) -> Tensor:
    """[F] int64: for each latent of a decoder profile [F, W] (`Dictionary.decoder_profile`), the fewest
    written sites whose squared decoder norms hold `share` of its total. 1 is a feature of one layer;
    W is one spread over all of them (cross-layer superposition, Lindsey et al. 2024)."""
    energy = profile.double().pow(2).sort(dim=-1, descending=True).values
    held = energy.cumsum(-1) / energy.sum(-1, keepdim=True).clamp_min(1e-30)
    return (held < share - 1e-12).sum(-1) + 1


def _ce_and_kl(logits: Tensor, clean_logp: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """(summed CE of `targets`, summed KL(clean ‖ these)) over the positions given; logits [N, V]."""
    logp = logits.float().log_softmax(-1)
    ce = -logp.gather(-1, targets[:, None]).sum()
    kl = (clean_logp.exp() * (clean_logp - logp)).sum()
    return ce, kl


@torch.no_grad()
def evaluate_dictionary(
    model,
    dictionary: Dictionary,
    text: str | None = "builtin:all",
    tokens: int = 32_768,
    ctx_len: int = 128,
    batch_contexts: int = 8,
    ablation: str = "zero",
    seed: int = 0,
    show_progress: bool = False,
) -> EvalResult:
    """Evaluate `dictionary` on `model` over held-out documents of the corpus `text` (every 20th document,
    the ones training leaves out), `tokens` rounded up to whole contexts of `ctx_len` − skip positions. See the
    module docstring for each figure's definition."""
    if ablation not in ABLATIONS:
        raise MechscopeError(f"unknown ablation {ablation!r}: valid ablations are zero, mean")
    if not isinstance(tokens, int) or tokens < 1:
        raise MechscopeError(f"tokens={tokens!r} is invalid: give a positive number of tokens")
    cfg, skip = dictionary.cfg, max(dictionary.cfg.skip_positions, 1)
    reads, writes = list(cfg.read_sites), list(cfg.write_sites)
    _, eval_text = held_out(corpus(text))
    contexts = -(-tokens // (ctx_len - skip))
    dictionary = dictionary.eval()
    sums = {"err": torch.zeros(len(writes), dtype=torch.float64), "sq": torch.zeros(len(writes), dtype=torch.float64),
            "sum": torch.zeros(len(writes), cfg.d_out, dtype=torch.float64)}  # fmt: skip
    fired = torch.zeros(cfg.d_sae, dtype=torch.float64)
    totals = dict.fromkeys(("n", "l0", "ce_clean", "ce_spliced", "ce_ablated", "kl", "ce_n"), 0.0)
    batches = pack(eval_text, model.tokenizer, ctx_len, seed=seed, batch_size=batch_contexts, max_contexts=contexts)
    with progress("eval", show=show_progress) as bar:
        task = bar.add_task("eval", total=contexts)
        for batch in batches:
            ids = batch.tokens.to(model.device)
            clean = model.run(ids, read=list(dict.fromkeys(reads + writes)), logits=True)
            x_read = torch.stack([clean.cache[s][:, skip:] for s in reads], dim=2)  # [n, L-skip, R, d]
            x_write = torch.stack([clean.cache[s][:, skip:] for s in writes], dim=2).double()
            n, length = x_read.shape[:2]
            out = dictionary(x_read.reshape(n * length, len(reads), -1).squeeze(1) if len(reads) == 1 else x_read.flatten(0, 1))
            recon = out.recon.reshape(n, length, len(writes), -1)
            sums["err"] += (x_write - recon.double()).pow(2).sum(dim=(0, 1, 3))
            sums["sq"] += x_write.pow(2).sum(dim=(0, 1, 3))
            sums["sum"] += x_write.sum(dim=(0, 1))
            totals["n"] += n * length
            totals["l0"] += float(out.active.l0().sum())
            fired += torch.bincount(out.active.cols[out.active.values > 0], minlength=cfg.d_sae).double()

            means = x_write.mean(dim=(0, 1))[None, None].expand_as(x_write) if ablation == "mean" else torch.zeros_like(x_write)
            splice = _splice(writes, recon, skip) if cfg.reconstructs else replacement_writes(dictionary, skip)
            spliced = model.run(ids, write=splice, logits=True).logits
            ablated = model.run(ids, write=_splice(writes, means, skip), logits=True).logits
            targets = ids[:, skip + 1 :].reshape(-1)  # positions skip..L-2 predict skip+1..L-1
            pick = slice(skip, ids.shape[1] - 1)
            clean_logp = clean.logits[:, pick].flatten(0, 1).float().log_softmax(-1)
            ce_clean = -clean_logp.gather(-1, targets[:, None]).sum()
            ce_spliced, kl = _ce_and_kl(spliced[:, pick].flatten(0, 1), clean_logp, targets)
            ce_ablated, _ = _ce_and_kl(ablated[:, pick].flatten(0, 1), clean_logp, targets)
            for key, value in (("ce_clean", ce_clean), ("ce_spliced", ce_spliced), ("ce_ablated", ce_ablated), ("kl", kl)):
                totals[key] += float(value)
            totals["ce_n"] += len(targets)
            bar.update(task, advance=n)
    if totals["n"] == 0:
        raise MechscopeError(f"corpus {text!r} held out no text to evaluate on")
    N = totals["n"]
    variance = sums["sq"] - sums["sum"].pow(2).sum(-1) / N
    per_site = (sums["err"] / variance).tolist()
    density = (fired / N).tolist()
    ce = {k: totals[k] / totals["ce_n"] for k in ("ce_clean", "ce_spliced", "ce_ablated", "kl")}
    gap = ce["ce_ablated"] - ce["ce_clean"]
    carrying = None
    if dictionary.n_write > 1:
        alive = dictionary.decoder_profile()[fired > 0]
        counts = torch.bincount(sites_carrying(alive), minlength=dictionary.n_write + 1)
        carrying = counts[1:].tolist()
    return EvalResult(
        tokens=int(N), fvu=float(sums["err"].sum() / variance.sum()), fvu_per_site=per_site, l0=totals["l0"] / N,
        dead_fraction=float((fired == 0).double().mean()), dense_1pct=float((fired / N > 0.01).double().mean()),
        dense_10pct=float((fired / N > 0.1).double().mean()), ce_clean=ce["ce_clean"], ce_spliced=ce["ce_spliced"],
        ce_ablated=ce["ce_ablated"], ablation=ablation,
        ce_recovered=(ce["ce_ablated"] - ce["ce_spliced"]) / gap if gap else float("nan"),
        delta_ce=ce["ce_spliced"] - ce["ce_clean"], kl=ce["kl"], skip=skip, density=density, sites_carrying=carrying,
    )  # fmt: skip


def replacement_writes(dictionary: Dictionary, skip: int = 0) -> dict:
    """Writes for `model.run(..., write=)` that replace every site `dictionary` writes (positions skip..)
    by its output computed from the sites it reads in the same forward pass: the replacement model of a
    transcoder or cross-layer transcoder. A CLT's write site w needs only read sites 0..w, which come
    before it; a dictionary that would write before it has read raises `MechscopeError` when run."""
    cfg = dictionary.cfg
    reads: dict[str, Tensor] = {}
    edits = {}
    for site in cfg.read_sites:

        def record(x: Tensor, site=site) -> Tensor:
            reads[site] = x[:, skip:]
            return x

        edits[site] = record
    for w, site in enumerate(cfg.write_sites):

        def replace(x: Tensor, w=w, site=site) -> Tensor:
            needed = cfg.read_sites[: w + 1] if cfg.layered else cfg.read_sites
            if missing := [s for s in needed if s not in reads]:
                raise MechscopeError(f"the dictionary writes {site} before it reads {missing[0]}: it cannot replace it")
            value = reads[needed[0]]
            inputs = torch.stack([reads.get(s, torch.zeros_like(value)) for s in cfg.read_sites], dim=2).float()
            n, length = inputs.shape[:2]
            flat = inputs.flatten(0, 1) if len(cfg.read_sites) > 1 else inputs.flatten(0, 1).squeeze(1)
            recon = dictionary(flat).recon[:, w].reshape(n, length, -1)  # blocks after w write nothing here
            x = x.clone()
            x[:, skip:] = recon.to(x.dtype)
            return x

        edits[site] = replace
    return edits


def _splice(sites: list[str], values: Tensor, skip: int) -> dict:
    """Writes putting values[:, :, i] [n, L-skip, d] at positions skip.. of sites[i]."""
    return {s: _write_from(skip, values[:, :, i]) for i, s in enumerate(sites)}


def _write_from(skip: int, value: Tensor):
    """A write replacing a site's positions skip.. with `value` [n, L-skip, d] (the first positions stay clean)."""

    def write(x: Tensor) -> Tensor:
        x = x.clone()
        x[:, skip:] = value.to(x.dtype)
        return x

    return write
