class TrainingStopped(RuntimeError):
    """Training cannot go on; the message names the step and what is kept (the CLI prints it, exit 2)."""


class TrainingDiverged(TrainingStopped):
    """A NaN or Inf loss or gradient: the stage stops with the step number; the last good checkpoint stays."""


class CheckpointWriteFailed(TrainingStopped):
    """A checkpoint could not be written (disk full, no permission): the earlier checkpoints stay whole."""
