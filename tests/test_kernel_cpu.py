"""The Numba kernels' dtype codecs equal torch's conversions bit for bit: every fp16/bf16 bit
pattern decoded, and float32 values of every magnitude class encoded (round to nearest even)."""

from __future__ import annotations

import numba
import numpy as np
import pytest
import torch

from workbench_kernels import cpu
from workbench_kernels.cpu import CHUNK


@numba.njit
def _decode_all(a, kind):  # type: ignore[no-untyped-def]
    out = np.empty(a.size, np.float32)
    cpu.decode(a, 0, out, kind)
    return out


@numba.njit
def _encode_all(values, out, kind):  # type: ignore[no-untyped-def]
    cpu.encode(values, out, 0, kind)


def every_bit_pattern(dtype: torch.dtype) -> torch.Tensor:
    return torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(dtype)


def same_bits_or_both_nan(got: torch.Tensor, expected: torch.Tensor) -> bool:
    nan = expected.isnan()
    return bool(
        torch.equal(got.isnan(), nan)
        and torch.equal(
            got[~nan].view(torch.int16 if got.element_size() == 2 else torch.int32),
            expected[~nan].view(torch.int16 if got.element_size() == 2 else torch.int32),
        )
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_decoding_every_16_bit_pattern(dtype):
    x = every_bit_pattern(dtype)
    got = torch.from_numpy(_decode_all(cpu.array(x), cpu.KINDS[dtype]))
    assert same_bits_or_both_nan(got, x.to(torch.float32))


def float32_cases() -> torch.Tensor:
    """Random bit patterns (every exponent), the halfway points between adjacent fp16 and bf16
    values (ties to even), the overflow edges, subnormals, zeros, infinities and NaN."""
    g = torch.Generator().manual_seed(0)
    random_bits = (
        torch.randint(-(1 << 31), (1 << 31) - 1, (200_000,), generator=g, dtype=torch.int64)
        .to(torch.int32)
        .view(torch.float32)
    )
    halves = every_bit_pattern(torch.float16).to(torch.float32)
    halfway_fp16 = (halves[:-1].double() + halves[1:].double()).div(2).float()
    bf16 = every_bit_pattern(torch.bfloat16).to(torch.float32)
    halfway_bf16 = (bf16[:-1].double() + bf16[1:].double()).div(2).float()
    edges = torch.tensor(
        [
            65504.0,
            65519.99,
            65520.0,
            65536.0,
            3.4e38,
            2.0**-14,
            2.0**-24,
            2.0**-25,
            3 * 2.0**-26,
            1e-45,
            0.0,
            -0.0,
            float("inf"),
            -float("inf"),
            float("nan"),
        ]
    )
    cases = torch.cat([random_bits, halfway_fp16, halfway_bf16, edges])
    return torch.cat([cases, -cases])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_encoding_rounds_like_torch(dtype):
    values = float32_cases()
    out = torch.empty(values.shape, dtype=dtype)
    _encode_all(values.numpy(), cpu.array(out), cpu.KINDS[dtype])
    assert same_bits_or_both_nan(out, values.to(dtype))


def test_supported_and_padded_arguments():
    bf16 = torch.zeros(3, dtype=torch.bfloat16)
    assert cpu.supported(bf16, bf16, out_dtype=torch.float16)
    assert not cpu.supported(bf16, bf16.float())  # mixed stored dtypes take the torch path
    assert not cpu.supported(bf16.double())
    assert not cpu.supported(bf16, out_dtype=torch.float64)
    assert [a.size for a in cpu.padded([bf16] * 9)] == [3] * 16
    assert cpu.array(torch.arange(6.0).view(2, 3).t()).tolist() == [0.0, 3.0, 1.0, 4.0, 2.0, 5.0]


def _merge_in_child(queue) -> None:  # type: ignore[no-untyped-def]
    from workbench_kernels.weighted_sum import weighted_sum

    x = torch.arange(CHUNK + 3, dtype=torch.float32)
    queue.put(weighted_sum([x, x], [1.0, 2.0]).tolist() == (3 * x).tolist())


def test_a_forked_child_merges_on_the_torch_path():
    """GNU OpenMP terminates a forked child that launches a parallel region its parent used; the
    kernels step aside in forked children."""
    import multiprocessing

    from workbench_kernels.weighted_sum import weighted_sum_numba

    x = torch.ones(CHUNK * 4)
    assert torch.equal(weighted_sum_numba([x, x], [1.0, 1.0]), 2 * x)  # the parent's pool is running
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_merge_in_child, args=(queue,))
    child.start()
    child.join(60)
    assert child.exitcode == 0 and queue.get(timeout=5)
