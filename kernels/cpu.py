"""What the CPU kernels share: Numba compilation, and the codecs of the stored dtypes.

The CPU path of an op is a Numba function (``@kernel``): one loop over cache-sized chunks of the
flat tensors, spread over the cores with ``prange``, that reads every input once in its stored
dtype and writes the output dtype directly. It is compiled on first use and cached on disk (next to
this package, or in Numba's user cache where that is read-only), so later processes load machine
code in milliseconds instead of tracing and compiling as ``torch.compile`` does each process.
Numba caches are keyed by the kernel's own file only: after editing a helper that kernels of other
files call (the codecs here, DARE's hash), delete the ``*.nbi``/``*.nbc`` files under
``kernels/__pycache__`` (``make clean``).

Numba has no 16-bit floats on CPU, so bf16 and fp16 tensors are handed over as ``uint16`` views
and converted here bit-exactly, with the rounding torch uses (to nearest, ties to even).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import numba
import numpy as np
import torch
from numba.core import types
from numba.extending import intrinsic, overload

F = TypeVar("F", bound=Callable[..., Any])

#: Storage kinds passed to kernels beside each ``uint16``/``float32`` array.
BF16, F16, F32 = 0, 1, 2
KINDS = {torch.bfloat16: BF16, torch.float16: F16, torch.float32: F32}
#: Elements per chunk of a kernel's parallel loop: each chunk's float32 scratch stays in L2.
CHUNK = 1 << 14


_forked = False


def _after_fork_in_child() -> None:
    global _forked
    _forked = True


# GNU OpenMP, Numba's threading layer here, cannot run parallel regions in a child forked from a
# process that ran them (Numba terminates such a child), so forked children take the torch paths.
os.register_at_fork(after_in_child=_after_fork_in_child)


def usable() -> bool:
    """Whether this process may launch the kernels (not a forked child)."""
    return not _forked


def supported(*tensors: torch.Tensor, out_dtype: torch.dtype | None = None) -> bool:
    """Whether the Numba kernels take these CPU tensors: one stored dtype of bf16/fp16/fp32 (an
    output dtype of those too); other inputs, and forked children, take the torch path."""
    dtypes = {t.dtype for t in tensors}
    return (
        usable()
        and len(dtypes) == 1
        and dtypes <= KINDS.keys()
        and (out_dtype is None or out_dtype in KINDS)
        and all(t.device.type == "cpu" for t in tensors)
    )


def array(t: torch.Tensor) -> np.ndarray:
    """The flat storage of ``t`` as a NumPy array (copied only if ``t`` is not contiguous):
    ``uint16`` bits for bf16/fp16, ``float32`` otherwise."""
    flat = t.contiguous().view(-1)
    if flat.dtype in (torch.bfloat16, torch.float16):
        return flat.view(torch.int16).numpy().view(np.uint16)
    return flat.numpy()


def padded(tensors: Sequence[torch.Tensor]) -> tuple[np.ndarray, ...]:
    """The arrays as a tuple of 8, 16, 24... (repeating the first): one compiled kernel serves any
    model count up to that size; slots past the count are never read."""
    arrays = [array(t) for t in tensors]
    size = -(-len(arrays) // 8) * 8
    return tuple(arrays + [arrays[0]] * (size - len(arrays)))


def kernel(fn: F) -> F:
    """Compile ``fn`` with Numba as a parallel, GIL-free kernel cached on disk."""
    return numba.njit(parallel=True, nogil=True, cache=True)(fn)  # type: ignore[return-value]


def helper(fn: F) -> F:
    """A Numba function called from kernels (LLVM inlines it into them)."""
    return numba.njit(cache=True)(fn)  # type: ignore[return-value]


@helper
def chunks(n: int) -> int:
    """How many chunks of ``CHUNK`` elements cover n elements."""
    return (n + CHUNK - 1) // CHUNK


@helper
def span(chunk: int, n: int) -> tuple[int, int]:
    """(first element, length) of a chunk."""
    start = chunk * CHUNK
    return start, min(CHUNK, n - start)


@intrinsic
def u32_as_f32(typingctx: Any, x: Any) -> Any:
    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        return builder.bitcast(args[0], context.get_value_type(types.float32))

    return types.float32(types.uint32), codegen


@intrinsic
def f32_as_u32(typingctx: Any, x: Any) -> Any:
    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        return builder.bitcast(args[0], context.get_value_type(types.uint32))

    return types.uint32(types.float32), codegen


@helper
def f16_to_f32(h: Any) -> Any:
    h = np.uint32(h)
    sign = (h & np.uint32(0x8000)) << np.uint32(16)
    exponent = (h >> np.uint32(10)) & np.uint32(0x1F)
    mantissa = h & np.uint32(0x3FF)
    if exponent == 0:  # zero or subnormal: mantissa * 2**-24, exact in float32
        magnitude = np.float32(mantissa) * np.float32(2.0**-24)
        return -magnitude if sign else magnitude
    if exponent == 0x1F:  # inf / nan
        return u32_as_f32(sign | np.uint32(0x7F800000) | (mantissa << np.uint32(13)))
    return u32_as_f32(sign | ((exponent + np.uint32(112)) << np.uint32(23)) | (mantissa << np.uint32(13)))


@helper
def f32_to_f16(v: Any) -> Any:
    u = f32_as_u32(v)
    sign = (u >> np.uint32(16)) & np.uint32(0x8000)
    a = u & np.uint32(0x7FFFFFFF)
    if a > np.uint32(0x7F800000):  # nan
        return np.uint16(sign | np.uint32(0x7E00))
    if a >= np.uint32(0x477FF000):  # rounds to 65536 or more: inf
        return np.uint16(sign | np.uint32(0x7C00))
    if a < np.uint32(0x38800000):  # below 2**-14: a multiple of 2**-24, rounded half to even
        return np.uint16(sign | np.uint32(np.rint(abs(v) * np.float32(2.0**24))))
    h = ((a >> np.uint32(23)) - np.uint32(112)) << np.uint32(10) | ((a >> np.uint32(13)) & np.uint32(0x3FF))
    rest = a & np.uint32(0x1FFF)
    if rest > np.uint32(0x1000) or (rest == np.uint32(0x1000) and (h & np.uint32(1))):
        h += np.uint32(1)
    return np.uint16(sign | h)


@helper
def f32_to_bf16(v: Any) -> Any:
    if v != v:
        return np.uint16(((f32_as_u32(v) >> np.uint32(16)) & np.uint32(0x8000)) | np.uint32(0x7FC0))
    u = f32_as_u32(v)
    return np.uint16((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16))


# The codec stubs and their implementations carry no annotations: Numba requires the overloads'
# signatures to match the stubs' exactly.
def decode(a, start, buf, kind):  # type: ignore[no-untyped-def]
    """Fill float32 ``buf`` with elements ``start ..`` of a stored array (``kind``: BF16/F16/F32)."""
    raise NotImplementedError("cpu.decode runs inside Numba kernels only")


def encode(buf, a, start, kind):  # type: ignore[no-untyped-def]
    """Write float32 ``buf`` into a stored array from ``start``, rounded to nearest even."""
    raise NotImplementedError("cpu.encode runs inside Numba kernels only")


# Each branch is a plain loop over a slice, so LLVM vectorises it (indexing ``a[start + j]``
# instead would make Numba handle negative indices per element and LLVM emit gathers); kernels then
# compute on the float32 buffers.
@overload(decode, inline="always")
def _decode(a, start, buf, kind):  # type: ignore[no-untyped-def]
    if a.dtype == types.float32:

        def decode32(a, start, buf, kind):  # type: ignore[no-untyped-def]
            buf[:] = a[start : start + buf.size]

        return decode32

    def decode16(a, start, buf, kind):  # type: ignore[no-untyped-def]
        src = a[start : start + buf.size]
        if kind == BF16:
            for j in range(buf.size):
                buf[j] = u32_as_f32(np.uint32(src[j]) << np.uint32(16))
        else:
            for j in range(buf.size):
                buf[j] = f16_to_f32(src[j])

    return decode16


@overload(encode, inline="always")
def _encode(buf, a, start, kind):  # type: ignore[no-untyped-def]
    if a.dtype == types.float32:

        def encode32(buf, a, start, kind):  # type: ignore[no-untyped-def]
            a[start : start + buf.size] = buf

        return encode32

    def encode16(buf, a, start, kind):  # type: ignore[no-untyped-def]
        dst = a[start : start + buf.size]
        if kind == BF16:
            for j in range(buf.size):
                dst[j] = f32_to_bf16(buf[j])
        else:
            for j in range(buf.size):
                dst[j] = f32_to_f16(buf[j])

    return encode16


@helper
def decoded(a, start, m, kind):  # type: ignore[no-untyped-def]
    """Elements ``start .. start + m`` of a stored array as a new float32 array."""
    buf = np.empty(m, np.float32)
    decode(a, start, buf, kind)
    return buf
