"""Mutation check of tests/test_cuda_emulated.py, tests/test_cuda_emulated_kvcache.py,
tests/test_cuda_emulated_norm.py and tests/test_cuda_emulated_positional.py, for developers (CI does not run it: 15
to 40 s a mutant).

    .venv/bin/python tests/cuda_emulator/mutate.py [SUBSTRING ...]    (only the mutants whose name contains one;
                                                                       "kvcache" selects the decoding kernel's,
                                                                       "norm:" the norm kernels', "positional:"
                                                                       the positional-encoding kernels')

Injects one bug at a time into a copy of csrc/cuda/attention_kernel.cu (MUTANTS), kvcache_kernel.cu
(KVCACHE_MUTANTS), norm_kernel.cu (NORM_MUTANTS) or positional_kernel.cu (POSITIONAL_MUTANTS), runs that kernel's
emulated tests on the copy (FASTATTN_EMULATED_KERNEL, FASTATTN_EMULATED_KVCACHE_KERNEL,
FASTATTN_EMULATED_NORM_KERNEL, FASTATTN_EMULATED_POSITIONAL_KERNEL) until the first failure, and prints which
test caught it and how. Every mutant must be caught; one that survives shows a gap in the test cases or the emulator.
Exits 1 if any survives, 2 if a mutant's text is no longer in the .cu (update MUTANTS).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
KERNEL = ROOT / "csrc" / "cuda" / "attention_kernel.cu"
KVCACHE_KERNEL = ROOT / "csrc" / "cuda" / "kvcache_kernel.cu"
NORM_KERNEL = ROOT / "csrc" / "cuda" / "norm_kernel.cu"
POSITIONAL_KERNEL = ROOT / "csrc" / "cuda" / "positional_kernel.cu"
RECURRENT_KERNEL = ROOT / "csrc" / "cuda" / "recurrent_kernel.cu"

# (name, text in the .cu, replacement of its first occurrence): realistic bugs, one at a time.
MUTANTS = [
    # Fragment layouts.
    ("ldmatrix B rows and columns swapped",
     "(n * 8 + lane % 8 + (lane / 16) * 8) * kL + kk * 16 + (lane / 8 % 2) * 8",
     "(n * 8 + lane % 8 + (lane / 8 % 2) * 8) * kL + kk * 16 + (lane / 16) * 8"),
    ("ldmatrix.trans matrices swapped",
     "(kt * 16 + lane % 8 + (lane / 8 % 2) * 8) * kL + n * 16 + (lane / 16) * 8",
     "(kt * 16 + lane % 8 + (lane / 16) * 8) * kL + n * 16 + (lane / 8 % 2) * 8"),
    ("mma B registers swapped", "af[m], bf[0], bf[1]);", "af[m], bf[1], bf[0]);"),
    ("fp32 GEMM quad shuffle source", "(lane & ~3) | src)", "(lane & ~3) | (3 - src))"),
    ("accumulator pair stored swapped", "= pack2<T>(x, y);", "= pack2<T>(y, x);"),
    # Synchronisation: each barrier removed, a wait too short, a barrier only one warp reaches.
    ("no barrier: forward, after the cp.async wait", "    __syncthreads();\n\n    float s[kWM]", "\n    float s[kWM]"),
    ("no barrier: forward, closing the key loop", "kL, n16);\n    __syncthreads();", "kL, n16);"),
    ("no barrier: forward, before storing out",
     "  __syncthreads();\n  store_tile<T, kBM, kL, kThreads>(static_cast<T*>(p.out)",
     "  store_tile<T, kBM, kL, kThreads>(static_cast<T*>(p.out)"),
    ("no barrier: dK/dV, after the cp.async wait",
     "    __syncthreads();\n    const T* const q_s",
     "    const T* const q_s"),
    ("no barrier: dK/dV, closing the query loop",
     "// dK += dS^T Q\n    }\n    __syncthreads();",
     "// dK += dS^T Q\n    }"),
    ("no barrier: dK/dV, before storing",
     "  __syncthreads();\n  if constexpr (kDK) {\n    store",
     "  if constexpr (kDK) {\n    store"),
    ("no barrier: dQ, after the cp.async wait",
     "    __syncthreads();\n    const T* const k_s",
     "    const T* const k_s"),
    ("no barrier: dQ, closing the key loop", "// dQ += dS K\n    __syncthreads();", "// dQ += dS K"),
    ("no barrier: dQ, before storing", "  __syncthreads();\n  store_tile<T, kBM, kL, kThreads>(static_cast<T*>(p.dq)",
     "  store_tile<T, kBM, kL, kThreads>(static_cast<T*>(p.dq)"),
    ("forward waits for the wrong cp.async group", "cp_async_wait<1>();", "cp_async_wait<2>();"),
    ("a barrier only warp 0 reaches", "  __syncthreads();\n  store_tile<T, kBM, kL, kThreads>(static_cast<T*>(p.out)",
     "  if (warp == 0) __syncthreads();\n  store_tile<T, kBM, kL, kThreads>(static_cast<T*>(p.out)"),
    ("single-buffered forward uses the second stage", "const int stage = p.stages == 2 ? (t & 1) : 0;",
     "const int stage = t & 1;"),
    # Bounds, windows and tiles.
    ("rows past the sequence end loaded", "const int n = r < rows ? max(0, min(kE, cols - c0)) : 0;",
     "const int n = max(0, min(kE, cols - c0));"),
    ("rows past the sequence end stored", "if (r < rows && ch < chunks) {", "if (ch < chunks) {"),
    ("tile_inside ignores the tile's last key", "k0 + kn - 1 <= q0 + p.diagonal", "k0 <= q0 + p.diagonal"),
    ("key range one short",
     "q0 + qn - 1 + p.diagonal + p.window_right + 1)",
     "q0 + qn - 1 + p.diagonal + p.window_right)"),
    ("key range starts one late", "q0 + p.diagonal - p.window_left)", "q0 + p.diagonal - p.window_left + 1)"),
    ("dK/dV query range one short",
     "k0 + kn - 1 - p.diagonal + p.window_left + 1)",
     "k0 + kn - 1 - p.diagonal + p.window_left)"),
    ("dK/dV query range starts one late", "k0 - p.diagonal - p.window_right)", "k0 - p.diagonal - p.window_right + 1)"),
    # The maths and the features.
    ("online softmax forgets to rescale O", "          o[mt][n][2 * hh] *= alpha;\n", ""),
    ("dS with delta added", "(dp[0][n][i] * z - delta);", "(dp[0][n][i] * z + delta);"),
    ("mask query stride", "i * p.mask_stride[2]", "i * p.mask_stride[1]"),
    ("ALiBi ignores the diagonal", "distance = j - i - p.diagonal;", "distance = j - i;"),
    ("GQA kv head of the forward", "hk = h / p.group;", "hk = h % p.heads_kv;"),
    ("dropout bits of the forward shuffled", "(q / 2) * 16 + g + 8 * hh);", "(q % 2) * 16 + g + 8 * hh);"),
    ("dropout bits of dK/dV shuffled", "((v >> (g % 4)) & 1u)", "((v >> (3 - g % 4)) & 1u)"),
]  # fmt: skip

# The same for csrc/cuda/kvcache_kernel.cu. Not listed because they cannot fail (equivalent mutants): the merge
# shifting by `top` instead of `shift` (they differ only when no split saw a key, and then every weight is skipped),
# load_rows never zero-filling a chunk directly (the cp.async or element path zero-fills it too), and removing the
# barrier before the warps' (m, l, O) reuse the tiles (the key loop's closing barrier already orders them).
KVCACHE_MUTANTS = [
    # Fragment layouts and the float32 path.
    ("kvcache: ldmatrix K rows and columns swapped",
     "(n * 8 + lane % 8 + (lane / 16) * 8) * kL + kk * 16 + (lane / 8 % 2) * 8",
     "(n * 8 + lane % 8 + (lane / 8 % 2) * 8) * kL + kk * 16 + (lane / 16) * 8"),
    ("kvcache: fp32 P V quad shuffle source", "(lane & ~3) | src)", "(lane & ~3) | (3 - src))"),
    # Synchronisation.
    ("kvcache: no barrier after the cp.async wait",
     "    __syncthreads();  // the tile (and, at t = 0, Q) is in shared memory\n", ""),
    ("kvcache: no barrier before a stage is refilled",
     "    __syncthreads();  // every warp is done with this stage before it is refilled\n", ""),
    ("kvcache: waits for the wrong cp.async group", "cp_async_wait<1>();", "cp_async_wait<2>();"),
    ("kvcache: single-stage launch uses the second stage", "const int stage = p.stages == 2 ? t & 1 : 0;",
     "const int stage = t & 1;"),
    # Bounds, lengths, windows and splits.
    ("kvcache: keys past the length visible", "j < end && ", ""),
    ("kvcache: split end ignores the length", "min64(min64(start + p.split_size, length), p.seq_k)",
     "min64(start + p.split_size, p.seq_k)"),
    ("kvcache: left window one short", "distance >= -p.window_left", "distance > -p.window_left"),
    ("kvcache: split start one late with a left window", "length - p.n - p.window_left);",
     "length - p.n - p.window_left + 1);"),
    ("kvcache: query position one late", "pos[hh] = length - p.n + query;", "pos[hh] = length - p.n + query + 1;"),
    ("kvcache: lengths stride ignored", "p.lengths[b * p.lengths_stride]", "p.lengths[b]"),
    ("kvcache: partials of rows past the block written", "idx < rows * cols; idx += kThreads",
     "idx < kRows * cols; idx += kThreads"),
    ("kvcache: merge kernel without its row guard", "  if (row >= total_rows) return;\n", ""),
    ("kvcache: merge skips the last split", "for (int64_t s = 0; s < p.splits; ++s) {",
     "for (int64_t s = 0; s < p.splits - 1; ++s) {"),
    # The maths and the features.
    ("kvcache: online softmax forgets to rescale O", "        o[n][2 * hh] *= alpha;\n", ""),
    ("kvcache: row max not reduced over the quad", "      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));\n", ""),
    ("kvcache: ALiBi sign", "x -= slope[hh]", "x += slope[hh]"),
    ("kvcache: ALiBi slope ignores the batch", "b * p.alibi_stride[0] + head * p.alibi_stride[1]",
     "head * p.alibi_stride[1]"),
    ("kvcache: GQA rows: head and query swapped", "head = h_kv * group + row / p.n, query = row % p.n;",
     "head = h_kv * group + row % p.n, query = row / p.n;"),
]  # fmt: skip

# The same for csrc/cuda/norm_kernel.cu. Not listed because the emulator cannot catch them (its schedules run the
# warps of a block in step from one warp collective to the next, so no warp gets a step ahead of another): one
# reduction buffer for every step of the backward rows kernel instead of two by parity, and no barrier before its
# block adds the row groups' sums (needed for warp-per-row groups, whose steps have no block barrier).
NORM_MUTANTS = [
    ("norm: x row stride ignored", "x = row_of<T>(p.x, row, p.xs);", "x = row_of<T>(p.x, row, p.n);"),
    ("norm: variance counts the columns past the row", "if (k < valid) squares += d * d;", "squares += d * d;"),
    ("norm: row sum reads another warp's partial", "    v = buf[lane % kWarps];", "    v = buf[0];"),
    ("norm: looped merge without the means' difference", "delta * delta * (a.count * b.count / count)", "0.0f"),
    ("norm: dropout group off by one", "static_cast<uint32_t>((col0 + q) / 4));",
     "static_cast<uint32_t>((col0 + q) / 4 + 1));"),
    ("norm: backward forgets mean(g)", "const float a = p.rms ? 0.0f : s1 / static_cast<float>(n)",
     "const float a = 0.0f"),
    ("norm: grad_residual not added", "      for (int k = 0; k < N; ++k) dz[k] += grc.get(k);", "      ;"),
    ("norm: shared sums read transposed", "((chunk / G * (VEC / 4) + k / 4) * G + chunk % G)",
     "((chunk % G * (VEC / 4) + k / 4) * G + chunk / G)"),
    ("norm: only the first group's sums written", "    for (int j = 0; j < ROWS; ++j) {\n      const Sums",
     "    for (int j = 0; j < 1; ++j) {\n      const Sums"),
    ("norm: tiles kernel's partial row of the wrong slice",
     "float* const partial_w = p.partial + static_cast<int64_t>(blockIdx.y) * n;",
     "float* const partial_w = p.partial + static_cast<int64_t>(blockIdx.x) * n;"),
    ("norm: affine kernel skips partial rows", "i += kSlices) s += src", "i += 2 * kSlices) s += src"),
]  # fmt: skip

# The same for csrc/cuda/positional_kernel.cu (tests/test_cuda_emulated_positional.py). Not listed because they cannot
# fail: dropping the `k < count` guard of the scatter's atomic adds (the element path's loads zero-fill the columns past
# the row, so the extra adds add 0 to the next row, or to the buffer's 16-byte tail).
POSITIONAL_MUTANTS = [
    # positional_add.
    ("positional: add's cos column takes the sin",
     "v[2 * p + 1] += pe::select_quadrant(sin_r, cos_r, quadrant + 1);",
     "v[2 * p + 1] += pe::select_quadrant(sin_r, cos_r, quadrant);"),
    ("positional: add's frequency of the wrong column pair", "pe::frequency(2 * group + p, a.dim, a.base)",
     "pe::frequency(group + p, a.dim, a.base)"),
    ("positional: add ignores the per-sequence offsets",
     "const int64_t pos = a.offset + (a.offsets ? a.offsets[b] : 0) + s;", "const int64_t pos = a.offset + s;"),
    ("positional: add's scale not applied", "v[k] *= scale;", "v[k] *= 1.0f;"),
    ("positional: add's dropout rows in (b, s) order",
     "static_cast<uint64_t>(b * a.row_stride_b + s * a.row_stride_s)", "static_cast<uint64_t>(r)"),
    ("positional: dropout group off by one", "elementwise_dropout_bits(d, row, static_cast<uint32_t>(group));",
     "elementwise_dropout_bits(d, row, static_cast<uint32_t>(group + 1));"),
    ("positional: add writes out with x's strides", "out + b * a.out_stride_b + s * a.out_stride_s + col",
     "out + b * a.x_stride_b + s * a.x_stride_s + col"),
    ("positional: add reads the row past the table", "pos >= 0 && pos < a.table_rows",
     "pos >= 0 && pos <= a.table_rows"),
    ("positional: add reads negative table positions", "pos >= 0 && pos < a.table_rows", "pos < a.table_rows"),
    ("positional: add walks rows with the wrong stride",
     "r += gridDim.y) {\n    const int64_t b = r / a.seq, s = r - b * a.seq;\n    const int64_t pos = a.offset",
     "r += gridDim.y + 1) {\n    const int64_t b = r / a.seq, s = r - b * a.seq;\n    const int64_t pos = a.offset"),
    ("positional: element stores past the partial group", "      if (k < count) p[k] = from_float<T>(v[k]);",
     "      p[k] = from_float<T>(v[k]);"),
    ("positional: element loads past the partial group", "v[k] = k < count ? to_float(__ldg(p + k)) : 0.0f;",
     "v[k] = to_float(__ldg(p + k));"),
    ("positional: vector path ignores x's batch stride", "stride4(a.x_stride_b, a.batch) &&", "true &&"),
    ("positional: vector path ignores x's seq stride", "stride4(a.x_stride_s, a.seq) && ", ""),
    ("positional: vector path ignores the table",
     "  if (a.pe == PeKind::kTable) vec = vec && aligned4<T>(a.table) && stride4(a.table_stride, a.table_rows);\n", ""),
    ("positional: grid misses the last column block", "const int64_t blocks_x = (groups + kThreads - 1) / kThreads;",
     "const int64_t blocks_x = groups / kThreads + (groups < kThreads);"),
    # embedding_forward.
    ("positional: embedding scales the sum", "v[k] = v[k] * token_scale + p[k];",
     "v[k] = (v[k] + p[k]) * token_scale;"),
    ("positional: embedding ignores the given positions", "a.positions ? a.positions[r] : ", ""),
    ("positional: embedding reads the token past the vocabulary", "token >= 0 && token < a.vocab",
     "token >= 0 && token <= a.vocab"),
    ("positional: embedding reads negative positions", "pos >= 0 && pos < a.max_positions", "pos < a.max_positions"),
    ("positional: embedding's dropout row is the step", "apply_dropout(a.dropout, static_cast<uint64_t>(r), group, v);",
     "apply_dropout(a.dropout, static_cast<uint64_t>(s), group, v);"),
    ("positional: embedding's vector path ignores the position table",
     " &&\n                   stride4(a.position_stride, a.max_positions);", ";"),
    # embedding_scatter.
    ("positional: scatter adds the skip row", "row == a.skip_row || ", ""),
    ("positional: scatter adds negative indices", "row < 0 || row >= a.num_rows", "row >= a.num_rows"),
    ("positional: scatter adds index num_rows", "row >= a.num_rows) continue;", "row > a.num_rows) continue;"),
    ("positional: scatter's scale not applied", "g[k] * scale);", "g[k]);"),
    ("positional: scatter ignores grad's row stride", "grad + n * a.grad_stride + col", "grad + n * a.dim + col"),
]  # fmt: skip

# The same for csrc/cuda/recurrent_kernel.cu (tests/test_cuda_emulated_recurrent.py; "recurrent:" selects them).
RECURRENT_MUTANTS = [
    ("recurrent: x row stride ignored", "const T* x = row_of<T>(a.x, b, a.x_stride) + j;",
     "const T* x = row_of<T>(a.x, b, G * H) + j;"),
    ("recurrent: element grid one past the end",
     "e < total; e += int64_t(gridDim.x) * blockDim.x) {\n    const int64_t b = e / H, j = e - b * H;\n    T* h_new",
     "e <= total; e += int64_t(gridDim.x) * blockDim.x) {\n    const int64_t b = e / H, j = e - b * H;\n    T* h_new"),
    ("recurrent: rows not live pass no dh", "      if (pass != nullptr) pass[j] = dh_in;",
     "      if (pass != nullptr) pass[j] = to_storage<T>(C(0));"),
    ("recurrent: LSTM dc_prev written before dc is read",
     "      const C dcj = dc[j] + dh * o * (C(1) - tc * tc);",
     "      dc_prev[j] = C(0);\n      const C dcj = dc[j] + dh * o * (C(1) - tc * tc);"),
    ("recurrent: GRU d_x of n times r", "d_x[2 * H + j] = to_storage<T>(dn_pre);",
     "d_x[2 * H + j] = to_storage<T>(dn_pre * r);"),
    ("recurrent: block sum reads warp 0 only", "v[n] = lane < warps ? buf[32 * n + lane] : C(0);",
     "v[n] = lane < warps ? buf[32 * n] : C(0);"),
    ("recurrent: no barrier in the block sums",
     "  __syncthreads();\n#pragma unroll\n  for (int n = 0; n < N; ++n) {\n    v[n] = lane",
     "#pragma unroll\n  for (int n = 0; n < N; ++n) {\n    v[n] = lane"),
    ("recurrent: LayerNorm-LSTM c mean over 4H", "const C mean_c = c_sum[0] / C(H);",
     "const C mean_c = c_sum[0] / C(GH);"),
    ("recurrent: LayerNorm-LSTM output loop stops at the block",
     "for (int64_t j = t; j < H; j += threads) {\n    const C c_hat",
     "for (int64_t j = t; j < H && j < threads; j += threads) {\n    const C c_hat"),
    ("recurrent: LayerNorm-LSTM backward writes dc_prev before its last read of dc",
     "      d_x[k] = to_storage<T>(d_pre[g]);",
     "      d_x[k] = to_storage<T>(d_pre[g]);\n      if (g == 3) dc_prev[j] = C(0);"),
    ("recurrent: LayerNorm-LSTM backward ignores lengths",
     "  if (!live_row(a.lengths, a.step, row)) {  // nothing flows", "  if (false) {  // nothing flows"),
    ("recurrent: LayerNorm-LSTM rows not live keep saved",
     "      for (int64_t k = t; k < W; k += threads) saved[k] = C(0);", "      ;"),
]  # fmt: skip

TARGETS = [  # (mutants, kernel, its environment variable, its test)
    (MUTANTS, KERNEL, "FASTATTN_EMULATED_KERNEL", "tests/test_cuda_emulated.py"),
    (KVCACHE_MUTANTS, KVCACHE_KERNEL, "FASTATTN_EMULATED_KVCACHE_KERNEL", "tests/test_cuda_emulated_kvcache.py"),
    (NORM_MUTANTS, NORM_KERNEL, "FASTATTN_EMULATED_NORM_KERNEL", "tests/test_cuda_emulated_norm.py"),
    (POSITIONAL_MUTANTS, POSITIONAL_KERNEL, "FASTATTN_EMULATED_POSITIONAL_KERNEL",
     "tests/test_cuda_emulated_positional.py"),
    (RECURRENT_MUTANTS, RECURRENT_KERNEL, "FASTATTN_EMULATED_RECURRENT_KERNEL",
     "tests/test_cuda_emulated_recurrent.py"),
]


def run(name: str, old: str, new: str, scratch: Path, kernel: Path, variable: str, test: str) -> tuple[str, str]:
    """(verdict, detail) of one mutant of ``kernel``."""
    source = kernel.read_text()
    if old not in source:
        return "STALE", "its text is not in the .cu; update the mutants"
    mutant = scratch / kernel.name  # gen.py picks the swap table by the file name
    mutant.write_text(source.replace(old, new, 1))
    env = dict(os.environ, TMPDIR=str(scratch), COLUMNS="400", **{variable: str(mutant)})
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", test],
        cwd=ROOT, env=env, capture_output=True, text=True,
    )  # fmt: skip
    if result.returncode == 0:
        return "SURVIVED", "every test passed"
    failed = re.search(r"^(FAILED|ERROR) \S+::(\S+)(?: - (.*))?$", result.stdout, re.M)
    emulator = re.search(r"cuda emulator: .*", result.stdout + result.stderr)
    detail = f"{failed.group(2)}: {(failed.group(3) or '')[:150]}" if failed else result.stdout[-300:]
    return "caught", detail + (f"\n{'':>50}{emulator.group(0)[:150]}" if emulator else "")


def main(filters: list[str]) -> int:
    verdicts = []
    with tempfile.TemporaryDirectory() as scratch:
        for mutants, kernel, variable, test in TARGETS:
            for name, old, new in mutants:
                if filters and not any(f in name for f in filters):
                    continue
                start = time.time()
                verdict, detail = run(name, old, new, Path(scratch), kernel, variable, test)
                verdicts.append(verdict)
                print(f"{verdict:8} {time.time() - start:5.0f} s  {name:60} {detail}", flush=True)
    if "STALE" in verdicts:
        return 2
    return 1 if "SURVIVED" in verdicts else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
