"""Fuzzing the GGUF reader with hypothesis: mutated bytes of a small valid GGUF (flipped bytes, cut
files, lying counts, lengths, types, dimensions and offsets) either read cleanly or are refused with
a ``CheckpointError`` naming the file. Every example runs under a time limit (a hang fails it) and an
address-space limit a little above what the process already maps (an allocation sized by a lying
header fails it with ``MemoryError``); the guard tests at the end show both limits really bite."""

from __future__ import annotations

import itertools
import resource
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q, GGUFReader, GGUFWriter
from gguf.quants import quantize
from hypothesis import event, given, strategies as st

from workbench.errors import CheckpointError
from workbench.registry import get_registry

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="the limits use RLIMIT_AS and /proc"
)

HEADROOM = 256 * 2**20  # address space an example may add; a 10**12-element tensor needs 4 TB
SECONDS = 5.0  # a tiny file parses in milliseconds


class Hang(BaseException):
    """An example ran past its time limit (BaseException: no ``except Exception`` can swallow it)."""


def _mapped_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmSize in /proc/self/status")


@contextmanager
def guarded(seconds: float = SECONDS) -> Iterator[None]:
    """Raise ``Hang`` after ``seconds``, and make any allocation beyond ``HEADROOM`` fail."""

    armed = [True]

    def on_alarm(signum: int, frame: object) -> None:
        if armed[0]:
            signal.setitimer(signal.ITIMER_REAL, 0.05)  # again soon: a GC callback swallows what it raises
            raise Hang(f"no answer within {seconds} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = _mapped_bytes() + HEADROOM
    resource.setrlimit(
        resource.RLIMIT_AS, (limit if hard == resource.RLIM_INFINITY else min(limit, hard), hard)
    )
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        armed[0] = False
        signal.setitimer(signal.ITIMER_REAL, 0)
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
        signal.signal(signal.SIGALRM, previous)


def small_gguf(path: Path) -> None:
    """A one-layer Llama (hidden 32, two heads, one key/value head) in F32, F16, BF16, Q8_0 and Q4_1,
    with string and integer metadata arrays: a few kilobytes, every structure of the format."""
    rng = np.random.default_rng(0)
    hidden, ffn, vocab = 32, 64, 8
    writer = GGUFWriter(path, "llama")
    writer.add_uint32("general.alignment", 32)
    for key, value in (
        ("block_count", 1),
        ("context_length", 64),
        ("embedding_length", hidden),
        ("feed_forward_length", ffn),
        ("attention.head_count", 2),
        ("attention.head_count_kv", 1),
    ):
        writer.add_uint32(f"llama.{key}", value)
    writer.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    writer.add_array("tokenizer.ggml.tokens", [f"t{i}" for i in range(vocab)])
    writer.add_array("tokenizer.ggml.token_type", list(range(vocab)))
    writer.add_uint32("tokenizer.ggml.eos_token_id", 2)
    tensors = {
        "token_embd.weight": ((vocab, hidden), Q.Q8_0),
        "output_norm.weight": ((hidden,), Q.F32),
        "blk.0.attn_q.weight": ((hidden, hidden), Q.Q4_1),
        "blk.0.attn_k.weight": ((16, hidden), Q.F16),
        "blk.0.attn_v.weight": ((16, hidden), Q.BF16),
        "blk.0.attn_output.weight": ((hidden, hidden), Q.F32),
        "blk.0.ffn_gate.weight": ((ffn, hidden), Q.Q8_0),
        "blk.0.ffn_up.weight": ((ffn, hidden), Q.Q4_1),
        "blk.0.ffn_down.weight": ((hidden, ffn), Q.F16),
        "blk.0.attn_norm.weight": ((hidden,), Q.F32),
        "blk.0.ffn_norm.weight": ((hidden,), Q.F32),
    }
    for name, (shape, qtype) in tensors.items():
        w = rng.standard_normal(shape).astype(np.float32)
        data = w if qtype == Q.F32 else w.astype(np.float16) if qtype == Q.F16 else quantize(w, qtype)
        writer.add_tensor(name, data, raw_dtype=qtype if data.dtype == np.uint8 else None)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def header_fields(path: Path) -> tuple[int, list[tuple[str, int, int]]]:
    """(end of the header, [(label, byte offset, width)] of every integer a lie can be told in: counts,
    string and array lengths, value and tensor types, dimensions, offsets), located with the gguf
    package's own parser of the valid file."""
    reader = GGUFReader(path)
    base = reader.data.__array_interface__["data"][0]
    found: list[tuple[str, int, int]] = []
    for field in [*reader.fields.values(), *(t.field for t in reader.tensors)]:
        for i, part in enumerate(field.parts):  # labelled NAME@PART (NAME@PART.K for the K-th dimension)
            if part.dtype.kind == "u" and part.dtype.itemsize in (4, 8) and part.size <= 4:
                for k in range(part.size):
                    label = f"{field.name}@{i}" if part.size == 1 else f"{field.name}@{i}.{k}"
                    found.append(
                        (
                            label,
                            part.__array_interface__["data"][0] - base + k * part.dtype.itemsize,
                            part.dtype.itemsize,
                        )
                    )
    return reader.data_offset, found


@pytest.fixture(scope="module")
def valid(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Path, bytes, int, list[tuple[str, int, int]], int]:
    """(path, bytes, end of the header, lie-able fields, end of the last tensor's data) of a valid file."""
    root = tmp_path_factory.mktemp("fuzz_gguf")
    path = root / "valid.gguf"
    small_gguf(path)
    header_end, fields = header_fields(path)
    assert outcome(path) == "ok"  # also loads the registry and warms torch outside the limits
    assert {"GGUF.tensor_count@0", "GGUF.kv_count@0", "tokenizer.ggml.tokens@4", "token_embd.weight@3.1"} <= {
        f[0] for f in fields
    }
    data_end = max(t.data_offset + t.n_bytes for t in GGUFReader(path).tensors)  # only padding follows
    return path, path.read_bytes(), header_end, fields, data_end


_counter = itertools.count()


def outcome(path: Path) -> str:
    """'ok' when the file opens and every tensor reads with its announced shape, 'refused' on a
    ``CheckpointError`` naming the file; anything else (another exception, a hang, a MemoryError)
    propagates and fails the test."""
    try:
        with guarded(), get_registry().open_checkpoint(path) as reader:
            reader.config()
            for name in reader.tensor_names():
                info = reader.info(name)
                assert tuple(reader.read(name).shape) == info.shape, name
                assert tuple(reader.read(name, (1, info.shape[0])).shape) == (
                    info.shape[0] - 1,
                    *info.shape[1:],
                ), name
        return "ok"
    except CheckpointError as exc:
        assert str(path) in str(exc), f"the error does not name the file: {exc}"
        # names read from a damaged header are bounded and escaped, never megabytes of binary
        assert len(str(exc)) < 1024 and str(exc).isprintable(), f"{len(str(exc))} characters: {exc!r:.300}"
        return "refused"


def run_mutated(valid: tuple[Path, bytes, int, list], data: bytes) -> str:
    path = valid[0].parent / f"case_{next(_counter)}.gguf"
    path.write_bytes(data)
    try:
        result = outcome(path)
    finally:
        path.unlink()
    event(result)  # --hypothesis-show-statistics: how many examples got past the checks
    return result


def put(data: bytes, offset: int, width: int, value: int) -> bytes:
    return data[:offset] + (value % 2 ** (8 * width)).to_bytes(width, "little") + data[offset + width :]


LIES = st.sampled_from(
    [0, 1, 2, 3, 31, 33, 2**16, 2**31, 2**32 - 1, 2**32, 10**12, 2**62, 2**63, 2**64 - 1]
) | st.integers(0, 2**64 - 1)

# ------------------------------------------------------------------------------------------------
# hypothesis
# ------------------------------------------------------------------------------------------------


@given(st.data())
def test_flipped_bytes_are_read_or_refused(valid, data) -> None:
    _, raw, header_end, _, _ = valid
    where = st.integers(0, header_end - 1) if data.draw(st.booleans()) else st.integers(0, len(raw) - 1)
    mutated = bytearray(raw)
    for _ in range(data.draw(st.integers(1, 8))):
        mutated[data.draw(where)] = data.draw(st.integers(0, 255))
    run_mutated(valid, bytes(mutated))


@given(st.data())
def test_cut_files_are_refused(valid, data) -> None:
    _, raw, header_end, _, data_end = valid
    length = data.draw(st.integers(0, header_end + 64) | st.integers(0, len(raw) - 1))
    result = run_mutated(valid, raw[:length])
    assert result == "refused" or length >= data_end


@given(st.data())
def test_lying_counts_lengths_types_and_dimensions_are_read_or_refused(valid, data) -> None:
    _, raw, _, fields, _ = valid
    mutated = raw
    for _ in range(data.draw(st.integers(1, 3))):
        _, offset, width = data.draw(st.sampled_from(fields))
        mutated = put(mutated, offset, width, data.draw(LIES))
    run_mutated(valid, mutated)


# ------------------------------------------------------------------------------------------------
# the lies the issue names, one by one
# ------------------------------------------------------------------------------------------------


def field(valid, label: str) -> tuple[int, int]:
    return next((offset, width) for name, offset, width in valid[3] if name == label)


@pytest.mark.parametrize(
    ("label", "value", "message"),
    [
        ("GGUF.tensor_count@0", 2**63, r"claims 9223372036854775808 tensors"),
        ("GGUF.kv_count@0", 2**63, r"9223372036854775808 metadata entries"),
        (
            "tokenizer.ggml.token_type@4",
            2**63,
            r"'tokenizer\.ggml\.token_type' claims an array of 9223372036854775808 items",
        ),
        ("tokenizer.ggml.tokens@3", 9, r"'tokenizer\.ggml\.tokens' is an array of value type 9"),
        ("general.alignment@3", 3, r"general\.alignment must be a uint32 power of two"),
        ("blk.0.attn_output.weight@5", 2**62, r"tensor 'blk\.0\.attn_output\.weight'.*claims bytes"),
        ("blk.0.ffn_up.weight@4", 99, r"tensor 'blk\.0\.ffn_up\.weight' has unknown GGML type 99"),
    ],
)
def test_a_named_lie_is_refused_by_name(valid, label: str, value: int, message: str) -> None:
    offset, width = field(valid, label)
    path = valid[0].parent / "lie.gguf"
    path.write_bytes(put(valid[1], offset, width, value))
    with pytest.raises(CheckpointError, match=message), guarded():
        get_registry().open_checkpoint(path)


def test_a_tensor_claiming_10_to_the_12_elements_allocates_nothing(valid) -> None:
    """Dimensions 10**6 x 10**6 on a 32 x 32 F32 tensor: 4 TB if anything believed it. Refused
    under the address-space limit, so no allocation of that size was attempted."""
    raw = valid[1]
    for k in (0, 1):
        offset, width = field(valid, f"blk.0.attn_output.weight@3.{k}")
        raw = put(raw, offset, width, 10**6)
    path = valid[0].parent / "huge.gguf"
    path.write_bytes(raw)
    with pytest.raises(CheckpointError, match=r"1000000000000 elements"), guarded():
        get_registry().open_checkpoint(path)


# ------------------------------------------------------------------------------------------------
# guards: the limits bite, and the gguf package alone would not survive these files
# ------------------------------------------------------------------------------------------------


def test_the_address_space_limit_fails_a_real_allocation() -> None:
    with pytest.raises(MemoryError), guarded():
        np.ones(2 * HEADROOM, np.uint8)
    with pytest.raises(RuntimeError, match="allocate"), guarded():
        torch.empty(10**12, dtype=torch.float32)
    np.ones(2 * HEADROOM // 8, np.uint8)  # and the limit is lifted afterwards


def test_the_time_limit_stops_a_hang() -> None:
    with pytest.raises(Hang), guarded(0.2):
        while True:
            pass


# the alarm may first land in a gc callback, which Python reports as unraisable; it fires again
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_the_gguf_package_alone_spins_on_a_lying_array_length(valid) -> None:
    """What the header walk is for: told that an array holds 2**63 one-byte items, GGUFReader reads
    them one by one to the end of the file and then for ever (an empty read advances nothing), growing
    its lists as it goes; it never returns. The reader refuses the same file by name."""
    raw = valid[1]
    for label, value in (
        ("tokenizer.ggml.token_type@3", 0),
        ("tokenizer.ggml.token_type@4", 2**63),
    ):  # uint8 items, 2**63 of them
        raw = put(raw, *field(valid, label), value)
    path = valid[0].parent / "spin.gguf"
    path.write_bytes(raw)
    with pytest.raises((Hang, MemoryError)), guarded(1.0):
        GGUFReader(path)
    with pytest.raises(CheckpointError, match=r"claims an array of 9223372036854775808 items"), guarded():
        get_registry().open_checkpoint(path)


@pytest.mark.parametrize("swallowed", [600, 5000, 40000])
def test_a_key_that_swallows_the_header_gives_a_short_printable_message(valid, swallowed: int) -> None:
    """One flipped bit in a key's length makes the key take in the binary that follows it (the
    hostile trial's message was 5,988,572 bytes): the key is shown escaped and cut, the whole message
    stays under 1 KB, and the command line prints it so."""
    from click.testing import CliRunner

    from workbench.cli.main import main

    offset, width = field(valid, "general.architecture@0")
    path = valid[0].parent / f"swallow_{swallowed}.gguf"
    path.write_bytes(put(valid[1], offset, width, swallowed))
    with pytest.raises(CheckpointError) as caught, guarded():
        get_registry().open_checkpoint(path)
    message = str(caught.value)
    assert str(path) in message and len(message) < 1024 and message.isprintable(), repr(message[:300])
    shown = CliRunner().invoke(main, ["inspect", str(path)])
    assert shown.exit_code == 2 and len(shown.output) < 1200, len(shown.output)


def test_a_file_cut_inside_its_tensor_data_is_called_truncated(valid) -> None:
    path = valid[0].parent / "cut.gguf"
    path.write_bytes(valid[1][: valid[4] - 100])  # the header whole, the last tensor's data cut short
    with (
        pytest.raises(CheckpointError, match=r"past the end of the file .* the file is truncated"),
        guarded(),
    ):
        get_registry().open_checkpoint(path)
