"""Numba host kernels for slidejax (parsing, hash tables, active-set selection, label links,
neighbour votes).

Kernels take and return NumPy arrays; randomness is passed in as arrays. JAX reaches the
table and selection kernels through one wrapper module, ``slidejax.lsh._host``.
"""

from hostops._codes import wta_codes
from hostops._links import top_label_links
from hostops._neighbours import index_rows
from hostops._neighbours import neighbour_votes
from hostops._parse import count_duplicate_ids
from hostops._parse import format_sparse_lines
from hostops._parse import merge_duplicate_ids
from hostops._parse import pad_csr_rows
from hostops._parse import scan_sparse_lines
from hostops._select import POLICIES
from hostops._select import select_per_sample
from hostops._select import select_shared
from hostops._select import warmup_lsh_kernels
from hostops._tables import build_tables
from hostops._tables import stream_fill
from hostops._tables import stream_finish_fifo
from hostops._tables import update_rows
from hostops._tables import update_tables

