"""fastattn: fused PyTorch kernels (Triton, CUDA C++, C++ CPU) behind drop-in functions and modules.

Importing never fails for want of the compiled extension: backends that need it report why they are
unavailable (``python -m fastattn.info``).
"""

from fastattn import backends, reference
from fastattn.backends import BackendError, backend, record
from fastattn.nn import Softmax
from fastattn.ops.attention import attention, scaled_dot_product_attention
from fastattn.ops.kvcache import attention_with_kvcache
from fastattn.ops.softmax import log_softmax, softmax

__version__ = "0.1.0"

__all__ = [
    "BackendError",
    "Softmax",
    "attention",
    "attention_with_kvcache",
    "backend",
    "backends",
    "log_softmax",
    "record",
    "reference",
    "scaled_dot_product_attention",
    "softmax",
]
