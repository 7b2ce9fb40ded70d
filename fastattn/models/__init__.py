"""Full models built from fastattn's modules, each with a pure torch.nn twin (same state_dict) for parity tests."""

from fastattn.models.bert import BertMLM, TorchBertMLM
from fastattn.models.seq2seq import Seq2SeqTransformer, TorchSeq2SeqTransformer
from fastattn.models.sequence import SequenceTransformer, TorchSequenceTransformer

__all__ = [
    "BertMLM",
    "Seq2SeqTransformer",
    "SequenceTransformer",
    "TorchBertMLM",
    "TorchSeq2SeqTransformer",
    "TorchSequenceTransformer",
]
