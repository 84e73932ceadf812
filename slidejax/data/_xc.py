"""Extreme Classification (XC) repository and libsvm readers/writers, and the ``XCData`` type.

Parsing happens in Numba kernels over the file's bytes (``hostops.scan_sparse_lines``):
one pass to validate and count, one to fill exactly-sized arrays.
"""
from __future__ import annotations

import mmap
import os
import pathlib
import warnings
from typing import Callable, NamedTuple

import numpy as np

import hostops
from hostops import _parse

PathLike = str | os.PathLike


class XCData(NamedTuple):
  """A multi-label sparse data set in CSR form.

  Attributes:
    feature_indptr: int64[N+1]; row ``i``'s features are at
      ``[feature_indptr[i], feature_indptr[i+1])``.
    feature_ids: int32[nnz], in file order within a row.
    feature_values: float32[nnz].
    label_indptr: int64[N+1].
    label_ids: int32[nlab], in file order within a row.
    num_points, num_features, num_labels: N and the declared dimensions D and L.
  """
  feature_indptr: np.ndarray
  feature_ids: np.ndarray
  feature_values: np.ndarray
  label_indptr: np.ndarray
  label_ids: np.ndarray
  num_points: int
  num_features: int
  num_labels: int


class XCFormatError(ValueError):
  """A malformed input file; ``str(err)`` is ``"{path}:{line}: {what was wrong}"``."""

  def __init__(self, path, line: int, what: str):
    super().__init__(f"{path}:{line}: {what}")
    self.path = str(path)
    self.line = line
    self.what = what

  def __reduce__(self):  # picklable (multiprocessing) despite the 3-argument constructor
    return type(self), (self.path, self.line, self.what)


class XCFormatWarning(UserWarning):
  """A suspicious but readable input (header count mismatch, repeated ids)."""


def label_counts(data: XCData) -> np.ndarray:
  """int64[L]: in how many points each label occurs."""
  return np.bincount(data.label_ids, minlength=data.num_labels).astype(np.int64)


def feature_counts(data: XCData) -> np.ndarray:
  """int64[D]: in how many points each feature occurs (its document frequency)."""
  return np.bincount(data.feature_ids, minlength=data.num_features).astype(np.int64)


def row_nnz(data: XCData) -> np.ndarray:
  """int64[N]: feature entries per point."""
  return np.diff(data.feature_indptr)


def row_num_labels(data: XCData) -> np.ndarray:
  """int64[N]: labels per point."""
  return np.diff(data.label_indptr)


def _take_rows(indptr: np.ndarray, rows: np.ndarray, *arrays: np.ndarray):
  lengths = indptr[rows + 1] - indptr[rows]
  new_indptr = np.zeros(len(rows) + 1, np.int64)
  np.cumsum(lengths, out=new_indptr[1:])
  starts = np.repeat(indptr[rows] - new_indptr[:-1], lengths)
  positions = np.arange(new_indptr[-1], dtype=np.int64) + starts
  return (new_indptr,) + tuple(a[positions] for a in arrays)


def subset(data: XCData, rows) -> XCData:
  """The points ``rows`` (int array, any order, repeats allowed) of ``data``, same dimensions."""
  rows = np.asarray(rows, np.int64).reshape(-1)
  if rows.size and (rows.min() < 0 or rows.max() >= data.num_points):
    raise IndexError(f"rows must be in [0, {data.num_points})")
  f_indptr, f_ids, f_values = _take_rows(data.feature_indptr, rows, data.feature_ids,
                                         data.feature_values)
  l_indptr, l_ids = _take_rows(data.label_indptr, rows, data.label_ids)
  return XCData(f_indptr, f_ids, f_values, l_indptr, l_ids, len(rows), data.num_features,
                data.num_labels)


def validate(data: XCData) -> None:
  """Raises ``ValueError`` when the arrays are inconsistent with each other or the dimensions."""
  for name, indptr, ids, dim in (("feature", data.feature_indptr, data.feature_ids,
                                  data.num_features),
                                 ("label", data.label_indptr, data.label_ids, data.num_labels)):
    if indptr.shape != (data.num_points + 1,) or indptr[0] != 0 or indptr[-1] != len(ids):
      raise ValueError(f"{name}_indptr does not match {data.num_points} points / {len(ids)} ids")
    if np.any(np.diff(indptr) < 0):
      raise ValueError(f"{name}_indptr is not non-decreasing")
    if len(ids) and (ids.min() < 0 or ids.max() >= dim):
      raise ValueError(f"{name} ids must be in [0, {dim})")
  if len(data.feature_values) != len(data.feature_ids):
    raise ValueError("feature_values and feature_ids differ in length")


# ----------------------------------------------------------------------------------- reading


def _file_bytes(path: PathLike) -> np.ndarray:
  """uint8[n] view of the file (memory-mapped; empty files give an empty array)."""
  with open(path, "rb") as f:
    size = os.fstat(f.fileno()).st_size
    if size == 0:
      return np.zeros(0, np.uint8)
    mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
  return np.frombuffer(mapped, np.uint8)


def _line_of(buf: np.ndarray, offset: int) -> int:
  return int(np.count_nonzero(buf[:offset] == 10)) + 1


def _read_header(buf: np.ndarray, path, fields: tuple[str, ...]) -> tuple[list[int], int]:
  """The header's integers and the offset of the first data line."""
  newlines = np.flatnonzero(buf[:4096] == 10)
  end = int(newlines[0]) if newlines.size else min(len(buf), 4096)
  text = bytes(buf[:end]).decode("ascii", "replace").strip()
  expected = " ".join(fields)
  if not text:
    raise XCFormatError(path, 1, f"missing header (expected '{expected}')")
  parts = text.split()
  try:
    values = [int(p) for p in parts]
  except ValueError:
    values = None
  if values is None or len(values) != len(fields) or min(values) < 0:
    raise XCFormatError(path, 1, f"bad header {text[:60]!r} (expected '{expected}', "
                                 "non-negative integers)")
  return values, min(end + 1, len(buf))


def _warn(path, line: int, what: str, strict: bool) -> None:
  if strict:
    raise XCFormatError(path, line, what)
  warnings.warn(f"{path}:{line}: {what}", XCFormatWarning, stacklevel=4)


def _scan(buf, path, start, num_features, num_labels, allow_labels):
  """The CSR arrays of the rows in ``buf[start:]`` plus the largest ids seen."""
  empty_i64 = np.zeros(1, np.int64)
  empty_i32 = np.zeros(0, np.int32)
  code, offset, rows, nnz, nlab, max_f, max_l = hostops.scan_sparse_lines(
      buf, start, num_features, num_labels, allow_labels, False, empty_i64, empty_i32,
      np.zeros(0, np.float32), empty_i64, empty_i32)
  if code != _parse.OK:
    raise XCFormatError(path, _line_of(buf, offset), _describe(buf, code, offset, num_features,
                                                               num_labels))
  f_indptr = np.zeros(rows + 1, np.int64)
  l_indptr = np.zeros(rows + 1, np.int64)
  f_ids = np.empty(nnz, np.int32)
  f_values = np.empty(nnz, np.float32)
  l_ids = np.empty(nlab, np.int32)
  second = hostops.scan_sparse_lines(buf, start, num_features, num_labels, allow_labels, True,
                                     f_indptr, f_ids, f_values, l_indptr, l_ids)
  if second[0] != _parse.OK or second[2:5] != (rows, nnz, nlab):
    raise XCFormatError(path, _line_of(buf, max(second[1], 0)),
                        _parse.ERROR_MESSAGES[_parse.ERR_CHANGED])
  return f_indptr, f_ids, f_values, l_indptr, l_ids, int(rows), int(max_f), int(max_l)


def _describe(buf, code, offset, num_features, num_labels) -> str:
  end = offset
  while end < len(buf) and end - offset < 40 and buf[end] not in (9, 10, 13, 32):
    end += 1
  token = bytes(buf[offset:end]).decode("ascii", "replace")
  what = _parse.ERROR_MESSAGES[code]
  if code == _parse.ERR_FEATURE_RANGE:
    what = f"feature id >= the number of features {num_features}"
  elif code == _parse.ERR_LABEL_RANGE:
    what = f"label id >= the number of labels {num_labels}"
  return f"{what}: {token!r}"


def _dedupe(path, indptr, ids, values, dim, first_line, kind, strict):
  """Merges repeated ids within a row (values summed) and warns about it."""
  rows_hit, repeats, first = hostops.count_duplicate_ids(indptr, ids, dim)
  if rows_hit == 0:
    return indptr, ids, values
  action = "summed their values" if kind == "feature" else "kept one of each"
  _warn(path, first_line + int(first),
        f"{repeats} repeated {kind} ids within a row in {rows_hit} rows (first here); {action}",
        strict)
  if values is None:
    new_indptr, new_ids, _ = hostops.merge_duplicate_ids(
        indptr, ids, np.zeros(len(ids), np.float32), dim)
    return new_indptr, new_ids, None
  return hostops.merge_duplicate_ids(indptr, ids, values, dim)


def _check_row_count(path, declared: int, found: int, strict: bool) -> None:
  if declared != found:
    what = f"header declares {declared} rows but {found} data lines follow"
    _warn(path, 1, what if strict else f"{what}; using {found}", strict)


def read_xc(path: PathLike, *, strict: bool = False) -> XCData:
  """Reads an XC repository file: header ``N D L``, then ``l1,l2,... f:v f:v ...`` per line.

  Ids are 0-based. A line starting with a space has no labels; a line may have no features.
  Raises ``XCFormatError`` for malformed content; warns (``XCFormatWarning``) when the
  header's row count differs from the data lines, or a row repeats an id (feature values
  are summed, repeated labels kept once). ``strict=True`` turns those warnings into errors.
  """
  buf = _file_bytes(path)
  (n, d, l), start = _read_header(buf, path, ("N", "D", "L"))
  f_indptr, f_ids, f_values, l_indptr, l_ids, rows, _, _ = _scan(buf, path, start, d, l, True)
  _check_row_count(path, n, rows, strict)
  f_indptr, f_ids, f_values = _dedupe(path, f_indptr, f_ids, f_values, d, 2, "feature", strict)
  l_indptr, l_ids, _ = _dedupe(path, l_indptr, l_ids, None, l, 2, "label", strict)
  return XCData(f_indptr, f_ids, f_values, l_indptr, l_ids, rows, d, l)


def _read_matrix(path, strict, fields, allow_labels):
  buf = _file_bytes(path)
  (n, dim), start = _read_header(buf, path, fields)
  f_indptr, f_ids, f_values, l_indptr, l_ids, rows, _, _ = _scan(
      buf, path, start, dim, dim, allow_labels)
  _check_row_count(path, n, rows, strict)
  return f_indptr, f_ids, f_values, l_indptr, l_ids, rows, dim


def _merge_rows(indptr_a, ids_a, indptr_b, ids_b):
  """Row-wise concatenation of two CSR id lists with the same number of rows."""
  lengths = np.diff(indptr_a) + np.diff(indptr_b)
  indptr = np.zeros(len(lengths) + 1, np.int64)
  np.cumsum(lengths, out=indptr[1:])
  rows_a = np.repeat(np.arange(len(lengths)), np.diff(indptr_a))
  rows_b = np.repeat(np.arange(len(lengths)), np.diff(indptr_b))
  order = np.argsort(np.concatenate([rows_a, rows_b]), kind="stable")
  return indptr, np.concatenate([ids_a, ids_b])[order]


def read_xc_split(features_path: PathLike, labels_path: PathLike, *,
                  strict: bool = False) -> XCData:
  """Reads the split XC variant: an ``N D`` + ``f:v ...`` file and an ``N L`` labels file.

  Label lines are ``l:v l:v ...`` (the value is ignored; every listed id is a label) or
  ``l1,l2,...``. The two files must have the same number of data lines.
  """
  f_indptr, f_ids, f_values, _, _, rows, d = _read_matrix(features_path, strict, ("N", "D"),
                                                          False)
  y_indptr, y_ids, _, c_indptr, c_ids, y_rows, l = _read_matrix(labels_path, strict,
                                                                ("N", "L"), True)
  if rows != y_rows:
    raise XCFormatError(labels_path, 1, f"{y_rows} label rows but {features_path} has "
                                        f"{rows} feature rows")
  l_indptr, l_ids = _merge_rows(c_indptr, c_ids, y_indptr, y_ids) if len(c_ids) else (y_indptr,
                                                                                     y_ids)
  f_indptr, f_ids, f_values = _dedupe(features_path, f_indptr, f_ids, f_values, d, 2, "feature",
                                      strict)
  l_indptr, l_ids, _ = _dedupe(labels_path, l_indptr, l_ids, None, l, 2, "label", strict)
  return XCData(f_indptr, f_ids, f_values, l_indptr, l_ids.astype(np.int32), rows, d, l)


def read_svmlight(path: PathLike, *, num_features: int | None = None,
                  num_labels: int | None = None, zero_based: bool = True,
                  strict: bool = False) -> XCData:
  """Reads libsvm/svmlight multi-label text: ``l1,l2 f:v f:v ...`` per line, no header.

  Dimensions default to the largest id + 1. With ``zero_based=False`` ids in the file start
  at 1 and are shifted down (an id 0 is then an error).
  """
  buf = _file_bytes(path)
  shift = 0 if zero_based else 1
  d_check = -1 if num_features is None else num_features + shift
  l_check = -1 if num_labels is None else num_labels + shift
  f_indptr, f_ids, f_values, l_indptr, l_ids, rows, max_f, max_l = _scan(
      buf, path, 0, d_check, l_check, True)
  if shift:
    for ids, kind in ((f_ids, "feature"), (l_ids, "label")):
      if len(ids) and ids.min() == 0:
        bad = int(np.argmax(ids == 0))
        indptr = f_indptr if kind == "feature" else l_indptr
        row = int(np.searchsorted(indptr, bad, side="right")) - 1
        raise XCFormatError(path, row + 1, f"{kind} id 0 in a 1-based file")
      ids -= 1
  d = num_features if num_features is not None else max(max_f + 1 - shift, 0)
  l = num_labels if num_labels is not None else max(max_l + 1 - shift, 0)
  f_indptr, f_ids, f_values = _dedupe(path, f_indptr, f_ids, f_values, d, 1, "feature", strict)
  l_indptr, l_ids, _ = _dedupe(path, l_indptr, l_ids, None, l, 1, "label", strict)
  return XCData(f_indptr, f_ids, f_values, l_indptr, l_ids, rows, d, l)


# ----------------------------------------------------------------------------------- writing


def _write_lines(path, header: str | None, data: XCData, label_list: bool, *,
                 label_as_features: bool = False,
                 progress: Callable[[int], None] | None = None, chunk_rows: int = 8192) -> None:
  f_indptr, f_ids, f_values = data.feature_indptr, data.feature_ids, data.feature_values
  if label_as_features:
    f_indptr, f_ids = data.label_indptr, data.label_ids
    f_values = np.ones(len(f_ids), np.float32)
  with open(path, "wb") as out:
    if header is not None:
      out.write(header.encode("ascii") + b"\n")
    for start in range(0, data.num_points, chunk_rows):
      end = min(start + chunk_rows, data.num_points)
      size = (32 * int(f_indptr[end] - f_indptr[start])
              + 12 * int(data.label_indptr[end] - data.label_indptr[start]) + 2 * (end - start))
      buffer = np.empty(size, np.uint8)
      length = hostops.format_sparse_lines(start, end, f_indptr, f_ids, f_values,
                                           data.label_indptr, data.label_ids, label_list, buffer)
      out.write(buffer[:length].tobytes())
      if progress is not None:
        progress(end - start)


def write_xc(path: PathLike, data: XCData, *,
             progress: Callable[[int], None] | None = None) -> None:
  """Writes ``data`` in XC text format (values as the shortest exact float32 decimal).

  ``progress`` (optional) is called with the number of rows written after each chunk.
  """
  header = f"{data.num_points} {data.num_features} {data.num_labels}"
  _write_lines(path, header, data, True, progress=progress)


def write_svmlight(path: PathLike, data: XCData) -> None:
  """Writes ``data`` as libsvm multi-label text (0-based ids, no header)."""
  _write_lines(path, None, data, True)


def write_xc_split(features_path: PathLike, labels_path: PathLike, data: XCData) -> None:
  """Writes the split XC variant: ``N D`` + ``f:v`` lines, and ``N L`` + ``l:1`` lines."""
  _write_lines(features_path, f"{data.num_points} {data.num_features}", data, False)
  _write_lines(labels_path, f"{data.num_points} {data.num_labels}", data, False,
               label_as_features=True)


def read_auto(path: PathLike, *, strict: bool = False) -> XCData:
  """``read_xc`` when the first line is a 3-integer header, else ``read_svmlight``."""
  with open(pathlib.Path(path), "rb") as f:
    first = f.readline(4096).split()
  if len(first) == 3 and all(p.isdigit() for p in first):
    return read_xc(path, strict=strict)
  return read_svmlight(path, strict=strict)
