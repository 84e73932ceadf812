"""Training: jitted sparse/dense steps, rehash schedules, checkpoints and the training loop."""

from slidejax.train._checkpoint import CheckpointError
from slidejax.train._checkpoint import latest_checkpoint
from slidejax.train._checkpoint import load_checkpoint
from slidejax.train._checkpoint import save_checkpoint
from slidejax.train._loop import TrainBatch
from slidejax.train._loop import TrainConfig
from slidejax.train._loop import TrainingDiverged
from slidejax.train._loop import TrainingError
from slidejax.train._loop import compile_step
from slidejax.train._loop import evaluate_model
from slidejax.train._loop import fit
from slidejax.train._loop import validate
from slidejax.train._schedule import RehashSchedule
from slidejax.train._schedule import fixed_interval
from slidejax.train._step import DenseTrainState
from slidejax.train._step import SparseTrainState
from slidejax.train._step import SparseTrainer
from slidejax.train._step import StepMetrics
from slidejax.train._step import attach_row_deltas
from slidejax.train._step import detach_row_deltas
from slidejax.train._step import make_dense_trainer
from slidejax.train._step import make_predictor
from slidejax.train._step import make_sparse_trainer
from slidejax.train._step import sparse_layers
