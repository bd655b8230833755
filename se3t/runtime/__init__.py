"""se3t.runtime: the command-line runtime (train, evaluate, predict) and its building blocks.

Data flows one way: ``se3t_data`` builds batches, this package drives, the ``se3t`` core computes. The core
never imports this package.
"""

from .build import ModelConfig, TargetInfo, build_model
from .checkpoint import load_checkpoint, save_checkpoint
from .data import EpochPlan
from .distributed import DistInfo, init_distributed
from .errors import TrainingDiverged, UserError
from .heap import return_freed_memory
from .optim import StepInBackward
from .precision import Precision, PrecisionPolicy, resolve_precision
from .training import Trainer, TrainOptions

__all__ = [
    "DistInfo",
    "EpochPlan",
    "ModelConfig",
    "Precision",
    "PrecisionPolicy",
    "StepInBackward",
    "TargetInfo",
    "Trainer",
    "TrainOptions",
    "TrainingDiverged",
    "UserError",
    "build_model",
    "init_distributed",
    "load_checkpoint",
    "resolve_precision",
    "return_freed_memory",
    "save_checkpoint",
]
