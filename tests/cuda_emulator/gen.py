"""Rewrites a CUDA kernel file of csrc/cuda (one of KERNELS) into C++ that g++ compiles against the CPU emulator
(emu.h).

    python tests/cuda_emulator/gen.py [KERNEL.cu [OUT.cpp]]    (defaults: attention_kernel.cu, stdout)

Three things change, and line numbers do not (a #line directive points compiler errors into the .cu):
  - each inline-PTX wrapper of csrc/cuda/ptx.h (the signatures and bodies are in EMULATED) keeps its signature and
    gets an emulated body, and the kernel's ``#include "ptx.h"`` line becomes that emulated header;
  - ``extern __shared__ T name[];`` becomes a pointer to the running block's emulated shared memory;
  - ``kernel<<<config>>>(args);`` becomes ``emu::launch(kernel, emu::LaunchConfig{config}, args);``.
Whatever else the emulator cannot take stops generation with a GenerationError that says what to update:
inline PTX outside the kernel's wrappers, a wrapper whose signature changed, a wrapper of the table that the .cu
no longer defines, a kernel file without a table, a launch that is not a statement of its own, a static
``__shared__`` array, shared memory aligned to more than 16 bytes.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

KERNEL = Path(__file__).resolve().parents[2] / "csrc" / "cuda" / "attention_kernel.cu"

# Wrapper: (its signature in the .cu, less `__device__ __forceinline__`; the emulated body, emu.h).
EMULATED = {
    "smem_address": ("uint32_t smem_address(const void* p)", "return emu::shared_offset(p);"),
    "cp_async16": ("void cp_async16(void* dst, const void* src, int src_bytes)",
                   "emu::cp_async(dst, src, 16, src_bytes);"),
    "cp_async4": ("void cp_async4(void* dst, const void* src)", "emu::cp_async(dst, src, 4, 4);"),
    "cp_async_commit": ("void cp_async_commit()", "emu::cp_async_commit();"),
    "cp_async_wait": ("template <int N> void cp_async_wait()", "emu::cp_async_wait(N);"),
    "ldmatrix_x4": ("void ldmatrix_x4(uint32_t (&r)[4], const void* p)", "emu::ldmatrix_x4(r, p, false);"),
    "ldmatrix_x4_trans": ("void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p)", "emu::ldmatrix_x4(r, p, true);"),
    "mma16816": (
        "template <typename T> void mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1)",
        "emu::mma_m16n8k16<T>(c, a, b0, b1);",
    ),
    "exp2_approx": ("float exp2_approx(float x)", "return emu::ex2_approx_ftz(x);"),
}  # fmt: skip

# Swap tables: the wrappers each file (by name; mutated copies keep it) defines, every one of them. The kernels
# define none: they include csrc/cuda/ptx.h, whose emulated rewrite replaces the include line.
KERNELS = {
    "ptx.h": tuple(EMULATED),
    "attention_kernel.cu": (),
    "conv_epilogue_kernel.cu": (),
    "kvcache_kernel.cu": (),
    "norm_kernel.cu": (),
    "positional_kernel.cu": (),
    "recurrent_kernel.cu": (),
}
PTX = KERNEL.parent / "ptx.h"
INCLUDE_PTX = re.compile(r'^#include "ptx\.h"[ \t]*$', re.MULTILINE)

HELP = f"add it to EMULATED and to the kernel's table in KERNELS in {Path(__file__).name}"

DEVICE_FUNCTION = re.compile(r"(?:template\s*<[^;{}]*?>\s*)?__device__\s+__forceinline__\s+[^;{}()]*?\b(\w+)\s*\(")
EXTERN_SHARED = re.compile(
    r"extern\s+__shared__\s+(?:__align__\s*\(\s*(\d+)\s*\)\s*)?([A-Za-z_][\w\s]*?)\s+(\w+)\s*\[\s*\]\s*;"
)


class GenerationError(Exception):
    """The .cu changed in a way gen.py cannot rewrite; the message says where and what to update."""


def blank_comments_and_literals(source: str) -> str:
    """``source`` with comments and the insides of string and character literals turned into spaces (newlines
    kept): searches then see only code, at the same positions as in ``source``."""
    out = list(source)

    def blank(start: int, end: int) -> None:
        out[start:end] = [c if c == "\n" else " " for c in source[start:end]]

    i, n = 0, len(source)
    while i < n:
        if source.startswith("//", i):
            end = source.find("\n", i)
            end = n if end < 0 else end
            blank(i, end)
        elif source.startswith("/*", i):
            end = source.find("*/", i + 2)
            end = n if end < 0 else end + 2
            blank(i, end)
        elif source[i] in "\"'" and not (source[i] == "'" and source[i - 1 : i].isalnum()):  # not 1'000
            end = i + 1
            while end < n and source[end] != source[i]:
                end += 2 if source[end] == "\\" else 1
            blank(i + 1, end)
            end += 1
        else:
            end = i + 1
        i = end
    return "".join(out)


def matching(code: str, open_at: int) -> int:
    """The index of the bracket closing the one at ``open_at`` in blanked code."""
    pairs = {"(": ")", "[": "]", "{": "}"}
    depth = 0
    for i in range(open_at, len(code)):
        if code[i] == code[open_at]:
            depth += 1
        elif code[i] == pairs[code[open_at]]:
            depth -= 1
            if depth == 0:
                return i
    raise GenerationError(f"line {line_of(code, open_at)}: unbalanced {code[open_at]!r}")


def skip_space(code: str, index: int) -> int:
    while index < len(code) and code[index].isspace():
        index += 1
    return index


def line_of(text: str, index: int) -> int:
    return text.count("\n", 0, index) + 1


def readable(signature: str) -> str:
    """The signature on one line, without the CUDA qualifiers."""
    return " ".join(re.sub(r"\b__device__\b|\b__forceinline__\b", " ", signature).split())


def normalized(signature: str) -> str:
    """The signature without whitespace that does not separate two words (for comparisons)."""
    return re.sub(r" ?([^\w ]) ?", r"\1", readable(signature))


def same_lines(new: str, old: str) -> str:
    """``new`` on one line, padded with the newlines ``old`` spanned."""
    return re.sub(r"\s+", " ", new) + "\n" * old.count("\n")


def wrapper_edits(source: str, code: str, table: tuple[str, ...]) -> list[tuple[int, int, str]]:
    """(start, end, text): the emulated bodies of the wrappers in ``table``; fails on inline PTX anywhere else, a
    changed signature, or a wrapper of the table that the source does not define."""
    functions = []  # (start, end, name, opening brace of the body)
    for m in DEVICE_FUNCTION.finditer(code):
        brace = skip_space(code, matching(code, m.end() - 1) + 1)  # after the parameter list
        if code.startswith("{", brace):  # a definition
            functions.append((m.start(), matching(code, brace) + 1, m.group(1), brace))
    for m in re.finditer(r"\basm\b", code):
        inside = [f for f in functions if f[0] <= m.start() < f[1]]
        if not inside:
            raise GenerationError(
                f"line {line_of(code, m.start())}: inline PTX outside a __device__ __forceinline__ function; wrap "
                f"it in one, emulate it in emu.h and {HELP}"
            )
        if inside[0][2] not in table:
            raise GenerationError(
                f"line {line_of(code, m.start())}: {inside[0][2]} uses inline PTX that has no CPU emulation: "
                f"emulate it in emu.h and {HELP}"
            )
    edits = []
    missing = set(table) - {f[2] for f in functions}
    if missing:
        raise GenerationError(
            f"no __device__ __forceinline__ definition of {', '.join(sorted(missing))}: a wrapper was renamed or "
            f"removed; update the kernel's table in KERNELS in {Path(__file__).name}"
        )
    for start, end, name, brace in functions:
        if name not in table:
            continue
        expected, body = EMULATED[name]
        found = source[start:brace]
        if normalized(found) != normalized(expected):
            raise GenerationError(
                f"line {line_of(code, start)}: the signature of {name} changed to `{readable(found)}`; the emulator "
                f"expects `{expected}`: update EMULATED in {Path(__file__).name} (and emu.h)"
            )
        edits.append((start, end, same_lines(f"{found.strip()} {{ {body} }}", source[start:end])))
    return edits


def shared_edits(source: str, code: str) -> list[tuple[int, int, str]]:
    edits = []
    for m in EXTERN_SHARED.finditer(code):
        align, element, name = m.group(1), m.group(2).strip(), m.group(3)
        if align is not None and int(align) > 16:
            raise GenerationError(
                f"line {line_of(code, m.start())}: shared memory aligned to {align} bytes; the emulator "
                "aligns it to 16 (emu::map_shared_memory in emu.h)"
            )
        text = f"{element}* const {name} = reinterpret_cast<{element}*>(emu::shared_memory());"
        edits.append((m.start(), m.end(), same_lines(text, source[m.start() : m.end()])))
    covered = [(s, e) for s, e, _ in edits]
    for m in re.finditer(r"\b__shared__\b", code):
        if not any(s <= m.start() < e for s, e in covered):
            raise GenerationError(
                f"line {line_of(code, m.start())}: only `extern __shared__ T name[];` is emulated; a static "
                "__shared__ array needs support in gen.py and emu.h"
            )
    return edits


def launch_edits(source: str, code: str) -> list[tuple[int, int, str]]:
    edits = []
    for m in re.finditer(r"<<<", code):
        start = skip_space(code, max(code.rfind(c, 0, m.start()) for c in ";{}") + 1)  # of the statement
        kernel, config_end = source[start : m.start()].strip(), code.find(">>>", m.end())
        paren = skip_space(code, config_end + 3)
        if config_end < 0 or not code.startswith("(", paren) or not re.fullmatch(r"[\w:<>,\s]+", kernel):
            raise GenerationError(f"line {line_of(code, m.start())}: a kernel launch gen.py cannot parse")
        close = matching(code, paren)
        semicolon = skip_space(code, close + 1)
        if not code.startswith(";", semicolon):
            raise GenerationError(f"line {line_of(code, m.start())}: a kernel launch must be a statement of its own")
        config, args = source[m.end() : config_end], source[paren + 1 : close]
        text = f"emu::launch({kernel}, emu::LaunchConfig{{{config}}}{', ' + args if args.strip() else ''});"
        edits.append((start, semicolon + 1, same_lines(text, source[start : semicolon + 1])))
    return edits


def generate(source: str, path: str = str(KERNEL)) -> str:
    """The emulated C++ of the CUDA source ``source`` (read from ``path``); GenerationError names the path."""
    try:
        return rewrite(source, path)
    except GenerationError as e:
        raise GenerationError(f"{path}: {e}") from None


def rewrite(source: str, path: str) -> str:
    table = KERNELS.get(Path(path).name)
    if table is None:
        raise GenerationError(
            f"no swap table for {Path(path).name}: add one to KERNELS in {Path(__file__).name} (the .cu's inline-PTX "
            f"wrappers, each in EMULATED)"
        )
    code = blank_comments_and_literals(source)
    edits = sorted(wrapper_edits(source, code, table) + shared_edits(source, code) + launch_edits(source, code))
    for (_, end, _), (start, _, _) in zip(edits, edits[1:]):
        if start < end:
            raise GenerationError(f"line {line_of(code, start)}: overlapping rewrites")
    for start, end, text in reversed(edits):
        source = source[:start] + text + source[end:]
    source = inline_ptx(source, path)
    left = blank_comments_and_literals(source)
    for construct in (r"\basm\b", "<<<", r"\b__shared__\b"):
        if re.search(construct, left):  # the checks above should have caught it
            raise GenerationError(f"`{construct}` is left after rewriting; extend gen.py")
    return f'#include "emu.h"\n#line 1 "{path}"\n{source}'


def inline_ptx(source: str, path: str) -> str:
    """``source`` with its ``#include "ptx.h"`` line replaced by the emulated wrappers of csrc/cuda/ptx.h, and a
    #line directive after them, so that the kernel's line numbers stay its own."""
    m = INCLUDE_PTX.search(source)
    if m is None:
        return source
    ptx = rewrite(PTX.read_text(), str(PTX)).replace("#pragma once", "", 1).removeprefix('#include "emu.h"\n')
    return f'{source[: m.start()]}{ptx}\n#line {source.count(chr(10), 0, m.start()) + 2} "{path}"{source[m.end():]}'


def main(argv: list[str]) -> int:
    kernel = Path(argv[1]) if len(argv) > 1 else KERNEL
    try:
        text = generate(kernel.read_text(), str(kernel.resolve()))
    except GenerationError as e:
        print(e, file=sys.stderr)
        return 1
    if len(argv) > 2:
        Path(argv[2]).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
