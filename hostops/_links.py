"""The label links of a ``LabelShortcut``: for each input feature, the labels it co-occurs
with most often in the training rows."""
from __future__ import annotations

import numba as nb
import numpy as np

_FEATURES_PER_TASK = 512


@nb.njit(cache=True, parallel=True)
def top_label_links(feature_indptr, feature_rows, label_indptr, label_ids, num_labels,
                    per_feature):
  """(links, counts) int32 ``[D, per_feature]``: row ``f`` of ``links`` holds the labels of the
  rows that contain feature ``f``, most frequent first (ties: lower id first), -1 past the
  distinct ones; ``counts`` how many of those rows hold each (0 past the distinct ones).

  ``feature_indptr int64[D+1]`` / ``feature_rows int32[nnz]``: the rows of each feature (the
  feature-major transpose of the data); ``label_indptr int64[N+1]`` / ``label_ids int32``:
  each row's labels. Each task counts into its own ``[num_labels]`` buffer and clears only
  what it touched.
  """
  num_features = feature_indptr.shape[0] - 1
  out = np.full((num_features, per_feature), -1, np.int32)
  out_counts = np.zeros((num_features, per_feature), np.int32)
  num_tasks = (num_features + _FEATURES_PER_TASK - 1) // _FEATURES_PER_TASK
  for task in nb.prange(num_tasks):
    counts = np.zeros(num_labels, np.int64)
    touched = np.empty(num_labels, np.int64)
    for f in range(task * _FEATURES_PER_TASK,
                   min(num_features, (task + 1) * _FEATURES_PER_TASK)):
      num_touched = 0
      for i in range(feature_indptr[f], feature_indptr[f + 1]):
        row = feature_rows[i]
        for j in range(label_indptr[row], label_indptr[row + 1]):
          label = label_ids[j]
          if counts[label] == 0:
            touched[num_touched] = label
            num_touched += 1
          counts[label] += 1
      keys = np.empty(num_touched, np.int64)   # most frequent first, then lower id
      for t in range(num_touched):
        keys[t] = -counts[touched[t]] * num_labels + touched[t]
      order = np.argsort(keys)
      for t in range(min(per_feature, num_touched)):
        out[f, t] = touched[order[t]]
        out_counts[f, t] = counts[touched[order[t]]]
      for t in range(num_touched):
        counts[touched[t]] = 0
  return out, out_counts
