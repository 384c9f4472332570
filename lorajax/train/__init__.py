"""Training on one `TrainState`: a step that differentiates only the trainable leaves, a resumable loop."""

from lorajax.train import losses
from lorajax.train.checkpoint import CheckpointError
from lorajax.train.loop import NonFiniteError, fit
from lorajax.train.state import TrainState
from lorajax.train.step import make_lora_step, refresh_state

__all__ = ["TrainState", "make_lora_step", "fit", "refresh_state", "NonFiniteError", "CheckpointError", "losses"]
