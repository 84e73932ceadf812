"""LSH engine: hash families, bucket tables and fixed-size active-set queries.

Host (Numba) and pure-JAX backends share one contract; ``backend=None`` picks the host on
CPU and JAX on accelerators. See :mod:`slidejax.lsh._families`, ``_tables`` and ``_query``.
"""

from slidejax.lsh._families import HashFamily
from slidejax.lsh._families import default_range_bits
from slidejax.lsh._families import dwta
from slidejax.lsh._families import minhash
from slidejax.lsh._families import neuron_codes
from slidejax.lsh._families import pack_codes
from slidejax.lsh._families import simhash
from slidejax.lsh._families import wta
from slidejax.lsh._host import warmup
from slidejax.lsh._query import POLICIES
from slidejax.lsh._query import ActiveSet
from slidejax.lsh._query import bucket_rows
from slidejax.lsh._query import SharedActiveSet
from slidejax.lsh._query import query
from slidejax.lsh._query import query_shared
from slidejax.lsh._query import select
from slidejax.lsh._query import select_shared
from slidejax.lsh._stream import build_tables_streamed
from slidejax.lsh._tables import BACKENDS
from slidejax.lsh._tables import INSERTIONS
from slidejax.lsh._tables import LSHTables
from slidejax.lsh._tables import build_tables
from slidejax.lsh._tables import codes_dtype
from slidejax.lsh._tables import resolve_backend
from slidejax.lsh._tables import table_stats
from slidejax.lsh._tables import update_tables
