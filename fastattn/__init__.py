"""fastattn: fused PyTorch kernels (Triton, CUDA C++, C++ CPU) behind drop-in functions and modules.

Importing never fails for want of the compiled extension: backends that need it report why they are
unavailable (``python -m fastattn.info``).
"""

from fastattn import backends, reference
from fastattn.backends import BackendError, backend, record
from fastattn.convert import convert
from fastattn.nn import (
    GRU,
    LSTM,
    RNN,
    LayerNorm,
    LayerNormLSTM,
    MultiheadAttention,
    RMSNorm,
    RotaryEmbedding,
    Softmax,
    Transformer,
    TransformerDecoder,
    TransformerDecoderLayer,
    TransformerEncoder,
    TransformerEncoderLayer,
)
from fastattn.nn.conv import ConvBNAct, FusedConv2d
from fastattn.nn.positional import LearnedPositionalEmbedding, SinusoidalPositionalEncoding, TokenAndPositionEmbedding
from fastattn.ops.attention import attention, scaled_dot_product_attention
from fastattn.ops.conv_epilogue import conv_epilogue
from fastattn.ops.decode_linear import decode_linear
from fastattn.ops.dropout import dropout
from fastattn.ops.kvcache import attention_with_kvcache
from fastattn.ops.linear import linear
from fastattn.ops.norm import dropout_add_norm, layer_norm, rms_norm
from fastattn.ops.positional import (
    alibi_slopes,
    embedding_with_positions,
    learned_positional_encoding,
    sinusoidal_positional_encoding,
)
from fastattn.ops.rotary import apply_rotary
from fastattn.ops.softmax import log_softmax, softmax

__version__ = "0.1.0"

__all__ = [
    "BackendError",
    "ConvBNAct",
    "FusedConv2d",
    "GRU",
    "LSTM",
    "LayerNorm",
    "LayerNormLSTM",
    "LearnedPositionalEmbedding",
    "MultiheadAttention",
    "RMSNorm",
    "RNN",
    "RotaryEmbedding",
    "SinusoidalPositionalEncoding",
    "Softmax",
    "TokenAndPositionEmbedding",
    "Transformer",
    "TransformerDecoder",
    "TransformerDecoderLayer",
    "TransformerEncoder",
    "TransformerEncoderLayer",
    "alibi_slopes",
    "apply_rotary",
    "attention",
    "attention_with_kvcache",
    "backend",
    "backends",
    "conv_epilogue",
    "convert",
    "decode_linear",
    "dropout",
    "dropout_add_norm",
    "embedding_with_positions",
    "layer_norm",
    "learned_positional_encoding",
    "linear",
    "log_softmax",
    "record",
    "reference",
    "rms_norm",
    "scaled_dot_product_attention",
    "sinusoidal_positional_encoding",
    "softmax",
]
