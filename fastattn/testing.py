"""Test helpers: the one tolerance rule and the one assertion that reports where values differ.

The error-ratio rule (as in FlashAttention's tests): compute the truth in float64, measure PyTorch's own
error in the tested dtype (the baseline), and require ours to be at most ``ratio`` times it (2 for outputs,
3 for gradients) plus a floor: a few unit roundoffs of the dtype, scaled to the values' magnitude. Float64
gets 64 of them, because there the baseline *is* the truth and only the floor allows for rounding.
"""

from __future__ import annotations

import torch
from torch import Tensor

OUTPUT_RATIO = 2.0
GRADIENT_RATIO = 3.0


FLOOR_ULPS = {torch.float64: 64.0}
# The log-sum-exp of the base-2 online softmax (scores times scale * log2(e), then (m + log2 l) * ln 2) rounds
# three more times than PyTorch's base-e logsumexp: a few more unit roundoffs of the lse's magnitude.
LSE_EXTRA_ULPS = 4.0


def floor(dtype: torch.dtype, magnitude: float = 1.0, extra_ulps: float = 0.0) -> float:
    """The smallest error the rule always allows: FLOOR_ULPS (default 1) plus ``extra_ulps`` unit roundoffs of
    ``dtype`` at ``magnitude`` (at least 1)."""
    return (FLOOR_ULPS.get(dtype, 1.0) + extra_ulps) * torch.finfo(dtype).eps * max(1.0, magnitude)


def max_error(actual: Tensor, truth: Tensor) -> float:
    """The largest absolute difference over the entries where ``truth`` is finite."""
    finite = torch.isfinite(truth)
    if not finite.any():
        return 0.0
    return (actual.double() - truth.double())[finite].abs().max().item()


def assert_close(actual: Tensor, truth: Tensor, *, atol: float, name: str = "output") -> None:
    """Assert |actual - truth| <= atol at every finite entry of ``truth`` and that the non-finite entries
    (NaN, +inf, -inf) sit in the same places; on failure say where and by how much."""
    if actual.shape != truth.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != expected {tuple(truth.shape)}")
    a, t = actual.double(), truth.double()
    # NaN must meet NaN and an infinity the same infinity; elsewhere the distance is the error.
    special_ok = torch.where(torch.isfinite(t), ~torch.isnan(a), (a == t) | (torch.isnan(a) & torch.isnan(t)))
    error = (a - t).abs().nan_to_num(nan=float("inf"), posinf=float("inf"))
    error = torch.where(torch.isfinite(t), error, 0.0).masked_fill(~special_ok, float("inf"))
    bad = error > atol
    if bad.any():
        where = tuple(int(i) for i in torch.unravel_index(error.argmax(), error.shape))
        raise AssertionError(
            f"{name}: {int(bad.sum())} of {a.numel()} entries differ; worst at index {where}: "
            f"got {a[where].item()!r}, expected {t[where].item()!r} (allowed error {atol:.3e})"
        )


def assert_error_ratio(
    actual: Tensor,
    truth: Tensor,
    baseline: Tensor,
    *,
    ratio: float = OUTPUT_RATIO,
    name: str = "output",
    extra_ulps: float = 0.0,
) -> None:
    """Assert ``actual`` (ours, low precision) is within ``ratio`` x the error of ``baseline`` (PyTorch in
    the same dtype) against the float64 ``truth``, plus :func:`floor` (with ``extra_ulps``)."""
    finite = torch.isfinite(truth)
    magnitude = truth[finite].abs().max().item() if finite.any() else 1.0
    baseline_error = max_error(baseline, truth)
    if baseline_error != baseline_error:  # NaN: the rule would allow anything
        raise AssertionError(f"{name}: the baseline has NaN where the truth is finite; fix the baseline")
    allowed = ratio * baseline_error + floor(actual.dtype, magnitude, extra_ulps)
    assert_close(actual, truth, atol=allowed, name=name)
