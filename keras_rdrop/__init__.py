"""keras-rdrop: R-Drop and reference-KL regularization for any Keras 3 model."""

from keras_rdrop.divergences import kl_divergence, symmetric_kl_divergence
from keras_rdrop.losses import SymmetricKLDivergence
from keras_rdrop.rdrop_model import RDropModel
from keras_rdrop.reference_kl_regularizer import ReferenceKLRegularizer
from keras_rdrop.version import __version__

__all__ = [
    "RDropModel",
    "ReferenceKLRegularizer",
    "SymmetricKLDivergence",
    "__version__",
    "kl_divergence",
    "symmetric_kl_divergence",
]
