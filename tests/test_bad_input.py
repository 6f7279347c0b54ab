"""Bad input through the CLI: every failure exits with status 2, names its cause and leaves nothing
at the output path (no final folder, no ``<out>.partial``).

Broken models are copies of the session's tiny models, edited with safetensors or as raw bytes; the
shared fixtures are never modified.
"""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from cli_failures import COMMANDS, assert_failed, copy_model, invoke, linear_recipe, partial_of
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------


def header_of(file: Path) -> tuple[dict[str, Any], bytes]:
    raw = file.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def write_with_header(file: Path, header: dict[str, Any], data: bytes) -> None:
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    file.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data)


def edit_tensors(model: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    file = model / "model.safetensors"
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


# ------------------------------------------------------------------------------------------------
# inputs that cannot be opened
# ------------------------------------------------------------------------------------------------


@COMMANDS
def test_missing_model_path(
    cli: CliRunner, tiny_family: dict[str, Path], tmp_path: Path, command: str
) -> None:
    missing = tmp_path / "no-such-model"
    recipe = linear_recipe(tmp_path, missing, tiny_family["ft2"])
    out = tmp_path / "out"
    result = invoke(cli, command, recipe, out)
    assert_failed(result, out, str(missing), "does not exist", "models[0]")


@COMMANDS
def test_folder_that_is_not_a_model(
    cli: CliRunner, tiny_family: dict[str, Path], tmp_path: Path, command: str
) -> None:
    folder = tmp_path / "just-a-config"
    folder.mkdir()
    shutil.copy(tiny_family["ft1"] / "config.json", folder / "config.json")
    (folder / "notes.txt").write_text("not weights")
    recipe = linear_recipe(tmp_path, tiny_family["ft1"], folder)
    out = tmp_path / "out"
    result = invoke(cli, command, recipe, out)
    assert_failed(result, out, str(folder), "not a model folder", "models[1]")


def _cut_in_data(file: Path) -> None:
    raw = file.read_bytes()
    file.write_bytes(raw[: len(raw) - len(raw) // 3])


def _cut_to_four_bytes(file: Path) -> None:
    file.write_bytes(file.read_bytes()[:4])


def _cut_in_header(file: Path) -> None:
    raw = file.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    file.write_bytes(raw[: 8 + n // 2])


@COMMANDS
@pytest.mark.parametrize(
    ("cut", "says"),
    [(_cut_in_data, "truncated"), (_cut_to_four_bytes, "too short"), (_cut_in_header, "header")],
    ids=["in-data", "to-4-bytes", "in-header"],
)
def test_truncated_safetensors(
    cli: CliRunner,
    tiny_family: dict[str, Path],
    tmp_path: Path,
    command: str,
    cut: Callable[[Path], None],
    says: str,
) -> None:
    model = copy_model(tiny_family["ft1"], tmp_path / "truncated")
    file = model / "model.safetensors"
    cut(file)
    recipe = linear_recipe(tmp_path, model, tiny_family["ft2"])
    out = tmp_path / "out"
    result = invoke(cli, command, recipe, out)
    assert_failed(result, out, str(file), says)


@COMMANDS
def test_corrupt_header_garbage_json(
    cli: CliRunner, tiny_family: dict[str, Path], tmp_path: Path, command: str
) -> None:
    model = copy_model(tiny_family["ft1"], tmp_path / "garbage")
    file = model / "model.safetensors"
    raw = file.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    garbage = b'{"model.embed_tokens.weight": {dtype: BF16,,'
    file.write_bytes(raw[:8] + garbage + b" " * (n - len(garbage)) + raw[8 + n :])
    recipe = linear_recipe(tmp_path, model, tiny_family["ft2"])
    out = tmp_path / "out"
    result = invoke(cli, command, recipe, out)
    assert_failed(result, out, str(file), "corrupt safetensors header", "not valid JSON")


@COMMANDS
def test_corrupt_header_length_larger_than_file(
    cli: CliRunner, tiny_family: dict[str, Path], tmp_path: Path, command: str
) -> None:
    model = copy_model(tiny_family["ft1"], tmp_path / "long-header")
    file = model / "model.safetensors"
    raw = file.read_bytes()
    claimed = len(raw) * 4
    file.write_bytes(struct.pack("<Q", claimed) + raw[8:])
    recipe = linear_recipe(tmp_path, model, tiny_family["ft2"])
    out = tmp_path / "out"
    result = invoke(cli, command, recipe, out)
    assert_failed(result, out, str(file), "corrupt safetensors header", str(claimed))


@COMMANDS
def test_corrupt_header_offsets_beyond_file(
    cli: CliRunner, tiny_family: dict[str, Path], tmp_path: Path, command: str
) -> None:
    model = copy_model(tiny_family["ft1"], tmp_path / "bad-offsets")
    file = model / "model.safetensors"
    header, data = header_of(file)
    begin, end = header["lm_head.weight"]["data_offsets"]
    shift = len(data) + 4096  # same span (so the size matches the shape) but past the end of the file
    header["lm_head.weight"]["data_offsets"] = [begin + shift, end + shift]
    write_with_header(file, header, data)
    recipe = linear_recipe(tmp_path, model, tiny_family["ft2"])
    out = tmp_path / "out"
    result = invoke(cli, command, recipe, out)
    assert_failed(result, out, str(file), "'lm_head.weight'", str(end + shift))


@COMMANDS
def test_header_offsets_disagree_with_shape(
    cli: CliRunner, tiny_family: dict[str, Path], tmp_path: Path, command: str
) -> None:
    model = copy_model(tiny_family["ft1"], tmp_path / "bad-span")
    file = model / "model.safetensors"
    header, data = header_of(file)
    header["model.norm.weight"]["shape"] = [header["model.norm.weight"]["shape"][0] * 2]
    write_with_header(file, header, data)
    recipe = linear_recipe(tmp_path, model, tiny_family["ft2"])
    out = tmp_path / "out"
    result = invoke(cli, command, recipe, out)
    assert_failed(result, out, str(file), "'model.norm.weight'", "data_offsets")


@COMMANDS
def test_index_lists_a_missing_shard(
    cli: CliRunner, tiny_family: dict[str, Path], tmp_path: Path, command: str
) -> None:
    model = tmp_path / "sharded"
    model.mkdir()
    shutil.copy(tiny_family["ft1"] / "config.json", model / "config.json")
    shutil.copy(tiny_family["ft1"] / "model.safetensors", model / "model-00001-of-00002.safetensors")
    names = list(load_file(tiny_family["ft1"] / "model.safetensors"))
    weight_map = {n: "model-00001-of-00002.safetensors" for n in names}
    weight_map["lm_head.weight"] = "model-00002-of-00002.safetensors"
    (model / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    recipe = linear_recipe(tmp_path, model, tiny_family["ft2"])
    out = tmp_path / "out"
    result = invoke(cli, command, recipe, out)
    assert_failed(result, out, "model-00002-of-00002.safetensors", "missing")


def test_a_rejected_file_never_closes_another_files_descriptor_later(
    tiny_family: dict[str, Path], tmp_path: Path
) -> None:
    """A file whose header is rejected must not keep (and later close again) its freed fd number.

    Before the fix, the half-built reader closed its fd but kept the number; when the garbage
    collector reached it, ``__del__`` closed that number again, by then another file's (a later merge
    failed with 'Bad file descriptor').
    """
    import gc
    import os

    from workbench.checkpoint.safetensors_io import SafetensorsFile
    from workbench.errors import CheckpointError

    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x01\x02\x03")
    with pytest.raises(CheckpointError) as info:
        SafetensorsFile(bad)
    frame_tb = info.tb
    failed = None
    while frame_tb is not None:  # the half-built object is still referenced by its __init__ frame
        candidate = frame_tb.tb_frame.f_locals.get("self")
        if isinstance(candidate, SafetensorsFile):
            failed = candidate
        frame_tb = frame_tb.tb_next
    assert failed is not None
    read_end, write_end = os.pipe()  # reuses the lowest free fd numbers, e.g. the one just freed
    try:
        del candidate, frame_tb, info
        failed.__del__()
        del failed
        gc.collect()
        os.write(write_end, b"x")
        assert os.read(read_end, 1) == b"x"
    finally:
        os.close(read_end)
        os.close(write_end)


# ------------------------------------------------------------------------------------------------
# inputs that disagree with each other
# ------------------------------------------------------------------------------------------------


@COMMANDS
def test_tensor_missing_in_one_model(
    cli: CliRunner, tiny_family: dict[str, Path], tmp_path: Path, command: str
) -> None:
    model = copy_model(tiny_family["ft1"], tmp_path / "missing-tensor")
    gone = "model.layers.2.mlp.up_proj.weight"
    edit_tensors(model, lambda t: t.pop(gone))
    recipe = linear_recipe(tmp_path, tiny_family["ft2"], model)
    out = tmp_path / "out"
    result = invoke(cli, command, recipe, out)
    assert_failed(result, out, f"'{gone}'", "missing", "models[1]", str(model))


def test_reference_lacking_a_tensor_warns_and_names_it(
    cli: CliRunner, tiny_family: dict[str, Path], tmp_path: Path
) -> None:
    """The reference (models[0]) defines the output's tensors; another model's extra tensor is named."""
    model = copy_model(tiny_family["ft1"], tmp_path / "fewer-tensors")
    gone = "model.layers.3.mlp.gate_proj.weight"
    edit_tensors(model, lambda t: t.pop(gone))
    recipe = linear_recipe(tmp_path, model, tiny_family["ft2"])
    out = tmp_path / "out"
    result = invoke(cli, "run", recipe, out)
    assert result.exit_code == 0, result.output
    assert "warning:" in result.output and f"'{gone}'" in result.output and "models[1]" in result.output
    assert gone not in load_file(out / "model.safetensors")


@COMMANDS
def test_shape_mismatch_names_tensor_and_both_shapes(
    cli: CliRunner, tiny_family: dict[str, Path], tmp_path: Path, command: str
) -> None:
    model = copy_model(tiny_family["ft1"], tmp_path / "narrow")
    name = "model.layers.1.mlp.up_proj.weight"
    original = list(load_file(tiny_family["ft2"] / "model.safetensors")[name].shape)
    changed = [original[0] - 16, original[1]]

    def narrow(t: dict[str, torch.Tensor]) -> None:
        t[name] = t[name][: changed[0]].clone()

    edit_tensors(model, narrow)
    recipe = linear_recipe(tmp_path, tiny_family["ft2"], model)
    out = tmp_path / "out"
    result = invoke(cli, command, recipe, out)
    assert_failed(result, out, f"'{name}'", str(changed), str(original), "models[1]")


@COMMANDS
@pytest.mark.parametrize("relabelled", ["ft1", "base"], ids=["in-a-model", "in-the-reference"])
def test_a_float_tensor_relabelled_as_an_integer_is_refused_by_name(
    cli: CliRunner, tiny_family: dict[str, Path], tmp_path: Path, command: str, relabelled: str
) -> None:
    """The header says I16 for a bf16 tensor (sizes still consistent): refused while planning,
    naming the tensor, the model and both dtypes, instead of reaching a float kernel."""
    models = {key: copy_model(tiny_family[key], tmp_path / key) for key in ("base", "ft1")}
    file = models[relabelled] / "model.safetensors"
    header, data = header_of(file)
    name = "model.layers.1.mlp.up_proj.weight"
    assert header[name]["dtype"] == "BF16"
    header[name]["dtype"] = "I16"
    write_with_header(file, header, data)
    recipe = linear_recipe(tmp_path, models["base"], models["ft1"])
    out = tmp_path / "out"
    result = invoke(cli, command, recipe, out)
    assert_failed(result, out, f"'{name}'", "I16", "BF16", "integer or bool")
    integer, floating = ("models[1]", "models[0]") if relabelled == "ft1" else ("models[0]", "models[1]")
    said = " ".join(result.output.split())
    assert f"as I16 in {integer}" in said and f"as BF16 in {floating}" in said, said


def test_dtype_mismatch_is_converted_with_a_warning(
    cli: CliRunner, tiny_family: dict[str, Path], tmp_path: Path
) -> None:
    model = copy_model(tiny_family["ft1"], tmp_path / "fp16")

    def to_half(t: dict[str, torch.Tensor]) -> None:
        for k in list(t):
            t[k] = t[k].to(torch.float16)

    edit_tensors(model, to_half)
    recipe = linear_recipe(tmp_path, tiny_family["ft2"], model)
    out = tmp_path / "out"

    checked = invoke(cli, "validate", recipe, out)
    assert checked.exit_code == 0, checked.output
    assert "warning:" in checked.output and "converted" in checked.output and "F16" in checked.output

    result = invoke(cli, "run", recipe, out)
    assert result.exit_code == 0, result.output
    assert "warning:" in result.output and "converted" in result.output
    assert "models[1]" in result.output and "F16" in result.output and "BF16" in result.output
    assert not partial_of(out).exists()

    merged = load_file(out / "model.safetensors")
    a = load_file(tiny_family["ft2"] / "model.safetensors")
    b = load_file(model / "model.safetensors")
    assert set(merged) == set(a)
    for name in merged:
        assert merged[name].dtype == torch.bfloat16  # the reference's dtype
        expected = (a[name].double() + b[name].double()) / 2
        torch.testing.assert_close(merged[name].double(), expected, rtol=8e-3, atol=1e-6)


@pytest.mark.parametrize(
    ("tensor", "bad"),
    [("model.layers.0.self_attn.q_proj.weight", float("nan")), ("lm_head.weight", float("inf"))],
    ids=["nan", "inf"],
)
def test_nan_or_inf_in_an_input_warns_naming_the_tensor(
    cli: CliRunner, tiny_family: dict[str, Path], tmp_path: Path, tensor: str, bad: float
) -> None:
    model = copy_model(tiny_family["ft1"], tmp_path / "non-finite")

    def poison(t: dict[str, torch.Tensor]) -> None:
        t[tensor][0, 0] = bad

    edit_tensors(model, poison)
    recipe = linear_recipe(tmp_path, tiny_family["ft2"], model)
    out = tmp_path / "out"
    result = invoke(cli, "run", recipe, out)
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.output.splitlines() if line.startswith("warning:")]
    assert any(f"'{tensor}'" in w and "NaN/Inf" in w and "models[1]" in w for w in warnings), result.output
    # Only the poisoned tensor is reported.
    assert all(f"'{tensor}'" in w for w in warnings if "NaN/Inf" in w)
    assert not torch.isfinite(load_file(out / "model.safetensors")[tensor][0, 0])


@COMMANDS
def test_negative_header_offsets_are_called_negative(
    cli: CliRunner, tiny_family: dict[str, Path], tmp_path: Path, command: str
) -> None:
    model = copy_model(tiny_family["ft1"], tmp_path / "negative-offsets")
    file = model / "model.safetensors"
    header, data = header_of(file)
    begin, end = header["model.norm.weight"]["data_offsets"]
    header["model.norm.weight"]["data_offsets"] = [begin - 10**6, end - 10**6]  # same span, before the data
    write_with_header(file, header, data)
    recipe = linear_recipe(tmp_path, model, tiny_family["ft2"])
    out = tmp_path / "out"
    result = invoke(cli, command, recipe, out)
    assert_failed(result, out, str(file), "'model.norm.weight'", "negative data_offsets")
    assert "span" not in result.output
