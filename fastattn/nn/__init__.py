"""Drop-in modules: same constructor, state_dict and results as their torch.nn twins."""

from fastattn.nn.attention import MultiheadAttention
from fastattn.nn.conv import ConvBNAct, FusedConv2d, fold_batchnorm
from fastattn.nn.norm import LayerNorm, RMSNorm
from fastattn.nn.positional import LearnedPositionalEmbedding, SinusoidalPositionalEncoding, TokenAndPositionEmbedding
from fastattn.nn.recurrent import GRU, LSTM, RNN, LayerNormLSTM
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
    "fold_batchnorm",
]
