"""Eager calls of fastattn's torch.library ops without the dispatcher.

Each op is a ``torch.library.custom_op`` so that torch.compile, fake tensors and export see one opaque node. In
plain eager calls that machinery costs more than the kernel on small inputs (about 150 us of Python per forward +
backward, against torch's 40 us for F.layer_norm), so :class:`EagerOp` runs the op's own implementation directly,
with its autograd formula through a ``torch.autograd.Function``. Both paths run the same functions: only the
dispatch differs.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

_PLAIN_TENSORS = (Tensor, torch.nn.Parameter)


def plain_eager(args) -> bool:
    """True for a call outside torch.compile/export tracing, under no dispatch mode, on plain tensors only."""
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack():
        return False
    return all(type(a) in _PLAIN_TENSORS for a in args if isinstance(a, Tensor))


class EagerOp:
    """``op(*args)``, with ``impl(*args)`` run directly in plain eager calls (through a ``torch.autograd.Function``
    when a tensor argument needs a gradient). ``setup_context(ctx, inputs, output)`` and ``backward(ctx, *grads)``
    are the functions registered with ``op.register_autograd``; without them (an op with no autograd) calls that
    need a gradient go to ``op``. Arguments are positional.
    """

    def __init__(
        self,
        op,
        impl: Callable,
        setup_context: Optional[Callable] = None,
        backward: Optional[Callable] = None,
    ):
        self.op, self.impl = op, impl
        self.function = None if backward is None else _autograd_function(impl, setup_context, backward)

    def __call__(self, *args):
        if not plain_eager(args):
            return self.op(*args)
        if torch.is_grad_enabled() and _needs_grad(args):  # without autograd, the op says what a backward would
            return self.op(*args) if self.function is None else self.function.apply(*args)
        return self.impl(*args)


def _needs_grad(args) -> bool:
    return any(isinstance(a, Tensor) and a.requires_grad for a in args)


def _autograd_function(impl: Callable, setup_context: Callable, backward: Callable) -> type[torch.autograd.Function]:
    """A Function with a separate ``setup_context``, as torch.func transforms (grad, jacrev) require."""

    def forward(*args):
        return impl(*args)

    name = f"{impl.__name__.strip('_').title().replace('_', '')}Function"
    methods = {n: staticmethod(f) for n, f in (("forward", forward), ("setup_context", setup_context),
                                               ("backward", backward))}  # fmt: skip
    return type(name, (torch.autograd.Function,), methods)
