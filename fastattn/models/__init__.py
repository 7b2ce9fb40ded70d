"""Full models built from fastattn's modules, each with a pure torch.nn twin (same state_dict) for parity tests."""

from fastattn.models.seq2seq import Seq2SeqTransformer, TorchSeq2SeqTransformer

__all__ = ["Seq2SeqTransformer", "TorchSeq2SeqTransformer"]
