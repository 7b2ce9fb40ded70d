"""The seeds' recurrent sequence classifiers: :class:`LSTMClassifier` (a stacked LSTM) and :class:`TanhRNN` (an Elman
RNN, h_t = tanh(W x_t + U h_{t-1} + b)), on fastattn's recurrent kernels (:class:`fastattn.LSTM`,
:class:`fastattn.RNN`), each with a pure torch.nn twin (:class:`TorchLSTMClassifier`, :class:`TorchTanhRNN`: same
constructor, same ``state_dict`` keys and shapes, same results).

Both read x (batch, seq, input_size) batch first, keep the recurrent output of the last time step, (batch, hidden),
and map it to (batch, num_classes) logits with one linear layer; ``predict_proba`` is the softmax of the logits.
``torch.compile`` refuses torch.nn.RNNBase subclasses (fastattn's included) unless
``torch._dynamo.config.allow_rnn = True``; with it, fastattn's models compile into one graph.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fastattn.nn.recurrent import LSTM, RNN


class _SequenceClassifier(nn.Module):
    """What the classifiers share: the last step's output -> ``self.fc`` logits (fastattn's models; the twins
    spell theirs out, so that the parity tests check it), and their softmax."""

    fc: nn.Linear

    def head(self, output: Tensor) -> Tensor:
        """output (batch, seq, hidden) of the recurrent layers -> logits (batch, num_classes) from the last step."""
        return self.fc(output[:, -1])

    def predict_proba(self, x: Tensor) -> Tensor:
        """x (batch, seq, input_size) -> class probabilities (batch, num_classes), softmax of the logits."""
        return torch.softmax(self(x), dim=-1)


class LSTMClassifier(_SequenceClassifier):
    """The seeds' LSTM sequence classifier, on :class:`fastattn.LSTM`::

        (h_0, c_0) = zeros -> LSTM(input_size, hidden_size, num_layers, batch_first, dropout) -> output[:, -1]
        -> Linear(hidden_size, num_classes)

    Args:
        input_size: features per step; hidden_size: LSTM width; num_classes: logits per sequence.
        num_layers: stacked LSTM layers (2, as the seed); dropout: on the outputs of every layer but the last, in
            training (0); drawn by :func:`fastattn.dropout`, so not the twin's draws.

    forward(x): x (batch, seq, input_size) float, seq >= 1 -> logits (batch, num_classes). The zero initial state is
    built on x's device and dtype. ``predict_proba(x)``: the softmax of the logits (the seed's softmax head; train
    on the logits with ``F.cross_entropy``).
    """

    def __init__(self, input_size: int, hidden_size: int, num_classes: int, num_layers: int = 2,
                 dropout: float = 0.0):  # fmt: skip
        super().__init__()
        _check_sizes(type(self).__name__, input_size=input_size, hidden_size=hidden_size, num_classes=num_classes,
                     num_layers=num_layers)  # fmt: skip
        self.lstm = LSTM(input_size, hidden_size, num_layers, batch_first=True, dropout=dropout)
        self.fc = nn.Linear(hidden_size, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """x (batch, seq, input_size) -> logits (batch, num_classes)."""
        check_sequences(type(self).__name__, x)
        return self.head(self.lstm(x, zero_state(self.lstm, x))[0])


class TorchLSTMClassifier(_SequenceClassifier):
    """The pure torch.nn twin of :class:`LSTMClassifier` (torch.nn.LSTM): same arguments, ``state_dict`` and results
    (dropout draws aside)."""

    def __init__(self, input_size: int, hidden_size: int, num_classes: int, num_layers: int = 2,
                 dropout: float = 0.0):  # fmt: skip
        super().__init__()
        self.lstm = nn.LSTM(input_size, hidden_size, num_layers, batch_first=True, dropout=dropout)
        self.fc = nn.Linear(hidden_size, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        h0 = torch.zeros(self.lstm.num_layers, x.shape[0], self.lstm.hidden_size, device=x.device, dtype=x.dtype)
        output, _ = self.lstm(x, (h0, torch.zeros_like(h0)))  # (batch, seq, hidden_size)
        return self.fc(output[:, -1, :])


class TanhRNN(_SequenceClassifier):
    """An Elman RNN classifier on :class:`fastattn.RNN`: per layer h_t = tanh(W_ih x_t + b_ih + W_hh h_{t-1} + b_hh)
    from h_0 = 0, then Linear(hidden_size, num_classes) on the last step's h.

    Args: input_size, hidden_size, num_classes; num_layers (1); dropout between layers in training (0, drawn by
    :func:`fastattn.dropout`).

    forward(x): x (batch, seq, input_size) float, seq >= 1 -> logits (batch, num_classes); ``predict_proba(x)``: their
    softmax.
    """

    def __init__(self, input_size: int, hidden_size: int, num_classes: int, num_layers: int = 1,
                 dropout: float = 0.0):  # fmt: skip
        super().__init__()
        _check_sizes(type(self).__name__, input_size=input_size, hidden_size=hidden_size, num_classes=num_classes,
                     num_layers=num_layers)  # fmt: skip
        self.rnn = RNN(input_size, hidden_size, num_layers, nonlinearity="tanh", batch_first=True, dropout=dropout)
        self.fc = nn.Linear(hidden_size, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """x (batch, seq, input_size) -> logits (batch, num_classes)."""
        check_sequences(type(self).__name__, x)
        return self.head(self.rnn(x)[0])


class TorchTanhRNN(_SequenceClassifier):
    """The pure torch.nn twin of :class:`TanhRNN` (torch.nn.RNN): same arguments, ``state_dict`` and results."""

    def __init__(self, input_size: int, hidden_size: int, num_classes: int, num_layers: int = 1,
                 dropout: float = 0.0):  # fmt: skip
        super().__init__()
        self.rnn = nn.RNN(input_size, hidden_size, num_layers, nonlinearity="tanh", batch_first=True, dropout=dropout)
        self.fc = nn.Linear(hidden_size, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        output, _ = self.rnn(x)  # (batch, seq, hidden_size)
        return self.fc(output[:, -1, :])


def zero_state(lstm: nn.LSTM, x: Tensor) -> tuple[Tensor, Tensor]:
    """(h_0, c_0), both zeros (num_layers, batch, hidden_size) on x's device and dtype, for a batch-first x."""
    h0 = x.new_zeros(lstm.num_layers, x.shape[0], lstm.hidden_size)
    return h0, torch.zeros_like(h0)


def check_sequences(name: str, x) -> None:
    """x must be a float (batch, seq, features) tensor with seq >= 1; the features are the recurrent layer's to
    check (RuntimeError, as torch.nn)."""
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError(f"{name}: x must be a floating-point Tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    if x.dim() != 3 or x.shape[1] < 1:
        raise ValueError(f"{name}: x must be (batch, seq, input_size) with seq >= 1, got shape {tuple(x.shape)}")


def _check_sizes(name: str, **sizes) -> None:
    for arg, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: {arg} must be a positive int, got {value!r}")


__all__ = ["LSTMClassifier", "TanhRNN", "TorchLSTMClassifier", "TorchTanhRNN"]
