"""Drop-ins for torch.nn's Transformer modules: ``fastattn.TransformerEncoderLayer``, ``TransformerDecoderLayer``,
``TransformerEncoder``, ``TransformerDecoder`` and ``Transformer``.

Each subclasses its torch.nn twin, so the constructor, parameters, initialisation, ``state_dict`` keys and forward
arguments are torch's; only the computation changes: attention runs in the fused kernel
(:class:`fastattn.MultiheadAttention`) and each residual add, its dropout and the LayerNorm that follows run as one
kernel (:func:`fastattn.dropout_add_norm`); the linears run :func:`fastattn.linear`.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Iterator, Optional

import torch
from torch import Tensor

from fastattn.nn.attention import check_mask_dtype
from fastattn.nn.norm import LayerNorm
from fastattn.ops.dropout import dropout as fused_dropout
from fastattn.ops.linear import module_linear
from fastattn.ops.norm import dropout_add_norm


def _adopt(module: torch.nn.Module) -> None:
    """Give the torch.nn submodules that torch's constructors built their fastattn classes (same state)."""
    from fastattn.convert import convert  # noqa: PLC0415 (convert imports this module)

    convert(module)


def _add_norm(x: Tensor, residual: Tensor, norm: torch.nn.Module, dropout: torch.nn.Module) -> tuple[Tensor, Tensor]:
    """``z = residual + dropout(x)`` and ``norm(z)``, returned as ``(norm(z), z)``: one kernel when ``norm`` is a
    LayerNorm over the last dim."""
    if type(norm) in (torch.nn.LayerNorm, LayerNorm) and len(norm.normalized_shape) == 1:
        p = dropout.p if dropout.training else 0.0
        return dropout_add_norm(x, residual, norm.normalized_shape, norm.weight, norm.bias, eps=norm.eps, dropout_p=p)
    z = residual + _dropout(x, dropout)
    return norm(z), z


def _dropout(x: Tensor, dropout: torch.nn.Module) -> Tensor:
    """``dropout(x)``, through :func:`fastattn.dropout` (Philox in the kernel, no stored mask) for a torch Dropout."""
    if type(dropout) is torch.nn.Dropout and not dropout.inplace:
        return fused_dropout(x, dropout.p, dropout.training)
    return dropout(x)


def _feed_forward(layer: torch.nn.Module, x: Tensor) -> Tensor:
    """``linear2(dropout(activation(linear1(x))))`` of a layer (its dropout of the result joins the next add);
    ReLU in place when no gradient is recorded (with one, autograd would copy linear1's output view back)."""
    h = module_linear(layer.linear1, x)
    relu = layer.activation is torch.nn.functional.relu or isinstance(layer.activation, torch.nn.ReLU)
    h = torch.relu_(h) if relu and not torch.is_grad_enabled() else layer.activation(h)
    return module_linear(layer.linear2, _dropout(h, layer.dropout))


class TransformerEncoderLayer(torch.nn.TransformerEncoderLayer):
    """:class:`torch.nn.TransformerEncoderLayer` on fastattn kernels (same arguments, parameters and results).

    src (S, N, E), or (N, S, E) with ``batch_first``, or (S, E) unbatched; ``src_mask`` (S, S) or (N * nhead, S, S),
    bool True = not allowed or float added; ``src_key_padding_mask`` (N, S), True = padding; ``is_causal`` a hint
    that ``src_mask`` is the causal mask.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        _adopt(self)

    def forward(
        self,
        src: Tensor,
        src_mask: Optional[Tensor] = None,
        src_key_padding_mask: Optional[Tensor] = None,
        is_causal: bool = False,
    ) -> Tensor:
        check_mask_dtype(src_key_padding_mask, "src_key_padding_mask")
        check_mask_dtype(src_mask, "src_mask")
        x = src
        if self.norm_first:
            h = self.norm1(x)
            h, x = _add_norm(self._sa_block(h, src_mask, src_key_padding_mask, is_causal), x, self.norm2,
                             self.dropout1)  # fmt: skip
            return x + _dropout(_feed_forward(self, h), self.dropout2)
        x = _add_norm(self._sa_block(x, src_mask, src_key_padding_mask, is_causal), x, self.norm1, self.dropout1)[0]
        return _add_norm(_feed_forward(self, x), x, self.norm2, self.dropout2)[0]

    def _sa_block(self, x: Tensor, attn_mask, key_padding_mask, is_causal: bool = False) -> Tensor:
        """The self-attention's output, before its dropout (which joins the fused add and norm)."""
        return self.self_attn(x, x, x, attn_mask=attn_mask, key_padding_mask=key_padding_mask, need_weights=False,
                              is_causal=is_causal)[0]  # fmt: skip


class TransformerDecoderLayer(torch.nn.TransformerDecoderLayer):
    """:class:`torch.nn.TransformerDecoderLayer` on fastattn kernels (same arguments, parameters and results).

    tgt (T, N, E) and memory (S, N, E) (N first with ``batch_first``; no N unbatched); masks as torch's.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        _adopt(self)

    def forward(
        self,
        tgt: Tensor,
        memory: Tensor,
        tgt_mask: Optional[Tensor] = None,
        memory_mask: Optional[Tensor] = None,
        tgt_key_padding_mask: Optional[Tensor] = None,
        memory_key_padding_mask: Optional[Tensor] = None,
        tgt_is_causal: bool = False,
        memory_is_causal: bool = False,
    ) -> Tensor:
        x = tgt
        if self.norm_first:
            h = self.norm1(x)
            h, x = _add_norm(self._sa_block(h, tgt_mask, tgt_key_padding_mask, tgt_is_causal), x, self.norm2,
                             self.dropout1)  # fmt: skip
            h, x = _add_norm(self._mha_block(h, memory, memory_mask, memory_key_padding_mask, memory_is_causal), x,
                             self.norm3, self.dropout2)  # fmt: skip
            return x + _dropout(_feed_forward(self, h), self.dropout3)
        x = _add_norm(self._sa_block(x, tgt_mask, tgt_key_padding_mask, tgt_is_causal), x, self.norm1,
                      self.dropout1)[0]  # fmt: skip
        x = _add_norm(self._mha_block(x, memory, memory_mask, memory_key_padding_mask, memory_is_causal), x,
                      self.norm2, self.dropout2)[0]  # fmt: skip
        return _add_norm(_feed_forward(self, x), x, self.norm3, self.dropout3)[0]

    def _sa_block(self, x: Tensor, attn_mask, key_padding_mask, is_causal: bool = False) -> Tensor:
        return self.self_attn(x, x, x, attn_mask=attn_mask, key_padding_mask=key_padding_mask, need_weights=False,
                              is_causal=is_causal)[0]  # fmt: skip

    def _mha_block(self, x: Tensor, mem: Tensor, attn_mask, key_padding_mask, is_causal: bool = False) -> Tensor:
        return self.multihead_attn(x, mem, mem, attn_mask=attn_mask, key_padding_mask=key_padding_mask,
                                   need_weights=False, is_causal=is_causal)[0]  # fmt: skip


class TransformerEncoder(torch.nn.TransformerEncoder):
    """:class:`torch.nn.TransformerEncoder` of fastattn layers (a torch.nn layer given to it is converted).

    Where torch's eval fast path would run the layers on a nested tensor (eval mode, no grad, a
    ``src_key_padding_mask`` and no ``mask``), torch returns 0 at the padded positions (before the final norm);
    so does this class, though it computes on the padded tensor.
    """

    def __init__(self, *args, **kwargs):
        with _quiet_nested_tensor_advice():
            super().__init__(*args, **kwargs)
        _adopt(self)

    def forward(
        self,
        src: Tensor,
        mask: Optional[Tensor] = None,
        src_key_padding_mask: Optional[Tensor] = None,
        is_causal: Optional[bool] = None,
    ) -> Tensor:
        check_mask_dtype(src_key_padding_mask, "src_key_padding_mask")
        check_mask_dtype(mask, "mask")
        first = self.layers[0]
        batch_first = first.self_attn.batch_first
        seq_len = src.shape[1 if batch_first and src.dim() == 3 else 0]
        is_causal = torch.nn.modules.transformer._detect_is_causal_mask(mask, is_causal, seq_len)
        output = src
        for layer in self.layers:
            output = layer(output, src_mask=mask, is_causal=is_causal, src_key_padding_mask=src_key_padding_mask)
        if self._torch_zeroes_padding(src, mask, src_key_padding_mask):
            padding = src_key_padding_mask != 0  # bool, or float with -inf at the padding (as torch reads it)
            padding = padding if batch_first else padding.transpose(0, 1)
            output = output.masked_fill(padding.unsqueeze(-1), 0.0)
        return output if self.norm is None else self.norm(output)

    def _torch_zeroes_padding(self, src: Tensor, mask: Optional[Tensor], padding: Optional[Tensor]) -> bool:
        """Whether torch's TransformerEncoder would run on a nested tensor here (its "sparsity fast path")."""
        if padding is None or mask is not None or src.dim() != 3:
            return False
        if not (torch.backends.mha.get_fastpath_enabled() and getattr(self, "use_nested_tensor", False)):
            return False
        if self.layers[0].training or torch.is_autocast_enabled() or torch.compiler.is_compiling():
            return False
        if torch.is_grad_enabled() and (src.requires_grad or any(p.requires_grad for p in self.parameters())):
            return False
        if getattr(self, "mask_check", True):
            return bool(torch._nested_tensor_from_mask_left_aligned(src, padding == 0))
        return True


class TransformerDecoder(torch.nn.TransformerDecoder):
    """:class:`torch.nn.TransformerDecoder` of fastattn layers (a torch.nn layer given to it is converted)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        _adopt(self)


class Transformer(torch.nn.Transformer):
    """:class:`torch.nn.Transformer` built from fastattn's encoder and decoder (same arguments, parameters,
    initialisation and results); ``generate_square_subsequent_mask`` as torch's."""

    def __init__(self, *args, **kwargs):
        with _quiet_nested_tensor_advice():
            super().__init__(*args, **kwargs)
        _adopt(self)


@contextlib.contextmanager
def _quiet_nested_tensor_advice() -> Iterator[None]:
    """Silences torch's advice on when its encoder can use nested tensors, which fastattn's encoder never uses."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="enable_nested_tensor is True", category=UserWarning)
        yield


__all__ = [
    "Transformer",
    "TransformerDecoder",
    "TransformerDecoderLayer",
    "TransformerEncoder",
    "TransformerEncoderLayer",
]
