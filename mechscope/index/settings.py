"""How an index is built, and the checks its settings pass before any work starts.

`IndexSettings` checks what it can alone (whole numbers, signs, sizes the database can hold);
`check_against` checks what needs the model and the corpus: a context fits the model, and the corpus
holds the contexts asked for. It finds that out by packing the corpus up to there without running
the model (tokenising is a small part of a build: the built-in corpus packs whole in about a second).

Each failure is a `SettingError` that names the setting, the value and the valid range, on one line;
the command line words it with its own option names (`--ctx-len` for `ctx_len`).
"""

from __future__ import annotations

from dataclasses import dataclass

from mechscope.data import pack
from mechscope.errors import MechscopeError

MAX_CTX_LEN = 2**15 - 1  # positions are stored as SMALLINT
MAX_CONTEXTS = 2**31 - 1  # context numbers are stored as INTEGER
MAX_BATCH_SIZE = 1024
MAX_K = 1024  # top examples per unit: 46,080 neurons x 1,024 x 54 bytes is 2.5 GB of state
MAX_SAMPLES = 1024  # samples per range per unit


class SettingError(MechscopeError):
    """A setting out of its range: `setting` names it, `worded(name)` says so with another name for it."""

    def __init__(self, setting: str, value, valid: str, why: str = ""):
        self.setting, self.value, self.valid, self.why = setting, value, valid, why
        super().__init__(self.worded(setting))

    def worded(self, name: str) -> str:
        return f"{name} {self.value} is out of range: valid values are {self.valid}" + (f" ({self.why})" if self.why else "")


@dataclass(frozen=True)
class IndexSettings:
    """How an index is built. Raises `SettingError` for a value out of range."""

    corpus: str | None = None
    """Corpus spec: None for the built-in CPython documentation, a .txt/.jsonl/.parquet file or folder, or hf:NAME."""
    field: str = "text"
    """Text field of JSONL records or Parquet rows."""
    tokens: int = 100_000
    """Tokens to read (rounded up to whole contexts), when `contexts` is not given; at most what the corpus holds."""
    ctx_len: int = 128
    """Tokens per context, the start token included: skip + 1 .. the model's context."""
    batch_size: int = 8
    """Contexts per forward pass: 1..1024."""
    k: int = 20
    """Top examples kept per unit: 1..1024."""
    n_samples: int = 5
    """Samples kept per range of activation per unit: 1..1024."""
    threshold: float = 0.0
    """A token counts towards a unit's density when its activation is above this."""
    seed: int = 0
    """Shuffle seed of the corpus's documents, and of the samples' priorities."""
    skip: int = 4
    """Positions at the start of each context that are not scored: the start token and the first text tokens."""
    contexts: tuple[int, int] | None = None
    """Build only contexts start..stop-1 (a shard); start must be a multiple of batch_size."""

    def __post_init__(self):
        for name in ("tokens", "ctx_len", "batch_size", "k", "n_samples", "seed", "skip"):
            object.__setattr__(self, name, _whole(name, getattr(self, name)))
        if not 1 <= self.skip < MAX_CTX_LEN:
            raise SettingError("skip", self.skip, f"1..{MAX_CTX_LEN - 1}", "positions not scored, the start token included")
        if not self.skip < self.ctx_len <= MAX_CTX_LEN:
            why = f"tokens per context: the first {self.skip} positions are not scored; at most the model's context"
            raise SettingError("ctx_len", self.ctx_len, f"{self.skip + 1}..{MAX_CTX_LEN}", why)
        for name, top in (("batch_size", MAX_BATCH_SIZE), ("k", MAX_K), ("n_samples", MAX_SAMPLES)):
            if not 1 <= getattr(self, name) <= top:
                raise SettingError(name, getattr(self, name), f"1..{top}")
        if self.tokens < 1:
            raise SettingError("tokens", self.tokens, "1 up to what the corpus holds")
        if not 0 <= self.seed < 2**63:
            raise SettingError("seed", self.seed, f"0..{2**63 - 1}")
        if self.contexts is not None:
            self._check_contexts()

    def _check_contexts(self) -> None:
        start, stop = (_whole("contexts", x) for x in self.contexts)
        if not 0 <= start < stop <= MAX_CONTEXTS:
            raise SettingError("contexts", f"{start}:{stop}", f"START:STOP with 0 <= START < STOP <= {MAX_CONTEXTS}")
        if start % self.batch_size:
            valid = f"START:STOP with START a multiple of the batch size {self.batch_size}"
            raise SettingError("contexts", f"{start}:{stop}", valid)
        object.__setattr__(self, "contexts", (start, stop))

    def context_range(self) -> tuple[int, int]:
        """(start, stop): the contexts this build covers."""
        return self.contexts or (0, -(-self.tokens // self.ctx_len))


def _whole(name: str, value) -> int:
    """`value` as an int: ints as they are, floats only when whole (1e6); one line for anything else."""
    if isinstance(value, bool) or not isinstance(value, int | float) or value != value or abs(value) == float("inf"):
        raise MechscopeError(f"{name} must be a whole number, got {value!r}")
    if isinstance(value, float) and not value.is_integer():
        raise MechscopeError(f"{name} must be a whole number, got {value!r}")
    return int(value)


def check_against(settings: IndexSettings, model, source) -> None:
    """Check the settings against the model (context length) and the corpus `source` (enough contexts).

    Raises `SettingError` naming `ctx_len`, `tokens` or `contexts`; reads the corpus up to the last
    context asked for, with the model's tokenizer.
    """
    n_ctx = min(model.n_ctx, MAX_CTX_LEN)
    if settings.ctx_len > n_ctx:
        why = f"{model.name}'s context is {model.n_ctx:,} tokens"
        raise SettingError("ctx_len", settings.ctx_len, f"{settings.skip + 1}..{n_ctx}", why)
    start, stop = settings.context_range()
    held = corpus_contexts(source, model.tokenizer, settings, limit=min(stop, MAX_CONTEXTS))
    if held >= stop:
        return
    length = settings.ctx_len
    holds = f"the corpus {source.id} holds {held * length:,} tokens: {held:,} contexts of {length}"
    if held == MAX_CONTEXTS:
        holds = f"an index holds at most {MAX_CONTEXTS:,} contexts"
    if settings.contexts is not None:
        raise SettingError("contexts", f"{start}:{stop}", f"START:STOP within 0:{held}", holds)
    raise SettingError("tokens", settings.tokens, f"1..{held * length:,}", holds)


def corpus_contexts(source, tokenizer, settings: IndexSettings, limit: int) -> int:
    """How many contexts the corpus packs into, counting no further than `limit`."""
    held = 0
    for batch in pack(source, tokenizer, settings.ctx_len, seed=settings.seed, batch_size=256, max_contexts=limit):
        held += len(batch.tokens)
    return held
