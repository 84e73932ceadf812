"""Numba kernels that parse and format sparse multi-label text files.

The reader is two passes over the file's bytes (``uint8[n]``) with the same kernel,
:func:`scan_sparse_lines`: the first pass (``fill=False``) validates and counts rows,
feature entries and labels; the second (``fill=True``) writes into exactly-sized arrays.

Line grammar (one line is one row; ``\\r`` and tabs count as spaces)::

  line    := [labels] (' '+ feature)* ' '*
  labels  := id (',' id)*        -- only at the very start of a line
  feature := id ':' float

A line that starts with a space has no labels. Errors are returned as a code and the byte
offset where they were found; the Python wrapper turns the offset into a line number.
"""
from __future__ import annotations

import numba as nb
import numpy as np

OK = 0
ERR_TOKEN = 1
ERR_NEGATIVE_ID = 2
ERR_FEATURE_RANGE = 3
ERR_LABEL_RANGE = 4
ERR_NONFINITE = 5
ERR_UNEXPECTED_LABELS = 6
ERR_CHANGED = 7

ERROR_MESSAGES = {
    ERR_TOKEN: "unparsable token",
    ERR_NEGATIVE_ID: "negative id",
    ERR_FEATURE_RANGE: "feature id out of range",
    ERR_LABEL_RANGE: "label id out of range",
    ERR_NONFINITE: "value is NaN or infinite (or overflows float32)",
    ERR_UNEXPECTED_LABELS: "a label list where only id:value tokens are allowed",
    ERR_CHANGED: "the file changed while it was being read",
}

_POW10 = np.array([10.0**e for e in range(309)], dtype=np.float64)
_ID_LIMIT = 2**31 - 1
_NEWLINE, _SPACE, _TAB, _CR = 10, 32, 9, 13
_COMMA, _COLON, _DOT, _MINUS, _PLUS = 44, 58, 46, 45, 43


@nb.njit(cache=True, inline="always")
def _is_blank(c):
  return c == _SPACE or c == _TAB or c == _CR


@nb.njit(cache=True, inline="always")
def _is_digit(c):
  return 48 <= c <= 57


@nb.njit(cache=True)
def _scale(mantissa, exp10):
  """float64 of ``mantissa * 10**exp10`` (mantissa is a non-negative int64)."""
  if mantissa == 0:
    return 0.0
  m = np.float64(mantissa)
  if exp10 >= 0:
    if exp10 > 308:
      return np.inf
    return m * _POW10[exp10]
  if exp10 >= -308:
    return m / _POW10[-exp10]
  rest = -exp10 - 308
  if rest > 308:
    return 0.0
  return (m / _POW10[308]) / _POW10[rest]


@nb.njit(cache=True)
def _parse_float(buf, i, n):
  """(next offset, float32 value, status) for the number starting at ``buf[i]``.

  Accepts ``[+-]digits[.digits][(e|E)[+-]digits]`` (either side of the dot may be empty,
  not both). Keeps 18 significant digits, then rounds the float64 result to float32.
  """
  negative = False
  if i < n and (buf[i] == _MINUS or buf[i] == _PLUS):
    negative = buf[i] == _MINUS
    i += 1
  if i < n and (buf[i] | 32) in (105, 110):  # 'i'/'n': inf, nan
    while i < n and (97 <= (buf[i] | 32) <= 122):
      i += 1
    return i, np.float32(0.0), ERR_NONFINITE
  mantissa = np.int64(0)
  significant = 0
  exp10 = 0
  any_digit = False
  while i < n and _is_digit(buf[i]):
    any_digit = True
    if significant < 18:
      mantissa = mantissa * 10 + (buf[i] - 48)
      if mantissa > 0:
        significant += 1
    else:
      exp10 += 1
    i += 1
  if i < n and buf[i] == _DOT:
    i += 1
    while i < n and _is_digit(buf[i]):
      any_digit = True
      if significant < 18:
        mantissa = mantissa * 10 + (buf[i] - 48)
        if mantissa > 0:
          significant += 1
        exp10 -= 1
      i += 1
  if not any_digit:
    return i, np.float32(0.0), ERR_TOKEN
  if i < n and (buf[i] | 32) == 101:  # 'e' / 'E'
    i += 1
    exp_negative = False
    if i < n and (buf[i] == _MINUS or buf[i] == _PLUS):
      exp_negative = buf[i] == _MINUS
      i += 1
    if i >= n or not _is_digit(buf[i]):
      return i, np.float32(0.0), ERR_TOKEN
    e = 0
    while i < n and _is_digit(buf[i]):
      if e < 100000:
        e = e * 10 + (buf[i] - 48)
      i += 1
    exp10 += -e if exp_negative else e
  value = np.float32(_scale(mantissa, exp10))
  if np.isinf(value):
    return i, value, ERR_NONFINITE
  return i, (-value if negative else value), OK


@nb.njit(cache=True)
def _parse_id(buf, i, n):
  """(next offset, id, number of digits, negative) for ``[+-]digits`` at ``buf[i]``."""
  negative = False
  if i < n and (buf[i] == _MINUS or buf[i] == _PLUS):
    negative = buf[i] == _MINUS
    i += 1
  value = np.int64(0)
  digits = 0
  while i < n and _is_digit(buf[i]):
    if value <= _ID_LIMIT:
      value = value * 10 + (buf[i] - 48)
    digits += 1
    i += 1
  return i, value, digits, negative


@nb.njit(cache=True)
def scan_sparse_lines(buf, start, num_features, num_labels, allow_labels, fill,
                      feature_indptr, feature_ids, feature_values, label_indptr, label_ids):
  """Validates (``fill=False``) or parses (``fill=True``) the rows in ``buf[start:]``.

  Args:
    buf: uint8[n], the file's bytes.
    start: offset of the first data line (after the header, if any).
    num_features, num_labels: declared dimensions; ``-1`` means unknown (no range check).
    allow_labels: whether a leading ``l1,l2,...`` list is allowed.
    fill: write into the output arrays (sized from the first pass) or only count.
    feature_indptr: int64[rows + 1]; feature_ids: int32[nnz]; feature_values: float32[nnz];
      label_indptr: int64[rows + 1]; label_ids: int32[labels] (ignored unless ``fill``).

  Returns:
    ``(error code, error offset, rows, nnz, labels, max feature id, max label id)``.
  """
  n = buf.shape[0]
  i = start
  rows = 0
  nnz = 0
  nlab = 0
  max_feature = -1
  max_label = -1
  while i < n:
    labels_allowed = not (_is_blank(buf[i]) or buf[i] == _NEWLINE)
    while True:
      while i < n and _is_blank(buf[i]):
        i += 1
      if i >= n or buf[i] == _NEWLINE:
        break
      token = i
      i, ident, digits, negative = _parse_id(buf, i, n)
      if digits == 0:
        return ERR_TOKEN, token, rows, nnz, nlab, max_feature, max_label
      c = buf[i] if i < n else _NEWLINE
      if c == _COLON:
        i, value, status = _parse_float(buf, i + 1, n)
        if status != OK:
          return status, token, rows, nnz, nlab, max_feature, max_label
        if i < n and not (_is_blank(buf[i]) or buf[i] == _NEWLINE):
          return ERR_TOKEN, token, rows, nnz, nlab, max_feature, max_label
        if negative:
          return ERR_NEGATIVE_ID, token, rows, nnz, nlab, max_feature, max_label
        if ident > _ID_LIMIT or (num_features >= 0 and ident >= num_features):
          return ERR_FEATURE_RANGE, token, rows, nnz, nlab, max_feature, max_label
        if fill:
          if nnz >= feature_ids.shape[0]:
            return ERR_CHANGED, token, rows, nnz, nlab, max_feature, max_label
          feature_ids[nnz] = ident
          feature_values[nnz] = value
        nnz += 1
        max_feature = max(max_feature, ident)
        labels_allowed = False
      elif labels_allowed and (c == _COMMA or c == _NEWLINE or _is_blank(c)):
        if not allow_labels:
          return ERR_UNEXPECTED_LABELS, token, rows, nnz, nlab, max_feature, max_label
        if negative:
          return ERR_NEGATIVE_ID, token, rows, nnz, nlab, max_feature, max_label
        if ident > _ID_LIMIT or (num_labels >= 0 and ident >= num_labels):
          return ERR_LABEL_RANGE, token, rows, nnz, nlab, max_feature, max_label
        if fill:
          if nlab >= label_ids.shape[0]:
            return ERR_CHANGED, token, rows, nnz, nlab, max_feature, max_label
          label_ids[nlab] = ident
        nlab += 1
        max_label = max(max_label, ident)
        if c == _COMMA:
          i += 1
          if i >= n or not (_is_digit(buf[i]) or buf[i] == _MINUS or buf[i] == _PLUS):
            return ERR_TOKEN, i, rows, nnz, nlab, max_feature, max_label
        else:
          labels_allowed = False
      else:
        return ERR_TOKEN, token, rows, nnz, nlab, max_feature, max_label
    rows += 1
    if fill:
      if rows >= feature_indptr.shape[0]:
        return ERR_CHANGED, i, rows, nnz, nlab, max_feature, max_label
      feature_indptr[rows] = nnz
      label_indptr[rows] = nlab
    if i < n:  # at a newline
      i += 1
  return OK, -1, rows, nnz, nlab, max_feature, max_label


@nb.njit(cache=True, inline="always")
def _marker_fits(dim, num_ids):
  """Whether a dense per-id marker array (int64[dim]) is affordable next to the data."""
  return dim <= 4 * num_ids + 4096


@nb.njit(cache=True)
def count_duplicate_ids(indptr, ids, dim):
  """(rows with a repeated id, repeated entries, first such row or -1) of a CSR matrix.

  Uses an int64[dim] marker when ``dim`` is at most ~4x the number of ids, else sorts each
  row in a scratch buffer (so a huge declared dimension costs no memory).
  """
  num_rows = indptr.shape[0] - 1
  use_marker = _marker_fits(dim, ids.shape[0])
  seen = np.full(max(dim, 1) if use_marker else 1, -1, np.int64)
  longest = 0
  if not use_marker:
    for r in range(num_rows):
      longest = max(longest, indptr[r + 1] - indptr[r])
  scratch = np.empty(longest, ids.dtype)
  rows_hit = 0
  repeats = 0
  first = -1
  for r in range(num_rows):
    row_repeats = 0
    if use_marker:
      for j in range(indptr[r], indptr[r + 1]):
        if seen[ids[j]] == r:
          row_repeats += 1
        seen[ids[j]] = r
    else:
      n = indptr[r + 1] - indptr[r]
      row = scratch[:n]
      row[:] = ids[indptr[r]:indptr[r + 1]]
      row.sort()
      for j in range(1, n):
        if row[j] == row[j - 1]:
          row_repeats += 1
    if row_repeats:
      rows_hit += 1
      repeats += row_repeats
      if first < 0:
        first = r
  return rows_hit, repeats, first


@nb.njit(cache=True)
def merge_duplicate_ids(indptr, ids, values, dim):
  """CSR with repeated ids in a row merged into their first position, values summed.

  Returns ``(indptr int64[rows+1], ids int32[m], values float32[m])``.
  """
  use_marker = _marker_fits(dim, ids.shape[0])
  size = max(dim, 1) if use_marker else 1
  slot = np.full(size, -1, np.int64)
  owner = np.full(size, -1, np.int64)
  out_indptr = np.zeros(indptr.shape[0], np.int64)
  out_ids = np.empty(ids.shape[0], np.int32)
  out_values = np.empty(ids.shape[0], np.float32)
  m = 0
  for r in range(indptr.shape[0] - 1):
    row_start = m
    for j in range(indptr[r], indptr[r + 1]):
      f = ids[j]
      found = -1
      if use_marker:
        if owner[f] == r:
          found = slot[f]
        else:
          owner[f] = r
          slot[f] = m
      else:
        for k in range(row_start, m):
          if out_ids[k] == f:
            found = k
            break
      if found >= 0:
        out_values[found] += values[j]
      else:
        out_ids[m] = f
        out_values[m] = values[j]
        m += 1
    out_indptr[r + 1] = m
  return out_indptr, out_ids[:m].copy(), out_values[:m].copy()


@nb.njit(cache=True)
def _write_uint(out, pos, value):
  if value == 0:
    out[pos] = 48
    return pos + 1
  digits = 0
  v = value
  while v > 0:
    digits += 1
    v //= 10
  end = pos + digits
  v = value
  for k in range(end - 1, pos - 1, -1):
    out[k] = 48 + v % 10
    v //= 10
  return end


@nb.njit(cache=True)
def _write_float(out, pos, value):
  """Writes the shortest decimal (<= 9 significant digits) that reads back as ``value``."""
  if value == 0:
    out[pos] = 48
    return pos + 1
  if value < 0:
    out[pos] = _MINUS
    pos += 1
    value = -value
  x = np.float64(value)
  e = int(np.floor(np.log10(x)))
  if _scale(1, e) > x:
    e -= 1
  elif _scale(1, e + 1) <= x:
    e += 1
  mantissa = np.int64(0)
  ndigits = 9
  for nd in range(1, 10):
    q = e - nd + 1
    scaled = x / _POW10[q] if q >= 0 else x * _POW10[-q]
    m = np.int64(np.floor(scaled + 0.5))
    if np.float32(_scale(m, q)) == value:
      mantissa = m
      ndigits = nd
      break
  if mantissa == 0:
    q = e - 8
    mantissa = np.int64(np.floor((x / _POW10[q] if q >= 0 else x * _POW10[-q]) + 0.5))
  q = e - ndigits + 1
  while mantissa % 10 == 0 and mantissa > 0:
    mantissa //= 10
    q += 1
  nd = 0
  t = mantissa
  while t > 0:
    nd += 1
    t //= 10
  lead = q + nd - 1  # exponent of the leading digit
  if 0 <= q and lead < 16:  # integer
    pos = _write_uint(out, pos, mantissa)
    for _ in range(q):
      out[pos] = 48
      pos += 1
    return pos
  if q < 0 and -5 <= lead < 16:  # positional with a fraction
    if lead < 0:
      out[pos] = 48
      out[pos + 1] = _DOT
      pos += 2
      for _ in range(-lead - 1):
        out[pos] = 48
        pos += 1
      return _write_uint(out, pos, mantissa)
    start = pos
    pos = _write_uint(out, pos, mantissa)
    point = start + lead + 1
    for k in range(pos, point, -1):
      out[k] = out[k - 1]
    out[point] = _DOT
    return pos + 1
  start = pos  # scientific: d[.ddd]e[-]x
  pos = _write_uint(out, pos, mantissa)
  if nd > 1:
    for k in range(pos, start + 1, -1):
      out[k] = out[k - 1]
    out[start + 1] = _DOT
    pos += 1
  out[pos] = 101
  pos += 1
  if lead < 0:
    out[pos] = _MINUS
    pos += 1
  return _write_uint(out, pos, abs(lead))


@nb.njit(cache=True)
def format_sparse_lines(row_start, row_end, feature_indptr, feature_ids, feature_values,
                        label_indptr, label_ids, label_list, out):
  """Formats rows ``[row_start, row_end)`` into ``out`` (uint8) and returns the length.

  With ``label_list`` each line is ``l1,l2,... f:v f:v`` (a space always separates the two
  parts, so a row without labels starts with a space); without it the line is only
  ``f:v f:v`` (labels ignored). ``out`` must hold 12 bytes per label, 32 per feature entry
  and 2 per row.
  """
  pos = 0
  for r in range(row_start, row_end):
    if label_list:
      for j in range(label_indptr[r], label_indptr[r + 1]):
        if j > label_indptr[r]:
          out[pos] = _COMMA
          pos += 1
        pos = _write_uint(out, pos, label_ids[j])
    for j in range(feature_indptr[r], feature_indptr[r + 1]):
      if label_list or j > feature_indptr[r]:
        out[pos] = _SPACE
        pos += 1
      pos = _write_uint(out, pos, feature_ids[j])
      out[pos] = _COLON
      pos += 1
      pos = _write_float(out, pos, feature_values[j])
    out[pos] = _NEWLINE
    pos += 1
  return pos


@nb.njit(cache=True)
def pad_csr_rows(rows, feature_indptr, feature_ids, feature_values, label_indptr, label_ids,
                 out_feature_ids, out_feature_values, out_label_ids, counts):
  """Copies the CSR rows ``rows`` (int64[B], -1 = padding row) into fixed-width arrays.

  ``out_feature_ids`` int32[B, F] / ``out_feature_values`` float32[B, F] get the row's
  features padded with (0, 0.0); a row with more than F keeps its F largest-|value| entries
  (ties: earlier first) in file order. ``out_label_ids`` int32[B, Lmax] gets the first Lmax
  labels padded with -1. ``counts`` int64[4] is incremented by (rows truncated, features
  dropped, labels dropped, rows with labels truncated).
  """
  width = out_feature_ids.shape[1]
  label_width = out_label_ids.shape[1]
  for b in range(rows.shape[0]):
    out_feature_ids[b, :] = 0
    out_feature_values[b, :] = 0.0
    out_label_ids[b, :] = -1
    r = rows[b]
    if r < 0:
      continue
    start = feature_indptr[r]
    n = feature_indptr[r + 1] - start
    if n <= width:
      for j in range(n):
        out_feature_ids[b, j] = feature_ids[start + j]
        out_feature_values[b, j] = feature_values[start + j]
    else:
      order = np.argsort(-np.abs(feature_values[start:start + n]), kind="mergesort")
      keep = np.sort(order[:width])
      for j in range(width):
        out_feature_ids[b, j] = feature_ids[start + keep[j]]
        out_feature_values[b, j] = feature_values[start + keep[j]]
      counts[0] += 1
      counts[1] += n - width
    label_start = label_indptr[r]
    m = label_indptr[r + 1] - label_start
    for j in range(min(m, label_width)):
      out_label_ids[b, j] = label_ids[label_start + j]
    if m > label_width:
      counts[2] += m - label_width
      counts[3] += 1
