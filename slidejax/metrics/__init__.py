"""Ranking metrics for extreme classification: P@k, nDCG@k, PSP@k."""

from slidejax.metrics._metrics import evaluate
from slidejax.metrics._metrics import ndcg_at_k
from slidejax.metrics._metrics import precision_at_k
from slidejax.metrics._metrics import propensities
from slidejax.metrics._metrics import psprecision_at_k
