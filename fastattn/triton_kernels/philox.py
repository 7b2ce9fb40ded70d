"""Philox4x32-10 and elementwise dropout for the Triton kernels: the same bits as csrc/philox.h and
fastattn.reference.philox / elementwise_dropout_mask."""

import triton
import triton.language as tl


@triton.jit
def philox(c0, c1, c2, c3, key0, key1):
    """Philox4x32-10 of uint32 counter tiles under the uint32 key (key0, key1): its four uint32 word tiles."""
    for round_ in tl.static_range(10):
        if round_ > 0:
            key0 = key0 + 0x9E3779B9
            key1 = key1 + 0xBB67AE85
        hi0 = tl.umulhi(c0, 0xD2511F53)
        lo0 = c0 * 0xD2511F53
        hi1 = tl.umulhi(c2, 0xCD9E8D57)
        lo1 = c2 * 0xCD9E8D57
        c0, c1, c2, c3 = hi1 ^ c1 ^ key0, lo1, hi0 ^ c3 ^ key1, lo0
    return c0, c1, c2, c3


@triton.jit
def elementwise_keep_rows(rows, col_start, seed0, seed1, threshold, BLOCK_N: tl.constexpr):
    """(BLOCK_M, BLOCK_N) bool, True where elementwise dropout keeps columns col_start .. col_start + BLOCK_N - 1
    of the int64 rows ``rows`` (BLOCK_M,): word c % 4 of Philox at counter (c // 4, row mod 2^32, row // 2^32, 1)
    is at least ``threshold``. ``col_start`` is a multiple of 4; one Philox call covers 4 columns."""
    groups = (col_start // 4 + tl.arange(0, BLOCK_N // 4)).to(tl.uint32)
    # Shapes inline: a list bound to a name turns into tensors when compiled.
    c0 = tl.broadcast_to(groups[None, :], [rows.shape[0], BLOCK_N // 4])
    c1 = tl.broadcast_to((rows & 0xFFFFFFFF).to(tl.uint32)[:, None], [rows.shape[0], BLOCK_N // 4])
    c2 = tl.broadcast_to((rows >> 32).to(tl.uint32)[:, None], [rows.shape[0], BLOCK_N // 4])
    c3 = tl.zeros_like(c0) + 1
    r0, r1, r2, r3 = philox(c0, c1, c2, c3, seed0.to(tl.uint32), seed1.to(tl.uint32))
    # join appends a dim of 2: [m, g, a, b] = (r0, r2 | r1, r3)[b][a] -> column 4g + 2a + b
    words = tl.reshape(tl.join(tl.join(r0, r2), tl.join(r1, r3)), [rows.shape[0], BLOCK_N])
    return words >= threshold.to(tl.uint32)
