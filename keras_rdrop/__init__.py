"""keras-rdrop: R-Drop and reference-KL regularization for any Keras 3 model.

The public API is exactly the names below; everything under `keras_rdrop.src`
is internal and may change between releases.
"""

from keras_rdrop.src.chunked_gradients import get_chunk_elements, set_chunk_elements
from keras_rdrop.src.divergences import kl_divergence, symmetric_kl_divergence
from keras_rdrop.src.losses import SymmetricKLDivergence
from keras_rdrop.src.rdrop_model import RDropModel
from keras_rdrop.src.reference_kl_regularizer import ReferenceKLRegularizer
from keras_rdrop.src.step_mode import TrainingOutputs
from keras_rdrop.src.version import __version__

__all__ = [
    "RDropModel",
    "ReferenceKLRegularizer",
    "SymmetricKLDivergence",
    "TrainingOutputs",
    "__version__",
    "get_chunk_elements",
    "kl_divergence",
    "set_chunk_elements",
    "symmetric_kl_divergence",
]
