"""Fuzzing the safetensors reader (issue 10): a hostile file or index may only end in a
``CheckpointError`` that names it, or in tensors whose bytes are exactly the ones its header points at.

Inputs come from structured strategies (headers whose fields lie: lengths, shapes, offsets, dtypes,
metadata, duplicate keys, encodings, nesting) and from byte mutations of a valid file. Every example
runs under a time limit; a separate test opens lying headers in a child process whose address space
is capped, so an allocation sized by the header fails instead of passing unnoticed.

The suite runs the hypothesis profile "suite"; ``make fuzz`` runs the same targets much longer.
"""

from __future__ import annotations

import json
import math
import os
import struct
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from fuzz_guards import run_capped, time_limit
from hypothesis import event, example, given, strategies as st

from workbench.checkpoint.base import TensorSpec
from workbench.checkpoint.dtypes import ITEMSIZE, to_torch
from workbench.checkpoint.folder import INDEX_NAME, SafetensorsFolder, folder_config
from workbench.checkpoint.safetensors_io import MAX_HEADER_BYTES, SafetensorsFile, build_header
from workbench.errors import CheckpointError

#: Wall time one example may take: real work here is milliseconds.
LIMIT_S = 5.0
CODES = sorted(ITEMSIZE)

# ------------------------------------------------------------------------------------------------
# checking one file or folder
# ------------------------------------------------------------------------------------------------


def tensor_bytes(tensor: torch.Tensor) -> bytes:
    return tensor.reshape(-1).view(torch.uint8).numpy().tobytes()


def open_and_read(path: Path, raw: bytes) -> bool:
    """Open ``path`` (holding ``raw``) and read every tensor, whole and as a row block. Returns True
    when the file was accepted; otherwise the only allowed failure is a ``CheckpointError`` naming
    the file. Accepted tensors must hold exactly the bytes their header entry points at."""
    try:
        with time_limit(LIMIT_S):
            st_file = SafetensorsFile(path)
            try:
                (header_len,) = struct.unpack("<Q", raw[:8])
                assert header_len <= MAX_HEADER_BYTES and 8 + header_len <= len(raw)
                data_start = 8 + header_len
                spans = []
                for name, (info, begin) in st_file.tensors.items():
                    assert info.nbytes == math.prod(info.shape) * ITEMSIZE[info.dtype]
                    expected = raw[data_start + begin : data_start + begin + info.nbytes]
                    assert len(expected) == info.nbytes, f"{name}: header extent past the end of the file"
                    tensor = st_file.read(info, begin)
                    assert tuple(tensor.shape) == info.shape and tensor.dtype == to_torch(info.dtype)
                    assert tensor_bytes(tensor) == expected
                    if info.shape and info.shape[0] > 1:
                        rows = st_file.read(info, begin, (1, info.shape[0]))
                        assert tensor_bytes(rows) == expected[info.nbytes // info.shape[0] :]
                    if info.nbytes:
                        spans.append((begin, begin + info.nbytes))
                spans.sort()
                assert all(end <= next_begin for (_, end), (next_begin, _) in zip(spans, spans[1:])), (
                    "overlapping tensors accepted"
                )
                assert all(isinstance(k, str) and isinstance(v, str) for k, v in st_file.metadata.items())
            finally:
                st_file.close()
    except CheckpointError as exc:
        assert str(path) in str(exc), f"the error does not name the file: {exc}"
        return False
    return True


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One folder for the module (hypothesis examples cannot use function-scoped tmp_path)."""
    return tmp_path_factory.mktemp("fuzz_safetensors")


@contextmanager
def written(folder: Path, raw: bytes) -> Iterator[Path]:
    """A fresh file per example (an open mapping of an overwritten file would fault), removed after."""
    path = folder / f"{uuid.uuid4().hex[:8]}.safetensors"
    path.write_bytes(raw)
    try:
        yield path
    finally:
        path.unlink()


def check_bytes(folder: Path, raw: bytes) -> bool:
    """``open_and_read`` on a file holding ``raw``."""
    with written(folder, raw) as path:
        return open_and_read(path, raw)


# ------------------------------------------------------------------------------------------------
# structured headers with lying fields
# ------------------------------------------------------------------------------------------------

JSON_SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=4)
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3),
    max_leaves=8,
)
HUGE = st.sampled_from([10**12, 2**31, 2**32, 2**62, 2**63, 2**64, 2**70, -1, -(2**63)])
BAD_DTYPES = st.one_of(st.sampled_from(["F4", "f32", "", "BF16 ", "float32", "Q4_K"]), JSON_VALUES)
BAD_SHAPES = st.one_of(
    st.lists(st.one_of(st.integers(0, 8), HUGE, st.booleans(), st.floats(), st.text(max_size=2)), max_size=5),
    st.lists(HUGE, min_size=1, max_size=40),
    JSON_VALUES,
)
BAD_OFFSETS = st.one_of(
    st.lists(st.one_of(st.integers(-4, 300), HUGE, st.booleans(), st.floats()), max_size=3), JSON_VALUES
)
#: A handful of names so that duplicates and collisions with __metadata__ happen often.
NAMES = st.one_of(
    st.sampled_from(["a", "b", "c", "model.w", "__metadata__", "", "\ud800", "é"]), st.text(max_size=6)
)
LENGTH_LIES = st.one_of(
    st.sampled_from([0, 1, 7, 2**60, 2**64 - 1, MAX_HEADER_BYTES, MAX_HEADER_BYTES + 1, 90 * 2**20]),
    st.integers(0, 2**64 - 1),
)


def deep(depth: int) -> str:
    return "[" * depth + "]" * depth


@dataclass
class Header:
    raw: bytes
    honest: bool  # every field tells the truth: the reader must accept the file


@st.composite
def headers(draw: st.DrawFn) -> Header:
    """A safetensors file laid out honestly, then (in "lying" mode, half the time) lied about in one
    or more places; truthful files keep the read-back path exercised as much as the refusals."""
    honest = True
    lying = draw(st.booleans())
    names_from = NAMES if lying else st.text(max_size=6).filter(lambda n: n != "__metadata__")
    entry_specs = st.tuples(names_from, st.sampled_from(CODES), st.lists(st.integers(0, 4), max_size=3))
    entries = draw(st.lists(entry_specs, max_size=5, unique_by=None if lying else (lambda e: e[0])))
    pairs: list[tuple[str, str]] = []  # (key, JSON text of the value): duplicates stay duplicates
    names: set[str] = set()
    offset = 0
    for name, dtype, shape in entries:
        nbytes = math.prod(shape) * ITEMSIZE[dtype]
        layout = draw(
            st.sampled_from(["honest", "honest", "gap", "overlap", "lie"] if lying else ["honest", "gap"])
        )
        begin = offset
        if layout == "gap":
            begin += draw(st.integers(1, 16))
        elif layout == "overlap":
            begin = max(0, begin - draw(st.integers(1, 16)))
            honest = honest and (nbytes == 0 or begin >= offset)
        entry: dict[str, Any] = {"dtype": dtype, "shape": shape, "data_offsets": [begin, begin + nbytes]}
        if layout == "lie":
            honest = False
            field = draw(
                st.sampled_from(["dtype", "shape", "data_offsets", "entry", "extra", "deep", "missing"])
            )
            if field == "dtype":
                entry["dtype"] = draw(BAD_DTYPES)
            elif field == "shape":
                entry["shape"] = draw(BAD_SHAPES)
            elif field == "data_offsets":
                entry["data_offsets"] = draw(BAD_OFFSETS)
            elif field == "extra":
                entry["shape"] = [10**12] if draw(st.booleans()) else [2**40, 2**40]
                entry["data_offsets"] = [begin, begin + math.prod(entry["shape"]) * ITEMSIZE[dtype]]
            elif field == "missing":
                del entry[draw(st.sampled_from(sorted(entry)))]
        text = json.dumps(entry)
        if layout == "lie" and field == "entry":
            text = json.dumps(draw(JSON_VALUES))
        elif layout == "lie" and field == "deep":
            text = deep(draw(st.sampled_from([10, 500, 5000, 100_000])))
        honest = honest and name not in names and name != "__metadata__" and name != "\ud800"
        names.add(name)
        pairs.append((name, text))
        if layout != "lie":
            offset = max(offset, begin + nbytes)
    metadata = draw(st.sampled_from(["none", "good", "bad"] if lying else ["none", "good"]))
    if metadata != "none":
        value = (
            draw(st.dictionaries(st.text(max_size=4), st.text(max_size=4), max_size=3))
            if metadata == "good"
            else draw(JSON_VALUES)
        )
        honest = honest and metadata == "good" and "__metadata__" not in names
        pairs.insert(draw(st.integers(0, len(pairs))), ("__metadata__", json.dumps(value)))
    text = "{" + ",".join(f"{json.dumps(k)}:{v}" for k, v in pairs) + "}"
    if lying and draw(st.integers(0, 9)) == 0:  # not an object, or not JSON at all
        honest = False
        text = draw(
            st.sampled_from(
                [
                    json.dumps(draw(JSON_VALUES)),
                    deep(100_000),
                    '{"a":' + "1" * 5000 + "}",
                    text[: len(text) // 2],
                ]
            )
        )
    encoding = draw(st.sampled_from(["utf-8"] * 8 + ["utf-16", "latin-1-junk"])) if lying else "utf-8"
    if encoding == "utf-16":
        honest = False
        header = text.encode("utf-16", "surrogatepass")
    else:
        header = text.encode("utf-8", "surrogatepass")  # a lone surrogate name is escaped by json.dumps
        if encoding == "latin-1-junk":
            honest = False
            header = header[:1] + b"\xff\xfe" + header[1:]
    header += b" " * draw(st.integers(0, 7))
    length = len(header)
    if lying and draw(st.integers(0, 5)) == 0:
        lie = draw(LENGTH_LIES)
        honest = honest and lie == length
        length = lie
    data_len = offset
    if lying and draw(st.integers(0, 5)) == 0:
        data_len = draw(st.integers(0, offset + 16))
        honest = honest and data_len >= offset
    data = draw(st.binary(min_size=data_len, max_size=data_len))
    return Header(struct.pack("<Q", length) + header + data, honest)


# Regressions: each of these raised something other than CheckpointError before the fix.
def _file(header_text: str, data: bytes = b"") -> bytes:
    raw = header_text.encode("utf-8", "surrogatepass")
    return struct.pack("<Q", len(raw)) + raw + data


@given(headers())
@example(
    Header(_file('{"a":{"dtype":[],"shape":[],"data_offsets":[0,0]}}'), False)
)  # TypeError: unhashable dtype
@example(
    Header(_file('{"a":{"dtype":"F32","shape":[0,1180591620717411303424],"data_offsets":[0,0]}}'), False)
)  # torch overflow
@example(
    Header(
        _file(
            '{"a":{"dtype":"F32","shape":[0,4611686018427387904,4611686018427387904],"data_offsets":[0,0]}}'
        ),
        False,
    )
)  # stride overflow
@example(Header(_file('{"a":' + "1" * 5000 + "}"), False))  # ValueError: int digit limit
@example(Header(_file(deep(100_000)), False))  # RecursionError
@example(
    Header(
        _file(
            '{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}',
            b"\0" * 4,
        ),
        False,
    )
)  # overlap accepted
@example(
    Header(
        _file(
            '{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[0],"data_offsets":[0,0]}}',
            b"\0" * 4,
        ),
        False,
    )
)  # duplicate: last silently won
@example(Header(_file('{"__metadata__":{"k":[1,{"b":2}]}}'), False))  # nested metadata stringified
@example(
    Header(_file('{"\\ud800":{"dtype":"F32","shape":[0],"data_offsets":[0,0]}}'), False)
)  # unprintable name
@example(Header(struct.pack("<Q", 2) + "{}".encode("utf-16"), False))  # UTF-16 header accepted
def test_lying_headers_fail_cleanly(scratch: Path, header: Header) -> None:
    """A header with any mix of lies is refused by name or read back exactly; a truthful one is
    always accepted (the checks refuse nothing a correct writer produces)."""
    accepted = check_bytes(scratch, header.raw)
    event("accepted" if accepted else "refused")
    if header.honest:
        assert accepted, "a truthful file was refused"


# ------------------------------------------------------------------------------------------------
# byte mutations of a valid file
# ------------------------------------------------------------------------------------------------


def valid_file() -> bytes:
    """Three tensors (odd sizes, a zero-size one) written by the repo's own header builder."""
    g = torch.Generator().manual_seed(0)
    tensors = {
        "a.weight": torch.randn(3, 5, generator=g).to(torch.bfloat16),
        "b": torch.randn(4, generator=g),
        "empty": torch.zeros(0, 2),
    }
    specs = [
        TensorSpec(name, "BF16" if t.dtype == torch.bfloat16 else "F32", tuple(t.shape))
        for name, t in tensors.items()
    ]
    return build_header(specs, {"format": "pt"}) + b"".join(tensor_bytes(t) for t in tensors.values())


VALID = valid_file()
MUTATIONS = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, len(VALID) - 1), st.integers(0, 7)),
    st.tuples(st.just("truncate"), st.integers(0, len(VALID))),
    st.tuples(st.just("insert"), st.integers(0, len(VALID)), st.binary(min_size=1, max_size=8)),
    st.tuples(st.just("delete"), st.integers(0, len(VALID)), st.integers(1, 8)),
    st.tuples(st.just("overwrite"), st.integers(0, len(VALID)), st.binary(min_size=1, max_size=8)),
)


def mutate(raw: bytes, mutations: list[tuple[Any, ...]]) -> bytes:
    data = bytearray(raw)
    for kind, at, *rest in mutations:
        at = min(at, len(data))
        if kind == "flip" and at < len(data):
            data[at] ^= 1 << rest[0]
        elif kind == "truncate":
            del data[at:]
        elif kind == "insert":
            data[at:at] = rest[0]
        elif kind == "delete":
            del data[at : at + rest[0]]
        elif kind == "overwrite":
            data[at : at + len(rest[0])] = rest[0]
    return bytes(data)


def test_the_unmutated_file_is_accepted(scratch: Path) -> None:
    """The mutation target itself reads back (else every mutation would trivially be refused)."""
    assert check_bytes(scratch, VALID)


@given(st.lists(MUTATIONS, min_size=1, max_size=4))
def test_mutated_files_fail_cleanly(scratch: Path, mutations: list[tuple[Any, ...]]) -> None:
    """Bit flips, cuts and insertions anywhere (length field, JSON, data) never get past the checks
    as anything but a named ``CheckpointError`` or exact bytes."""
    event("accepted" if check_bytes(scratch, mutate(VALID, mutations)) else "refused")


# ------------------------------------------------------------------------------------------------
# folders: the index and config.json
# ------------------------------------------------------------------------------------------------

SHARD_TENSORS = {
    "model-1.safetensors": {"a": [1.0, 2.0], "b": [3.0]},
    "model-2.safetensors": {"c": [4.0, 5.0, 6.0]},
}


def write_shard(path: Path, tensors: dict[str, list[float]]) -> None:
    specs = [TensorSpec(name, "F32", (len(values),)) for name, values in tensors.items()]
    path.write_bytes(build_header(specs) + b"".join(struct.pack(f"<{len(v)}f", *v) for v in tensors.values()))


@pytest.fixture(scope="module")
def sharded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A sharded model folder, and beside it a file holding every tensor name: an index that can
    reach outside its folder would load that file successfully, so the test would see it."""
    root = tmp_path_factory.mktemp("fuzz_index")
    folder = root / "model"
    folder.mkdir()
    for name, tensors in SHARD_TENSORS.items():
        write_shard(folder / name, tensors)
    write_shard(root / "outside.safetensors", {"a": [0.0, 0.0], "b": [0.0], "c": [0.0, 0.0, 0.0]})
    return folder


SHARD_REFS = st.one_of(
    st.sampled_from(["model-1.safetensors", "model-2.safetensors"]),
    st.sampled_from(
        [
            "../outside.safetensors",
            "ABSOLUTE",
            "./../outside.safetensors",
            "sub/../../outside.safetensors",
            "missing.safetensors",
            "",
            ".",
            "..",
            "model-1.safetensors\0",
            "x" * 300,
            "model-1.safetensors/x",
        ]
    ),
    JSON_VALUES,
)


@st.composite
def index_texts(draw: st.DrawFn) -> str:
    weight_map = draw(
        st.dictionaries(st.sampled_from(["a", "b", "c", "d", "\ud800"]), SHARD_REFS, max_size=4)
    )
    body = json.dumps({"metadata": {"total_size": 24}, "weight_map": weight_map})
    return draw(
        st.sampled_from(
            [
                body,
                body,
                body[: len(body) // 2],
                json.dumps(draw(JSON_VALUES)),
                '{"weight_map": ' + json.dumps(draw(JSON_VALUES)) + "}",
                '{"weight_map": {"a": "model-1.safetensors"}, "weight_map": {"a": "../outside.safetensors"}}',
                '{"weight_map": ' + deep(50_000) + "}",
                draw(st.text(max_size=20)),
            ]
        )
    )


@given(
    index_texts(),
    st.one_of(
        st.none(),
        st.text(max_size=20),
        st.just(deep(50_000)),
        st.just("{}"),
        st.just('{"model_type": "llama", "num_hidden_layers": 2}'),
        st.just("[1, 2]"),
    ),
)
@example(
    '{"weight_map": {"a": "../outside.safetensors", "b": "../outside.safetensors"}}', None
)  # read outside the folder
@example('{"weight_map": {"a": "ABSOLUTE"}}', None)  # an absolute path was read
@example('{"weight_map": ' + deep(50_000) + "}", deep(50_000))  # RecursionError from index and config.json
@example('{"weight_map": {"a": "' + "x" * 300 + '"}}', None)  # OSError: file name too long
def test_hostile_indexes_fail_cleanly(sharded: Path, index_text: str, config_text: str | None) -> None:
    """An index (and config.json) of any content opens only shards inside its own folder, and fails
    with a ``CheckpointError`` naming the folder's files, never another exception."""
    outside = (sharded.parent / "outside.safetensors").resolve()
    (sharded / INDEX_NAME).write_text(
        index_text.replace("ABSOLUTE", str(outside)), encoding="utf-8", errors="surrogatepass"
    )
    config = sharded / "config.json"
    if config_text is None:
        config.unlink(missing_ok=True)
    else:
        config.write_text(config_text, encoding="utf-8", errors="surrogatepass")
    try:
        with time_limit(LIMIT_S):
            reader = SafetensorsFolder(sharded)
            try:
                for file in reader.files():
                    assert file.resolve().parent == sharded.resolve(), f"{file} is outside the model folder"
                for name in reader.tensor_names():
                    info = reader.info(name)
                    values = struct.unpack(f"<{info.numel}f", tensor_bytes(reader.read(name)))
                    assert list(values) == SHARD_TENSORS[info.file.name][name]
            finally:
                reader.close()
            seen = folder_config(sharded)
            if config_text is None:
                assert seen is None
            else:  # what the JSON parser makes of the bytes written (folder_config raised otherwise)
                parsed = json.loads(config.read_bytes())
                expected = parsed if isinstance(parsed, dict) else None
                assert json.dumps(seen, sort_keys=True) == json.dumps(expected, sort_keys=True)
    except CheckpointError as exc:
        assert str(sharded) in str(exc), f"the error does not name the folder: {exc}"


def test_a_directory_named_like_a_shard_is_refused_by_name(tmp_path: Path) -> None:
    """The folder reader globs *.safetensors; a folder with that name used to fail with
    IsADirectoryError from pread."""
    (tmp_path / "weights.safetensors").mkdir()
    with pytest.raises(CheckpointError, match="not a regular file") as caught:
        SafetensorsFolder(tmp_path)
    assert str(tmp_path / "weights.safetensors") in str(caught.value)


def test_a_pipe_named_like_a_shard_does_not_block(tmp_path: Path) -> None:
    """Opening a FIFO for reading waits for a writer; the reader must refuse it at once."""
    os.mkfifo(tmp_path / "weights.safetensors")
    with time_limit(LIMIT_S), pytest.raises(CheckpointError, match="not a regular file"):
        SafetensorsFile(tmp_path / "weights.safetensors")


# ------------------------------------------------------------------------------------------------
# no allocation driven by a header: proved under an address-space cap
# ------------------------------------------------------------------------------------------------

HOSTILE = {
    # one tensor of 10^12 float32 elements (4 TB), in a file of a few hundred bytes
    "trillion": _file(
        json.dumps({"t": {"dtype": "F32", "shape": [10**12], "data_offsets": [0, 4 * 10**12]}})
    ),
    # a length field of 2^60 header bytes
    "length_2_60": struct.pack("<Q", 2**60) + b"{}",
    # a header of 90 MiB claimed (under the 100 MB cap) by a 10-byte file: a read of the claimed
    # length before comparing it with the file size would allocate 90 MiB
    "length_90_mib": struct.pack("<Q", 90 * 2**20) + b"{}",
}


def test_lying_headers_allocate_nothing(tmp_path: Path) -> None:
    """Under an address-space cap of 64 MiB above the loaded interpreter (checked to refuse 128 MiB),
    hostile headers claiming terabytes are refused with ``CheckpointError``; a valid file still reads,
    so the cap is not what refuses them."""
    for name, raw in HOSTILE.items():
        (tmp_path / f"{name}.safetensors").write_bytes(raw)
    (tmp_path / "valid.safetensors").write_bytes(VALID)
    setup = f"""
        import json, pathlib, torch
        from workbench.checkpoint.safetensors_io import SafetensorsFile
        from workbench.errors import CheckpointError
        folder = pathlib.Path({str(tmp_path)!r})
        names = {sorted(HOSTILE)!r}
        torch.zeros(1)
    """
    body = """
        results = {}
        for name in names:
            try:
                f = SafetensorsFile(folder / f"{name}.safetensors")
                results[name] = "accepted: " + repr([f.read(info, begin).shape for info, begin in f.tensors.values()])
            except CheckpointError as exc:
                results[name] = "refused: " + str(exc)
            except BaseException as exc:
                results[name] = f"other: {type(exc).__name__}: {exc}"
        valid = SafetensorsFile(folder / "valid.safetensors")
        results["valid"] = sorted(str(tuple(valid.read(i, b).shape)) for i, b in valid.tensors.values())
        print(json.dumps(results))
    """
    done = run_capped(setup, body)
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout.strip().splitlines()[-1])
    for name in HOSTILE:
        assert results[name].startswith("refused: "), (name, results[name])
        assert str(tmp_path / f"{name}.safetensors") in results[name]
    assert results["valid"] == ["(0, 2)", "(3, 5)", "(4,)"]
