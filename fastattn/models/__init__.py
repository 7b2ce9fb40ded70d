"""Full models built from fastattn's modules, each with a pure torch.nn twin (same state_dict) for parity tests."""

from fastattn.models.bert import BertMLM, TorchBertMLM
from fastattn.models.cnn import ImageCNN, MnistCNN, TorchImageCNN, TorchMnistCNN
from fastattn.models.rnn import LSTMClassifier, TanhRNN, TorchLSTMClassifier, TorchTanhRNN
from fastattn.models.seq2seq import Seq2SeqTransformer, TorchSeq2SeqTransformer
from fastattn.models.sequence import SequenceTransformer, TorchSequenceTransformer

__all__ = [
    "BertMLM",
    "ImageCNN",
    "LSTMClassifier",
    "MnistCNN",
    "Seq2SeqTransformer",
    "SequenceTransformer",
    "TanhRNN",
    "TorchBertMLM",
    "TorchImageCNN",
    "TorchLSTMClassifier",
    "TorchMnistCNN",
    "TorchSeq2SeqTransformer",
    "TorchSequenceTransformer",
    "TorchTanhRNN",
]
