"""``fastattn.LSTM``, ``fastattn.GRU`` and ``fastattn.RNN``: drop-ins for their torch.nn twins, computed by
:func:`fastattn.ops.recurrent.recurrent`; and ``fastattn.LayerNormLSTM``, an LSTM with layer-normalised gates and
cell (Ba, Kiros & Hinton 2016), built on torch.nn.LSTM's constructor, checks and PackedSequence handling.

Shapes (L = num_layers, D = 2 if bidirectional else 1, H = hidden_size, P = proj_size or H, N = batch):
input (seq, N, input_size), (N, seq, input_size) when batch_first, (seq, input_size) unbatched, or a
PackedSequence; h_0 / h_n (L*D, N, P) ((L*D, P) unbatched); c_0 / c_n (L*D, N, H); output (seq, N, D*P) (batch
first when batch_first), or a PackedSequence with the input's batch_sizes, sorted_indices and unsorted_indices.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.nn import Parameter, init
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from fastattn import backends
from fastattn.nn._drop_in import DropIn
from fastattn.ops.recurrent import recurrent, unfused_reason

State = Tensor | tuple[Tensor, Tensor]  # h for the GRU and RNN, (h, c) for the LSTMs


class _Recurrent:
    """The forward shared by the recurrent modules (mixed into a torch.nn.RNNBase subclass): torch.nn's argument
    checks (``check_input``, ``check_forward_args``, ``permute_hidden``) and PackedSequence handling around
    :func:`fastattn.ops.recurrent.recurrent`."""

    def _kind(self) -> str:
        """The kind of :func:`fastattn.ops.recurrent.recurrent`: lstm, gru, rnn_tanh or rnn_relu."""
        return self.mode.lower()

    def _param_names(self) -> list[str]:
        return list(self._flat_weights_names)

    def _eps(self) -> float:
        return 1e-5

    def _unfused_reason(self, x: Tensor) -> str | None:
        """Why no fused kernel runs x here (then torch.nn's forward does), or None."""
        return unfused_reason(x, self._kind(), self.proj_size > 0, self.hidden_size)

    def _has_cell(self) -> bool:
        return isinstance(self, torch.nn.LSTM)

    def forward(self, input: Tensor | PackedSequence, hx: State | None = None):  # noqa: A002
        """input (seq, N, input_size) (N first when batch_first), (seq, input_size) or a PackedSequence; hx None
        (zeros), h_0 or, for the LSTMs, (h_0, c_0) -> (output, h_n), or (output, (h_n, c_n)) for the LSTMs."""
        self._update_flat_weights()
        data = input.data if isinstance(input, PackedSequence) else input
        why_torch = self._unfused_reason(data)
        if why_torch is not None:  # torch.nn's own kernels (cuDNN, oneDNN) beat the reference loop
            backends.report_fallback("recurrent", "torch.nn", why_torch)
            return super().forward(input, hx)
        if isinstance(input, PackedSequence):
            return self._forward_packed(input, hx)
        if input.dim() not in (2, 3):
            raise ValueError(f"{type(self).__name__}: Expected input to be 2D or 3D, got {input.dim()}D instead")
        batched = input.dim() == 3
        batch_dim = 0 if self.batch_first else 1
        self._check_state_dims(hx, input.dim())
        if not batched:
            input = input.unsqueeze(batch_dim)
            hx = _map_state(hx, lambda t: t.unsqueeze(1))
        self._check_args(input, hx, None)
        output, h_n = self._run(input, hx, None, self.batch_first)
        if not batched:
            output, h_n = output.squeeze(batch_dim), _map_state(h_n, lambda t: t.squeeze(1))
        return output, h_n

    def _forward_packed(self, packed: PackedSequence, hx: State | None):
        """A PackedSequence in, as torch.nn: hx's batch is permuted into the packed (longest first) order, and
        h_n back into the caller's; the packed data runs padded, (seq, N, input_size) with per-sequence lengths."""
        data, batch_sizes, sorted_indices, unsorted_indices = packed
        if hx is not None:
            self._check_state_dims(hx, 3)
            hx = self.permute_hidden(hx, sorted_indices)
        self._check_args(data, hx, batch_sizes)
        padded, lengths = pad_packed_sequence(PackedSequence(data, batch_sizes))  # (seq, N, input_size), (N,)
        output, h_n = self._run(padded, hx, lengths, batch_first=False)
        output = pack_padded_sequence(output, lengths).data  # (sum of lengths, D*P)
        return PackedSequence(output, batch_sizes, sorted_indices, unsorted_indices), self.permute_hidden(
            h_n, unsorted_indices
        )

    def _run(self, x: Tensor, hx: State | None, lengths: Tensor | None, batch_first: bool):
        params = {name: getattr(self, name) for name in self._param_names()}
        return recurrent(
            self._kind(), x, hx, params, self.num_layers, self.bidirectional, batch_first, lengths, self.dropout,
            self.training, self._eps(),
        )  # fmt: skip

    def _check_state_dims(self, hx: State | None, input_dim: int) -> None:
        """torch.nn's check that hx is 3-D for batched input and 2-D for unbatched input."""
        if hx is None:
            return
        name = type(self).__name__
        kind = "batched 3-D" if input_dim == 3 else "unbatched 2-D"
        if self._has_cell():
            if not isinstance(hx, (tuple, list)) or len(hx) != 2:
                raise TypeError(f"{name}: hx must be None or a tuple (h_0, c_0), got {type(hx).__name__}")
            if hx[0].dim() != input_dim or hx[1].dim() != input_dim:
                raise RuntimeError(
                    f"For {kind} input, hx and cx should also be {input_dim}-D but got "
                    f"({hx[0].dim()}-D, {hx[1].dim()}-D) tensors"
                )
        else:
            if not isinstance(hx, Tensor):
                raise TypeError(f"{name}: hx must be None or a Tensor, got {type(hx).__name__}")
            if hx.dim() != input_dim:
                raise RuntimeError(f"For {kind} input, hx should also be {input_dim}-D but got {hx.dim()}-D tensor")

    def _check_args(self, input: Tensor, hx: State | None, batch_sizes: Tensor | None) -> None:  # noqa: A002
        """torch.nn's checks of the input (dims, input_size, dtype against the weights) and of the states'
        shapes; then that the states have the input's dtype."""
        if hx is None:
            self.check_input(input, batch_sizes)
            return
        self.check_forward_args(input, hx, batch_sizes)
        states = zip(("h_0", "c_0"), hx, strict=True) if self._has_cell() else [("h_0", hx)]
        for name, state in states:
            if state.dtype != input.dtype:
                raise RuntimeError(
                    f"{type(self).__name__}: {name} dtype ({state.dtype}) does not match input dtype ({input.dtype})"
                )


def _map_state(hx: State | None, fn) -> State | None:
    if hx is None or isinstance(hx, Tensor):
        return None if hx is None else fn(hx)
    return tuple(fn(t) for t in hx)


class LSTM(DropIn, _Recurrent, torch.nn.LSTM):
    """:class:`torch.nn.LSTM` computed by :func:`fastattn.ops.recurrent.recurrent`.

    Same constructor (input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional, proj_size),
    parameters, initialisation, ``state_dict`` and forward: ``forward(input, hx=None) -> (output, (h_n, c_n))``,
    shapes as in :mod:`fastattn.nn.recurrent`, PackedSequence input included. Dropout between layers (training,
    ``dropout > 0``) is drawn by :func:`fastattn.dropout`: reproducible under :func:`torch.manual_seed` but not
    torch's draws; in eval mode or with ``dropout=0`` the results are torch's.
    """


class GRU(DropIn, _Recurrent, torch.nn.GRU):
    """:class:`torch.nn.GRU` computed by :func:`fastattn.ops.recurrent.recurrent`.

    Same constructor, parameters, initialisation, ``state_dict`` and forward: ``forward(input, hx=None) ->
    (output, h_n)``, shapes as in :mod:`fastattn.nn.recurrent`, PackedSequence input included. Dropout between
    layers is drawn by :func:`fastattn.dropout`, not torch's draws (see :class:`LSTM`).
    """


class RNN(DropIn, _Recurrent, torch.nn.RNN):
    """:class:`torch.nn.RNN` (``nonlinearity`` "tanh" or "relu") computed by
    :func:`fastattn.ops.recurrent.recurrent`.

    Same constructor, parameters, initialisation, ``state_dict`` and forward: ``forward(input, hx=None) ->
    (output, h_n)``, shapes as in :mod:`fastattn.nn.recurrent`, PackedSequence input included. Dropout between
    layers is drawn by :func:`fastattn.dropout`, not torch's draws (see :class:`LSTM`).
    """


class LayerNormLSTM(_Recurrent, torch.nn.LSTM):
    """An LSTM whose gate pre-activations and cell are layer-normalised (Ba, Kiros & Hinton 2016,
    "Layer Normalization", supplementary), with torch.nn.LSTM's gate order (i, f, g, o). Per step:

        gates = LN_ih(x_t W_ih^T) + LN_hh(h W_hh^T) + b_ih + b_hh      (LN over all 4H gates of a row at once)
        c'    = σ(f) c + σ(i) tanh(g)                                    (carried un-normalised)
        h'    = σ(o) tanh(LN_c(c')), times W_hr^T when proj_size > 0

    Each LN normalises over its last dim with ``eps``, then applies its own affine (weight, bias).
    Constructor: torch.nn.LSTM's (input_size, hidden_size, num_layers=1, bias=True, batch_first=False,
    dropout=0.0, bidirectional=False, proj_size=0, device=None, dtype=None) plus ``eps=1e-5``. Parameters:
    torch.nn.LSTM's, with its names, shapes and uniform(-1/sqrt(H), 1/sqrt(H)) initialisation (the same draws
    as torch.nn.LSTM's under the same seed), then per layer k and direction (``_reverse`` appended for the
    backward one) ``norm_ih_weight_l{k}``, ``norm_ih_bias_l{k}``, ``norm_hh_weight_l{k}``, ``norm_hh_bias_l{k}``
    (4H,) and ``norm_c_weight_l{k}``, ``norm_c_bias_l{k}`` (H,): weights 1, biases 0. ``bias=False`` removes
    b_ih and b_hh only; the norms keep their affine biases. Forward as :class:`LSTM`, PackedSequence input and
    dropout (drawn by :func:`fastattn.dropout`) included.
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        proj_size: int = 0,
        device=None,
        dtype=None,
        eps: float = 1e-5,
    ) -> None:
        super().__init__(
            input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional, proj_size,
            device=device, dtype=dtype,
        )  # fmt: skip
        if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps > 0:
            raise ValueError(f"LayerNormLSTM: eps must be a positive number, got {eps!r}")
        self.eps = float(eps)
        for name, size in self._norm_shapes():
            value = torch.ones if "_weight" in name else torch.zeros
            setattr(self, name, Parameter(value(size, device=device, dtype=dtype)))

    def _norm_shapes(self) -> list[tuple[str, int]]:
        """(name, size) of every norm parameter, layer by layer, forward direction first."""
        shapes = []
        for layer in range(self.num_layers):
            for suffix in ("", "_reverse") if self.bidirectional else ("",):
                for norm, size in (("ih", 4 * self.hidden_size), ("hh", 4 * self.hidden_size), ("c", self.hidden_size)):
                    shapes += [(f"norm_{norm}_{part}_l{layer}{suffix}", size) for part in ("weight", "bias")]
        return shapes

    def _kind(self) -> str:
        return "layernorm_lstm"

    def _unfused_reason(self, x: Tensor) -> str | None:
        return None  # torch.nn has no LayerNorm-LSTM: without a fused kernel the op runs the reference

    def _param_names(self) -> list[str]:
        return list(self._flat_weights_names) + [name for name, _ in self._norm_shapes()]

    def _eps(self) -> float:
        return self.eps

    def reset_parameters(self) -> None:
        """torch.nn.LSTM's uniform(-1/sqrt(H), 1/sqrt(H)) for its weights and biases (same draws in the same
        order), weights 1 and biases 0 for the norms."""
        bound = 1.0 / math.sqrt(self.hidden_size)
        for name in self._flat_weights_names:
            init.uniform_(getattr(self, name), -bound, bound)
        for name, _ in self._norm_shapes():
            if hasattr(self, name):  # torch.nn.LSTM's constructor resets before the norms exist
                (init.ones_ if "_weight" in name else init.zeros_)(getattr(self, name))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, eps={self.eps}"


__all__ = ["GRU", "LSTM", "LayerNormLSTM", "RNN"]
