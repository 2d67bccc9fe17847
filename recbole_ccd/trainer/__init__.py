"""Training along the stream."""

from recbole_ccd.trainer.stream import StreamLearner, StreamRunner, SingleModelLearner
from recbole_ccd.trainer.trainer import StreamTrainer

__all__ = ["SingleModelLearner", "StreamLearner", "StreamRunner", "StreamTrainer"]
