"""Training: the compiled public-path step, rehash schedules and the training loop."""

from slidejax.train._calibrate import attach_neighbours
from slidejax.train._calibrate import calibrate
from slidejax.train._calibrate import calibrate_neighbours
from slidejax.train._config import CLASSIC
from slidejax.train._config import TrainConfig
from slidejax.train._config import TrainingDiverged
from slidejax.train._config import TrainingError
from slidejax.train._config import check_options
from slidejax.train._config import resolve_config
from slidejax.train._config import validate
from slidejax.train._loop import build_model
from slidejax.train._loop import evaluate_model
from slidejax.train._loop import evaluate_top_k
from slidejax.train._loop import fit
from slidejax.train._rerank import attach_reranker
from slidejax.train._rerank import fit_reranker
from slidejax.train._schedule import RehashSchedule
from slidejax.train._schedule import fixed_interval
from slidejax.train._step import StepMetrics
from slidejax.train._step import TrainBatch
from slidejax.train._step import Trainer
from slidejax.train._step import batch_loss
from slidejax.train._step import train_step
