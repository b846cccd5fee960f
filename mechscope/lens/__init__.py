"""Next-token distributions and the logit lens."""

from mechscope.lens.logit_lens import LensResult, logit_lens
from mechscope.lens.predict import Prediction, TargetScore, TokenProb, predict

__all__ = ["LensResult", "Prediction", "TargetScore", "TokenProb", "logit_lens", "predict"]
