"""stablemath: numerically stable softmax, log_softmax, logsumexp and cross-entropy,
written once against the Python array API standard.

Every function takes arrays of any library that array-api-compat knows (NumPy,
PyTorch, JAX, CuPy, Dask, array-api-strict) and returns arrays of the same library on
the same device, NaN-free for NaN-free input. See ``SPEC.md`` for the guarantees.
"""

from ._losses import cross_entropy, nll_loss
from ._reductions import log_softmax, logsumexp, softmax

__version__ = "0.1.0"

__all__ = ["__version__", "cross_entropy", "log_softmax", "logsumexp", "nll_loss", "softmax"]
