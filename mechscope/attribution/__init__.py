"""Attribution: which heads and neurons write a prediction, and what changing them does."""

from mechscope.attribution.dla import Attribution, direct_logit_attribution

__all__ = ["Attribution", "direct_logit_attribution"]
