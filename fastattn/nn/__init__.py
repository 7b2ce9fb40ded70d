"""Drop-in modules: same constructor, state_dict and results as their torch.nn twins."""

from fastattn.nn.norm import LayerNorm, RMSNorm
from fastattn.nn.positional import LearnedPositionalEmbedding, SinusoidalPositionalEncoding, TokenAndPositionEmbedding
from fastattn.nn.rotary import RotaryEmbedding
from fastattn.nn.softmax import Softmax

__all__ = [
    "LayerNorm",
    "LearnedPositionalEmbedding",
    "RMSNorm",
    "RotaryEmbedding",
    "SinusoidalPositionalEncoding",
    "Softmax",
    "TokenAndPositionEmbedding",
]
