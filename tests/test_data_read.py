"""Readers and writers of slidejax.data: round trips, real files, and every error case."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from slidejax import data as xcdata


def random_data(seed: int, num_points=40, num_features=30, num_labels=12) -> xcdata.XCData:
  """Random CSR data with empty rows of every kind and awkward float32 values."""
  rng = np.random.default_rng(seed)
  nnz = rng.integers(0, 8, num_points)
  nlab = rng.integers(0, 4, num_points)
  nnz[:3], nlab[:3] = (0, 4, 0), (0, 0, 3)  # empty row, no labels, no features
  f_ids = np.concatenate([rng.choice(num_features, n, replace=False) for n in nnz])
  l_ids = np.concatenate([rng.choice(num_labels, n, replace=False) for n in nlab])
  magnitudes = 10.0 ** rng.uniform(-12, 12, nnz.sum())
  values = (magnitudes * rng.choice([-1.0, 1.0], nnz.sum())).astype(np.float32)
  values[::7] = rng.integers(0, 5, len(values[::7]))
  return xcdata.XCData(np.concatenate([[0], np.cumsum(nnz)]), f_ids.astype(np.int32), values,
                       np.concatenate([[0], np.cumsum(nlab)]), l_ids.astype(np.int32),
                       num_points, num_features, num_labels)


def assert_same(a: xcdata.XCData, b: xcdata.XCData) -> None:
  assert a.num_points == b.num_points
  assert (a.num_features, a.num_labels) == (b.num_features, b.num_labels)
  np.testing.assert_array_equal(a.feature_indptr, b.feature_indptr)
  np.testing.assert_array_equal(a.feature_ids, b.feature_ids)
  np.testing.assert_array_equal(a.feature_values, b.feature_values)  # bit-exact floats
  np.testing.assert_array_equal(a.label_indptr, b.label_indptr)
  np.testing.assert_array_equal(a.label_ids, b.label_ids)
  assert b.feature_indptr.dtype == np.int64 and b.label_indptr.dtype == np.int64
  assert b.feature_ids.dtype == np.int32 and b.label_ids.dtype == np.int32
  assert b.feature_values.dtype == np.float32


@pytest.mark.parametrize("seed", [0, 1])
def test_round_trip_xc(tmp_path, seed):
  data = random_data(seed)
  xcdata.write_xc(tmp_path / "d.txt", data)
  assert_same(data, xcdata.read_xc(tmp_path / "d.txt"))
  assert_same(data, xcdata.read_auto(tmp_path / "d.txt"))


def test_round_trip_svmlight(tmp_path):
  data = random_data(2)
  xcdata.write_svmlight(tmp_path / "d.svm", data)
  back = xcdata.read_svmlight(tmp_path / "d.svm", num_features=data.num_features,
                              num_labels=data.num_labels)
  assert_same(data, back)
  inferred = xcdata.read_svmlight(tmp_path / "d.svm")
  assert inferred.num_features == data.feature_ids.max() + 1
  assert inferred.num_labels == data.label_ids.max() + 1


def test_round_trip_xc_split(tmp_path):
  data = random_data(3)
  xcdata.write_xc_split(tmp_path / "X.txt", tmp_path / "Y.txt", data)
  assert_same(data, xcdata.read_xc_split(tmp_path / "X.txt", tmp_path / "Y.txt"))


def test_split_labels_as_comma_lists(tmp_path):
  (tmp_path / "X.txt").write_text("2 5\n0:1 4:2\n\n")
  (tmp_path / "Y.txt").write_text("2 3\n0,2\n1:1\n")
  data = xcdata.read_xc_split(tmp_path / "X.txt", tmp_path / "Y.txt")
  assert data.label_indptr.tolist() == [0, 2, 3] and data.label_ids.tolist() == [0, 2, 1]
  assert data.feature_indptr.tolist() == [0, 2, 2]


def test_round_trip_empty_file(tmp_path):
  data = random_data(4)
  empty = xcdata.subset(data, [])
  xcdata.write_xc(tmp_path / "e.txt", empty)
  assert_same(empty, xcdata.read_xc(tmp_path / "e.txt"))


@settings(max_examples=300, deadline=None)
@given(st.floats(width=32, allow_nan=False, allow_infinity=False))
def test_float32_values_round_trip_exactly(tmp_path_factory, value):
  path = tmp_path_factory.mktemp("f") / "v.txt"
  data = xcdata.XCData(np.array([0, 1]), np.array([0], np.int32), np.array([value], np.float32),
                       np.array([0, 0]), np.zeros(0, np.int32), 1, 1, 1)
  xcdata.write_xc(path, data)
  back = xcdata.read_xc(path).feature_values[0]
  assert back == np.float32(value), path.read_text()


@settings(max_examples=300, deadline=None)
@given(st.from_regex(r"\A[+-]?([0-9]{1,25}(\.[0-9]{0,25})?|\.[0-9]{1,25})([eE][+-]?[0-9]{1,2})?\Z"))
def test_parser_matches_python_float(tmp_path_factory, text):
  with np.errstate(over="ignore"):
    expected = np.float32(float(text))
  if not np.isfinite(expected):
    return
  path = tmp_path_factory.mktemp("p") / "v.txt"
  path.write_text(f"1 1 1\n 0:{text}\n")
  got = xcdata.read_xc(path).feature_values[0]
  assert got == expected or abs(got - expected) <= np.spacing(abs(expected)), (text, got)


def test_longest_tokens_round_trip(tmp_path):
  """Largest ids with the longest value spellings (sign, 16-digit integers, tiny fractions)."""
  values = np.array([-1.2345679e15, -9.999999e15, -1.2345679e-5, -1.1754944e-38, -1.4e-45,
                     -3.4028235e38, 123456.79, -0.1], np.float32)
  n = len(values)
  data = xcdata.XCData(np.arange(n + 1, dtype=np.int64), np.full(n, 2**31 - 2, np.int32), values,
                       np.arange(n + 1, dtype=np.int64), np.full(n, 2**31 - 2, np.int32), n,
                       2**31 - 1, 2**31 - 1)
  xcdata.write_xc(tmp_path / "w.txt", data)
  assert_same(data, xcdata.read_xc(tmp_path / "w.txt"))
  assert "-0.1\n" in (tmp_path / "w.txt").read_text()  # shortest spelling


def test_error_pickles():
  import pickle
  err = pickle.loads(pickle.dumps(xcdata.XCFormatError("f.txt", 3, "bad")))
  assert (err.path, err.line, str(err)) == ("f.txt", 3, "f.txt:3: bad")


def test_line_variants(tmp_path):
  path = tmp_path / "v.txt"
  path.write_bytes(b"5 4 3\r\n"
                   b"0,2 1:0.5 3:-2e1  \r\n"  # CRLF and trailing spaces
                   b" 0:1\n"  # no labels
                   b"1\n"  # no features
                   b"\n"  # neither
                   b"2\t0:.25\t2:7.")  # tabs, no final newline
  data = xcdata.read_xc(path)
  assert data.num_points == 5
  assert data.feature_indptr.tolist() == [0, 2, 3, 3, 3, 5]
  assert data.feature_ids.tolist() == [1, 3, 0, 0, 2]
  assert data.feature_values.tolist() == [0.5, -20.0, 1.0, 0.25, 7.0]
  assert data.label_indptr.tolist() == [0, 2, 2, 3, 3, 4]
  assert data.label_ids.tolist() == [0, 2, 1, 2]


BAD_LINES = [
    ("0,1 2:abc", "unparsable"),
    ("0,1 2:", "unparsable"),
    ("0,,1 2:1", "unparsable"),
    ("0, 2:1", "unparsable"),
    ("0,1 2:1.5x", "unparsable"),
    ("0,1 2:1e", "unparsable"),
    ("0 1:1 3", "unparsable"),
    ("0 x:1", "unparsable"),
    ("0 -2:1", "negative id"),
    ("-1 2:1", "negative id"),
    ("0 5:1", "feature id >= the number of features 5"),
    ("3 1:1", "label id >= the number of labels 3"),
    ("0 1:nan", "NaN"),
    ("0 1:-inf", "NaN"),
    ("0 1:1e39", "NaN"),
]


@pytest.mark.parametrize("bad,what", BAD_LINES)
def test_errors_name_path_and_line(tmp_path, bad, what):
  path = tmp_path / "bad.txt"
  path.write_text(f"4 5 3\n0 1:1\n 2:2\n{bad}\n1 0:1\n")
  with pytest.raises(xcdata.XCFormatError, match=what) as info:
    xcdata.read_xc(path)
  assert info.value.line == 4
  assert info.value.path == str(path)
  assert str(info.value).startswith(f"{path}:4: ")


@pytest.mark.parametrize("text,what", [
    ("", "missing header"),
    ("\n0 1:1\n", "missing header"),
    ("4 5\n0 1:1\n", "bad header"),
    ("a b c\n0 1:1\n", "bad header"),
    ("0,1 2:1\n", "bad header"),
    ("3 -5 2\n", "bad header"),
])
def test_header_errors(tmp_path, text, what):
  path = tmp_path / "h.txt"
  path.write_text(text)
  with pytest.raises(xcdata.XCFormatError, match=what) as info:
    xcdata.read_xc(path)
  assert info.value.line == 1 and str(info.value).startswith(f"{path}:1: ")


def test_header_row_count_warns_and_strict_raises(tmp_path):
  path = tmp_path / "c.txt"
  path.write_text("7 3 2\n0 1:1\n1 2:1\n")
  with pytest.warns(xcdata.XCFormatWarning, match=r":1: header declares 7 rows but 2"):
    data = xcdata.read_xc(path)
  assert data.num_points == 2
  with pytest.raises(xcdata.XCFormatError, match="header declares 7 rows"):
    xcdata.read_xc(path, strict=True)


def test_repeated_ids_summed_with_warning(tmp_path):
  path = tmp_path / "r.txt"
  path.write_text("3 4 3\n0 1:1\n1,1,2 2:1 3:0.5 2:2\n2 0:1\n")
  with pytest.warns(xcdata.XCFormatWarning) as record:
    data = xcdata.read_xc(path)
  messages = [str(w.message) for w in record]
  assert any(m.startswith(f"{path}:3: 1 repeated feature ids") for m in messages)
  assert any(m.startswith(f"{path}:3: 1 repeated label ids") for m in messages)
  assert data.feature_ids.tolist() == [1, 2, 3, 0]
  assert data.feature_values.tolist() == [1.0, 3.0, 0.5, 1.0]
  assert data.label_ids.tolist() == [0, 1, 2, 2]
  with pytest.raises(xcdata.XCFormatError, match=":3: 1 repeated feature ids"):
    xcdata.read_xc(path, strict=True)


def test_split_errors(tmp_path):
  (tmp_path / "X.txt").write_text("2 5\n0:1\n1,2\n")
  (tmp_path / "Y.txt").write_text("2 3\n0\n1\n")
  with pytest.raises(xcdata.XCFormatError, match=r"X.txt:3: a label list"):
    xcdata.read_xc_split(tmp_path / "X.txt", tmp_path / "Y.txt")
  (tmp_path / "X.txt").write_text("2 5\n0:1\n1:2\n")
  (tmp_path / "Y.txt").write_text("2 3\n0\n")
  with pytest.warns(xcdata.XCFormatWarning), pytest.raises(xcdata.XCFormatError,
                                                           match="1 label rows but"):
    xcdata.read_xc_split(tmp_path / "X.txt", tmp_path / "Y.txt")


def test_svmlight_one_based_and_bounds(tmp_path):
  path = tmp_path / "s.svm"
  path.write_text("1,2 1:0.5 3:1\n3 2:1\n")
  data = xcdata.read_svmlight(path, zero_based=False)
  assert data.feature_ids.tolist() == [0, 2, 1] and data.label_ids.tolist() == [0, 1, 2]
  assert (data.num_features, data.num_labels) == (3, 3)
  path.write_text("1 1:1\n0 2:1\n")
  with pytest.raises(xcdata.XCFormatError, match=r"s.svm:2: label id 0 in a 1-based"):
    xcdata.read_svmlight(path, zero_based=False)
  path.write_text("0 1:1\n0 4:1\n")
  with pytest.raises(xcdata.XCFormatError, match=r"s.svm:2: feature id >="):
    xcdata.read_svmlight(path, num_features=3)


def test_subset_and_counts():
  data = random_data(5)
  rows = np.array([4, 0, 4, 9])
  part = xcdata.subset(data, rows)
  for i, r in enumerate(rows):
    a, b = data.feature_indptr[r], data.feature_indptr[r + 1]
    c, d = part.feature_indptr[i], part.feature_indptr[i + 1]
    np.testing.assert_array_equal(part.feature_ids[c:d], data.feature_ids[a:b])
    np.testing.assert_array_equal(part.feature_values[c:d], data.feature_values[a:b])
    a, b = data.label_indptr[r], data.label_indptr[r + 1]
    np.testing.assert_array_equal(part.label_ids[part.label_indptr[i]:part.label_indptr[i + 1]],
                                  data.label_ids[a:b])
  xcdata.validate(part)
  counts = xcdata.label_counts(data)
  assert counts.shape == (data.num_labels,) and counts.sum() == len(data.label_ids)
  with pytest.raises(IndexError):
    xcdata.subset(data, [data.num_points])


# Statistics stated in ../shared/data/*/SOURCE.md (the shared_data fixture skips when absent).
REAL_FILES = [
    ("bibtex/xc_format/bibtex_train.txt", 4880, 1836, 159, 2.380, 68.49, 0),
    ("bibtex/xc_format/bibtex_test.txt", 2515, 1836, 159, 2.444, 68.98, 0),
    ("delicious/xc_format/delicious_train.txt", 12920, 500, 983, 19.047, 18.54, 10),
    ("delicious/xc_format/delicious_test.txt", 3185, 500, 983, 18.910, 17.29, 4),
]


@pytest.mark.parametrize("name,points,features,labels,avg_labels,avg_nnz,no_labels", REAL_FILES)
def test_real_files(shared_data, name, points, features, labels, avg_labels, avg_nnz, no_labels):
  data = xcdata.read_xc(shared_data / name, strict=True)
  assert (data.num_points, data.num_features, data.num_labels) == (points, features, labels)
  assert len(data.label_ids) / points == pytest.approx(avg_labels, abs=5e-4)
  assert len(data.feature_ids) / points == pytest.approx(avg_nnz, abs=5e-3)
  assert np.count_nonzero(xcdata.row_num_labels(data) == 0) == no_labels
  # SOURCE.md says 3 delicious rows have no features; the files (and the raw ARFF) have none.
  assert np.count_nonzero(xcdata.row_nnz(data) == 0) == 0
  assert np.all(data.feature_values == 1.0)
  expected_present = 982 if name.endswith("delicious_test.txt") else labels
  assert np.count_nonzero(xcdata.label_counts(data)) == expected_present


def test_real_amazon_excerpt(shared_data):
  path = shared_data / "amazon-670k-excerpt" / "amazon_partial_test.txt"
  with pytest.warns(xcdata.XCFormatWarning, match="header declares 153025 rows but 512"):
    data = xcdata.read_xc(path)
  assert (data.num_points, data.num_features, data.num_labels) == (512, 135909, 670091)
  assert data.feature_ids.max() == 135776 and data.label_ids.max() == 670089
  assert len(data.label_ids) / 512 == pytest.approx(5.057, abs=5e-4)
  assert len(data.feature_ids) / 512 == pytest.approx(64.07, abs=5e-3)
  assert len(np.unique(data.label_ids)) == 1882 and len(np.unique(data.feature_ids)) == 8982
  assert data.feature_values[:4].tolist() == pytest.approx([2.0, 21.96159, 4.80735, 2.58496])
  with pytest.raises(xcdata.XCFormatError, match=":1: header declares 153025"):
    xcdata.read_xc(path, strict=True)


def test_fill_pass_never_writes_past_its_arrays():
  """If the file grows between the two passes the kernel reports it instead of overflowing."""
  import hostops
  from hostops import _parse
  buf = np.frombuffer(b"0 1:1 2:2\n1 3:1\n", np.uint8)
  result = hostops.scan_sparse_lines(buf, 0, -1, -1, True, True, np.zeros(3, np.int64),
                                     np.zeros(2, np.int32), np.zeros(2, np.float32),
                                     np.zeros(3, np.int64), np.zeros(2, np.int32))
  assert result[0] == _parse.ERR_CHANGED


@pytest.mark.parametrize("dim", [5, 10**9])  # dense marker and per-row sort paths
def test_duplicate_kernels_both_paths(dim):
  import hostops
  indptr = np.array([0, 4, 4, 7], np.int64)
  ids = np.array([3, 1, 3, 3, 2, 0, 2], np.int32)
  values = np.array([1, 2, 3, 4, 5, 6, 7], np.float32)
  assert hostops.count_duplicate_ids(indptr, ids, dim) == (2, 3, 0)
  new_indptr, new_ids, new_values = hostops.merge_duplicate_ids(indptr, ids, values, dim)
  assert new_indptr.tolist() == [0, 2, 2, 4]
  assert new_ids.tolist() == [3, 1, 2, 0] and new_values.tolist() == [8, 2, 12, 6]
