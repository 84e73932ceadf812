"""Row-sparse optimizers: optax transformations that read and write only touched rows."""

from slidejax.optim._row_sparse import RowSparseState
from slidejax.optim._row_sparse import RowSparseTransformation
from slidejax.optim._row_sparse import apply_row_updates
from slidejax.optim._row_sparse import row_sparse
from slidejax.optim._row_sparse import sum_duplicate_rows
from slidejax.optim._optimizer import Optimizer
from slidejax.optim._optimizer import RowGrad
from slidejax.optim._optimizer import row_sparse_update
