"""Label links of a data set: which labels each input feature co-occurs with most."""
from __future__ import annotations

import numpy as np

import hostops
from slidejax.data._xc import XCData


def label_links(data: XCData, per_feature: int) -> tuple[np.ndarray, np.ndarray]:
  """What :class:`slidejax.nn.LabelShortcut` links (build it from training rows only).

  Returns:
    links: int32 ``[num_features, per_feature]``: for each feature, the labels of the rows
      that hold it, most frequent first (ties: lower id first), -1 past the distinct ones.
    shares: float32, same shape: ``count(f, l) / (rows holding f + 1)``, the smoothed share
      of feature ``f``'s rows that carry label ``l`` (0 past the distinct ones).
  """
  if isinstance(per_feature, bool) or not isinstance(per_feature, (int, np.integer)) or \
      per_feature <= 0:
    raise ValueError(f"per_feature must be a positive integer, got {per_feature!r}")
  row_of = np.repeat(np.arange(data.num_points, dtype=np.int32),
                     np.diff(data.feature_indptr))
  order = np.argsort(data.feature_ids, kind="stable")   # feature-major: rows of each feature
  feature_indptr = np.zeros(data.num_features + 1, np.int64)
  np.cumsum(np.bincount(data.feature_ids, minlength=data.num_features),
            out=feature_indptr[1:])
  links, counts = hostops.top_label_links(feature_indptr, row_of[order],
                                         np.asarray(data.label_indptr, np.int64),
                                         np.asarray(data.label_ids, np.int32),
                                         data.num_labels, int(per_feature))
  rows_with = np.diff(feature_indptr).astype(np.float32)
  return links, (counts / (rows_with[:, None] + 1.0)).astype(np.float32)
