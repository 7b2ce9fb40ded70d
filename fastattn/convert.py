"""``fastattn.convert(model)``: swap torch.nn modules for their fastattn drop-ins, in place, and report what changed.

Every fastattn drop-in subclasses its torch.nn twin and adds no state, so a module is converted by changing its
class: parameters, buffers, devices, dtypes, train/eval mode, hooks and the optimizer's references to the
parameters all stay as they were, and ``state_dict()`` is unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from fastattn.nn.attention import MultiheadAttention
from fastattn.nn.norm import LayerNorm, RMSNorm
from fastattn.nn.recurrent import GRU, LSTM, RNN, LayerNormLSTM
from fastattn.nn.softmax import Softmax
from fastattn.nn.transformer import (
    Transformer,
    TransformerDecoder,
    TransformerDecoderLayer,
    TransformerEncoder,
    TransformerEncoderLayer,
)

# torch.nn class -> its fastattn drop-in (a subclass that adds no state).
DROP_INS: dict[type, type] = {
    torch.nn.MultiheadAttention: MultiheadAttention,
    torch.nn.TransformerEncoderLayer: TransformerEncoderLayer,
    torch.nn.TransformerDecoderLayer: TransformerDecoderLayer,
    torch.nn.TransformerEncoder: TransformerEncoder,
    torch.nn.TransformerDecoder: TransformerDecoder,
    torch.nn.Transformer: Transformer,
    torch.nn.LayerNorm: LayerNorm,
    torch.nn.RMSNorm: RMSNorm,
    torch.nn.Softmax: Softmax,
    torch.nn.LSTM: LSTM,
    torch.nn.GRU: GRU,
    torch.nn.RNN: RNN,
}

# torch.nn classes fastattn has no drop-in for yet, and why they are left (none at present).
NOT_YET: dict[type, str] = {}

# fastattn's own modules that subclass a torch.nn class but are no drop-in (they add parameters): never reported.
OWN_MODULES = (LayerNormLSTM,)


@dataclass
class Report:
    """What :func:`convert` did: ``replaced`` (name, torch class, fastattn class) and ``left`` (name, class,
    reason) for every module of a kind fastattn knows that it did not replace. Names are ``named_modules`` names
    ("" is the model itself)."""

    model: torch.nn.Module
    replaced: list[tuple[str, str, str]] = field(default_factory=list)
    left: list[tuple[str, str, str]] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"fastattn.convert: replaced {len(self.replaced)} module(s), left {len(self.left)}"]
        lines += [f"  replaced {name or '(model)'}: {old} -> {new}" for name, old, new in self.replaced]
        lines += [f"  left     {name or '(model)'}: {cls} ({why})" for name, cls, why in self.left]
        return "\n".join(lines)


def convert(model: torch.nn.Module) -> Report:
    """Replace, in place, every torch.nn MultiheadAttention, Transformer (and its encoder, decoder and layers),
    LayerNorm, RMSNorm, Softmax, LSTM, GRU and RNN in ``model`` (the model itself included) with its fastattn
    drop-in.

    Returns a :class:`Report` (``print`` it) of what was replaced, and of the modules left as they were and why:
    subclasses of those torch.nn classes (their own code may rely on torch's forward), TorchScript modules,
    and kinds fastattn has no drop-in for yet (listed in ``NOT_YET``). Outputs are unchanged within the
    error-ratio rule, except where the drop-in's docstring says otherwise (e.g. dropout, in the attention and
    between recurrent layers, draws its own random numbers).
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"fastattn.convert: model must be a torch.nn.Module, got {type(model).__name__}")
    report = Report(model)
    for name, module in model.named_modules(remove_duplicate=True):
        cls = type(module)
        if cls in DROP_INS:
            module.__class__ = DROP_INS[cls]
            report.replaced.append((name, _qualname(cls), _qualname(DROP_INS[cls])))
            continue
        why = _why_left(module)
        if why is not None:
            report.left.append((name, _qualname(cls), why))
    return report


def _why_left(module: torch.nn.Module) -> Optional[str]:
    """Why convert leaves a module of a kind it knows as it is; None for any other module."""
    cls = type(module)
    if cls in DROP_INS.values() or isinstance(module, OWN_MODULES):
        return None  # already fastattn's
    if isinstance(module, torch.jit.ScriptModule):
        return "a TorchScript module cannot be changed"
    for torch_cls, reason in NOT_YET.items():
        if isinstance(module, torch_cls):
            return reason
    for torch_cls, fast_cls in DROP_INS.items():
        if isinstance(module, torch_cls) and not isinstance(module, fast_cls):
            return f"a subclass of {_qualname(torch_cls)}, whose own code may rely on torch's implementation"
    return None


def _qualname(cls: type) -> str:
    """torch.nn.X and fastattn.X for their classes, else the full name."""
    for package in ("torch.nn", "fastattn"):
        if cls.__module__.startswith(package + "."):
            return f"{package}.{cls.__name__}"
    return f"{cls.__module__}.{cls.__qualname__}"
