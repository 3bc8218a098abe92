class TrainingDiverged(RuntimeError):
    """A NaN or Inf loss: the stage stops with the step number; the last good checkpoint stays."""
