"""Layers: pure functions over active sets, and Flax NNX modules."""

from slidejax.nn._functional import PAD_LOGIT
from slidejax.nn._functional import embedding_bag
from slidejax.nn._functional import gather_rows
from slidejax.nn._functional import per_sample_label_slots
from slidejax.nn._functional import per_sample_logits
from slidejax.nn._functional import shared_label_slots
from slidejax.nn._functional import shared_logits
from slidejax.nn._functional import softmax_cross_entropy
from slidejax.nn._functional import target_distribution
from slidejax.nn._functional import top_k_chunked
from slidejax.nn._functional import unique_with_inverse
from slidejax.nn._init import lecun_rows
from slidejax.nn._init import row_chunked
from slidejax.nn._models import DenseMLP
from slidejax.nn._models import SlideMLP
from slidejax.nn._models import dense_softmax_loss
from slidejax.nn._models import sampled_softmax_loss
from slidejax.nn._slide_dense import SlideDense
from slidejax.nn._slide_dense import SlideOutput
from slidejax.nn._sparse_input import SparseInput
from slidejax.nn._variables import ActiveIds
from slidejax.nn._variables import HashParams
from slidejax.nn._variables import HashTables
from slidejax.nn._variables import RowDelta
from slidejax.nn._variables import RowParam
