"""Drop-in modules: same constructor, state_dict and results as their torch.nn twins."""

from fastattn.nn.attention import MultiheadAttention
from fastattn.nn.norm import LayerNorm, RMSNorm
from fastattn.nn.positional import LearnedPositionalEmbedding, SinusoidalPositionalEncoding, TokenAndPositionEmbedding
from fastattn.nn.rotary import RotaryEmbedding
from fastattn.nn.softmax import Softmax
from fastattn.nn.transformer import (
    Transformer,
    TransformerDecoder,
    TransformerDecoderLayer,
    TransformerEncoder,
    TransformerEncoderLayer,
)

__all__ = [
    "LayerNorm",
    "LearnedPositionalEmbedding",
    "MultiheadAttention",
    "RMSNorm",
    "RotaryEmbedding",
    "SinusoidalPositionalEncoding",
    "Softmax",
    "TokenAndPositionEmbedding",
    "Transformer",
    "TransformerDecoder",
    "TransformerDecoderLayer",
    "TransformerEncoder",
    "TransformerEncoderLayer",
]
