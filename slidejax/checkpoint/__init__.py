"""Checkpoints: training state (orbax) and trained models."""
from slidejax.checkpoint._training import CheckpointError
from slidejax.checkpoint._training import TrainingCheckpoints
from slidejax.checkpoint._model import ModelFileError
from slidejax.checkpoint._model import load
from slidejax.checkpoint._model import read_info
from slidejax.checkpoint._model import save
