"""Bad input through the CLI: every failure exits with status 2, names its cause and leaves nothing
at the output path (no final folder, no ``<out>.partial``).

Broken models are copies of the session's tiny models, edited with safetensors or as raw bytes; the
shared fixtures are never modified.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from click.testing import CliRunner, Result
from safetensors.torch import load_file, save_file

from workbench.cli import main

WIDE = {"COLUMNS": "1000"}  # rich never wraps a message in the middle of a path


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def linear_recipe(tmp_path: Path, *models: Path | str, extra: str = "", name: str = "recipe.yaml") -> Path:
    lines = ["method: linear", "models:"] + [f"  - {json.dumps(str(m))}" for m in models]
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n" + extra)
    return path


def invoke(cli: CliRunner, command: str, recipe: Path, out: Path | None, *extra: str) -> Result:
    args = [command, str(recipe)] + (["--out", str(out)] if out is not None else []) + list(extra)
    return cli.invoke(main, args, env=WIDE)


def partial_of(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


def assert_failed(result: Result, out: Path | None, *fragments: str) -> None:
    """Status 2, an 'error:' paragraph holding every fragment, no traceback, nothing written."""
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "error:" in result.output
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in result.output, f"{fragment!r} not in {result.output!r}"
    if out is not None:
        assert not out.exists()
        assert not partial_of(out).exists()


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


COMMANDS = pytest.mark.parametrize("command", ["run", "validate"])


# ------------------------------------------------------------------------------------------------
# inputs that cannot be opened
# ------------------------------------------------------------------------------------------------


@COMMANDS
def test_missing_model_path(cli: CliRunner, tiny_family: dict[str, Path], tmp_path: Path, command: str) -> None:
    missing = tmp_path / "no-such-model"
    recipe = linear_recipe(tmp_path, missing, tiny_family["ft2"])
    out = tmp_path / "out"
    result = invoke(cli, command, recipe, out)
    assert_failed(result, out, str(missing), "does not exist", "models[0]")


@COMMANDS
def test_folder_that_is_not_a_model(cli: CliRunner, tiny_family: dict[str, Path], tmp_path: Path, command: str) -> None:
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
def test_truncated_safetensors(cli: CliRunner, tiny_family: dict[str, Path], tmp_path: Path, command: str, cut: Callable[[Path], None], says: str) -> None:
    model = copy_model(tiny_family["ft1"], tmp_path / "truncated")
    file = model / "model.safetensors"
    cut(file)
    recipe = linear_recipe(tmp_path, model, tiny_family["ft2"])
    out = tmp_path / "out"
    result = invoke(cli, command, recipe, out)
    assert_failed(result, out, str(file), says)


@COMMANDS
def test_corrupt_header_garbage_json(cli: CliRunner, tiny_family: dict[str, Path], tmp_path: Path, command: str) -> None:
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
def test_corrupt_header_length_larger_than_file(cli: CliRunner, tiny_family: dict[str, Path], tmp_path: Path, command: str) -> None:
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
def test_corrupt_header_offsets_beyond_file(cli: CliRunner, tiny_family: dict[str, Path], tmp_path: Path, command: str) -> None:
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
def test_header_offsets_disagree_with_shape(cli: CliRunner, tiny_family: dict[str, Path], tmp_path: Path, command: str) -> None:
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
def test_index_lists_a_missing_shard(cli: CliRunner, tiny_family: dict[str, Path], tmp_path: Path, command: str) -> None:
    model = tmp_path / "sharded"
    model.mkdir()
    shutil.copy(tiny_family["ft1"] / "config.json", model / "config.json")
    shutil.copy(tiny_family["ft1"] / "model.safetensors", model / "model-00001-of-00002.safetensors")
    names = list(load_file(tiny_family["ft1"] / "model.safetensors"))
    weight_map = {n: "model-00001-of-00002.safetensors" for n in names}
    weight_map["lm_head.weight"] = "model-00002-of-00002.safetensors"
    (model / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    recipe = linear_recipe(tmp_path, model, tiny_family["ft2"])
    out = tmp_path / "out"
    result = invoke(cli, command, recipe, out)
    assert_failed(result, out, "model-00002-of-00002.safetensors", "missing")


# ------------------------------------------------------------------------------------------------
# inputs that disagree with each other
# ------------------------------------------------------------------------------------------------


@COMMANDS
def test_tensor_missing_in_one_model(cli: CliRunner, tiny_family: dict[str, Path], tmp_path: Path, command: str) -> None:
    model = copy_model(tiny_family["ft1"], tmp_path / "missing-tensor")
    gone = "model.layers.2.mlp.up_proj.weight"
    edit_tensors(model, lambda t: t.pop(gone))
    recipe = linear_recipe(tmp_path, tiny_family["ft2"], model)
    out = tmp_path / "out"
    result = invoke(cli, command, recipe, out)
    assert_failed(result, out, f"'{gone}'", "missing", "models[1]", str(model))


def test_reference_lacking_a_tensor_warns_and_names_it(cli: CliRunner, tiny_family: dict[str, Path], tmp_path: Path) -> None:
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
def test_shape_mismatch_names_tensor_and_both_shapes(cli: CliRunner, tiny_family: dict[str, Path], tmp_path: Path, command: str) -> None:
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


def test_dtype_mismatch_is_converted_with_a_warning(cli: CliRunner, tiny_family: dict[str, Path], tmp_path: Path) -> None:
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
def test_nan_or_inf_in_an_input_warns_naming_the_tensor(cli: CliRunner, tiny_family: dict[str, Path], tmp_path: Path, tensor: str, bad: float) -> None:
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


# ------------------------------------------------------------------------------------------------
# recipe mistakes
# ------------------------------------------------------------------------------------------------


@COMMANDS
@pytest.mark.parametrize(("typo", "meant"), [("lnear", "linear"), ("task_arithmatic", "task_arithmetic"), ("slrep", "slerp")])
def test_unknown_method_suggests_the_nearest(cli: CliRunner, tiny_family: dict[str, Path], tmp_path: Path, command: str, typo: str, meant: str) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"method: {typo}\nmodels:\n  - {json.dumps(str(tiny_family['ft1']))}\n  - {json.dumps(str(tiny_family['ft2']))}\n")
    out = tmp_path / "out"
    result = invoke(cli, command, recipe, out)
    assert_failed(result, out, f"unknown method '{typo}'", f"Did you mean '{meant}'?")


@COMMANDS
def test_unknown_parameter(cli: CliRunner, tiny_family: dict[str, Path], tmp_path: Path, command: str) -> None:
    recipe = linear_recipe(tmp_path, tiny_family["ft1"], tiny_family["ft2"], extra="parameters:\n  normalise: true\n")
    out = tmp_path / "out"
    result = invoke(cli, command, recipe, out)
    # line 6: method, models:, two models, parameters:, then the key
    assert_failed(result, out, f"{recipe}:6", "parameters.normalise", "unknown parameter 'normalise'", "'normalize'")


@COMMANDS
def test_unknown_per_model_parameter(cli: CliRunner, tiny_family: dict[str, Path], tmp_path: Path, command: str) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "method: linear\nmodels:\n"
        f"  - model: {json.dumps(str(tiny_family['ft1']))}\n"
        f"  - model: {json.dumps(str(tiny_family['ft2']))}\n"
        "    parameters:\n      wieght: 0.5\n"
    )
    out = tmp_path / "out"
    result = invoke(cli, command, recipe, out)
    assert_failed(result, out, f"{recipe}:6", "models[1].parameters.wieght", "'weight'")


@COMMANDS
@pytest.mark.parametrize(("value", "shown"), [("1.5", "1.5"), ("[0.0, 1.5]", "1.5"), ("-0.1", "-0.1")])
def test_out_of_range_value(cli: CliRunner, tiny_family: dict[str, Path], tmp_path: Path, command: str, value: str, shown: str) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"method: slerp\nmodels:\n  - {json.dumps(str(tiny_family['ft1']))}\n  - {json.dumps(str(tiny_family['ft2']))}\n"
        f"parameters:\n  t: {value}\n"
    )
    out = tmp_path / "out"
    result = invoke(cli, command, recipe, out)
    assert_failed(result, out, f"{recipe}:6", "parameters.t", f"= {shown}", "invalid")


@COMMANDS
def test_empty_list_parameter_is_an_error_not_a_crash(cli: CliRunner, tiny_family: dict[str, Path], tmp_path: Path, command: str) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "method: linear\nmodels:\n"
        f"  - model: {json.dumps(str(tiny_family['ft1']))}\n    parameters: {{weight: []}}\n"
        f"  - {json.dumps(str(tiny_family['ft2']))}\n"
    )
    out = tmp_path / "out"
    result = invoke(cli, command, recipe, out)
    assert_failed(result, out, f"{recipe}:4", "models[0].parameters.weight", "empty list")


@COMMANDS
@pytest.mark.parametrize("dtype", ["bool", "I8", "int8"])
def test_non_float_output_dtype_is_rejected(cli: CliRunner, tiny_family: dict[str, Path], tmp_path: Path, command: str, dtype: str) -> None:
    recipe = linear_recipe(tmp_path, tiny_family["ft1"], tiny_family["ft2"], extra=f"output:\n  dtype: {dtype}\n")
    out = tmp_path / "out"
    result = invoke(cli, command, recipe, out)
    assert_failed(result, out, f"{recipe}:6", "output.dtype", f"'{dtype}'")


# ------------------------------------------------------------------------------------------------
# the output location
# ------------------------------------------------------------------------------------------------


@COMMANDS
def test_output_inside_an_input_folder(cli: CliRunner, tiny_family: dict[str, Path], tmp_path: Path, command: str) -> None:
    model = copy_model(tiny_family["ft1"], tmp_path / "input")
    before = sorted(p.name for p in model.iterdir())
    recipe = linear_recipe(tmp_path, model, tiny_family["ft2"])
    out = model / "merged"
    result = invoke(cli, command, recipe, out)
    assert_failed(result, out, str(out), "inside input", "models[0]")
    assert sorted(p.name for p in model.iterdir()) == before


@COMMANDS
def test_output_equal_to_an_input_folder(cli: CliRunner, tiny_family: dict[str, Path], tmp_path: Path, command: str) -> None:
    model = copy_model(tiny_family["ft1"], tmp_path / "input")
    before = {p.name: p.read_bytes() for p in model.iterdir()}
    recipe = linear_recipe(tmp_path, model, tiny_family["ft2"])
    result = invoke(cli, command, recipe, model, "--overwrite")
    assert result.exit_code == 2, result.output
    assert "inside input" in result.output and str(model) in result.output
    assert {p.name: p.read_bytes() for p in model.iterdir()} == before
    assert not partial_of(model).exists()


@COMMANDS
def test_input_inside_the_output_folder(cli: CliRunner, tiny_family: dict[str, Path], tmp_path: Path, command: str) -> None:
    parent = tmp_path / "parent"
    model = copy_model(tiny_family["ft1"], parent / "input")
    recipe = linear_recipe(tmp_path, model, tiny_family["ft2"])
    result = invoke(cli, command, recipe, parent, "--overwrite")
    assert result.exit_code == 2, result.output
    assert "inside the output folder" in result.output and str(parent) in result.output
    assert (model / "model.safetensors").is_file()
    assert not partial_of(parent).exists()


@COMMANDS
def test_existing_output_without_overwrite(cli: CliRunner, tiny_family: dict[str, Path], tmp_path: Path, command: str) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("an earlier result")
    recipe = linear_recipe(tmp_path, tiny_family["ft1"], tiny_family["ft2"])
    result = invoke(cli, command, recipe, out)
    assert result.exit_code == 2, result.output
    assert str(out) in result.output and "already exists" in result.output and "--overwrite" in result.output
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert (out / "keep.txt").read_text() == "an earlier result"
    assert not partial_of(out).exists()


def test_overwrite_replaces_an_existing_output(cli: CliRunner, tiny_family: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("an earlier result")
    recipe = linear_recipe(tmp_path, tiny_family["ft1"], tiny_family["ft2"])
    result = invoke(cli, "run", recipe, out, "--overwrite")
    assert result.exit_code == 0, result.output
    assert not (out / "keep.txt").exists()
    assert (out / "model.safetensors").is_file()
    assert not partial_of(out).exists()
    assert [p.name for p in tmp_path.iterdir() if ".old" in p.name] == []
    a = load_file(tiny_family["ft1"] / "model.safetensors")["model.norm.weight"].double()
    b = load_file(tiny_family["ft2"] / "model.safetensors")["model.norm.weight"].double()
    merged = load_file(out / "model.safetensors")["model.norm.weight"].double()
    torch.testing.assert_close(merged, (a + b) / 2, rtol=8e-3, atol=1e-6)


def test_failure_during_the_merge_leaves_nothing(cli: CliRunner, tiny_family: dict[str, Path], tmp_path: Path) -> None:
    """Weights that sum to 0 fail inside the method, after the output folder was started."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "method: linear\nmodels:\n"
        f"  - model: {json.dumps(str(tiny_family['ft1']))}\n    parameters: {{weight: 1.0}}\n"
        f"  - model: {json.dumps(str(tiny_family['ft2']))}\n    parameters: {{weight: -1.0}}\n"
    )
    out = tmp_path / "out"
    result = invoke(cli, "run", recipe, out)
    assert_failed(result, out, "sum to 0", "'model.embed_tokens.weight'")


def test_failure_with_overwrite_keeps_the_old_output(cli: CliRunner, tiny_family: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("an earlier result")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "method: linear\nmodels:\n"
        f"  - model: {json.dumps(str(tiny_family['ft1']))}\n    parameters: {{weight: 2.0}}\n"
        f"  - model: {json.dumps(str(tiny_family['ft2']))}\n    parameters: {{weight: -2.0}}\n"
    )
    result = invoke(cli, "run", recipe, out, "--overwrite")
    assert result.exit_code == 2, result.output
    assert "sum to 0" in result.output
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert not partial_of(out).exists()


@COMMANDS
@pytest.mark.parametrize("odd", ["[/v2]", "[red]x", "[bold]"])
def test_paths_with_brackets_are_shown_verbatim(cli: CliRunner, tiny_family: dict[str, Path], tmp_path: Path, command: str, odd: str) -> None:
    """Messages are not read as rich markup: the path is printed as it is, and nothing crashes."""
    folder = tmp_path / "models" / odd
    folder.mkdir(parents=True)
    recipe = linear_recipe(tmp_path, folder, tiny_family["ft2"])
    out = tmp_path / "out"
    result = invoke(cli, command, recipe, out)
    assert_failed(result, out, str(folder), "not a model folder")


def test_a_rejected_file_never_closes_another_files_descriptor_later(tiny_family: dict[str, Path], tmp_path: Path) -> None:
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


@COMMANDS
def test_input_where_the_engine_writes_first(cli: CliRunner, tiny_family: dict[str, Path], tmp_path: Path, command: str) -> None:
    """The output is written into ``<out>.partial`` first: an input stored there is refused."""
    out = tmp_path / "merged"
    model = copy_model(tiny_family["ft1"], tmp_path / "merged.partial")
    recipe = linear_recipe(tmp_path, model, tiny_family["ft2"])
    result = invoke(cli, command, recipe, out, "--overwrite")
    assert result.exit_code == 2, result.output
    assert str(model) in result.output and "written first" in result.output
    assert (model / "model.safetensors").is_file() and (model / "config.json").is_file()
    assert not out.exists()


def test_a_users_folder_named_like_the_scratch_folder_is_never_deleted(cli: CliRunner, tiny_family: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "merged"
    scratch = tmp_path / "merged.partial"
    scratch.mkdir()
    (scratch / "notes.txt").write_text("mine")
    result = invoke(cli, "run", linear_recipe(tmp_path, tiny_family["ft1"], tiny_family["ft2"]), out)
    assert result.exit_code == 2, result.output
    assert "not made by workbench" in result.output
    assert (scratch / "notes.txt").read_text() == "mine"
    assert not out.exists()


def test_replacing_an_output_leaves_neighbouring_folders_alone(cli: CliRunner, tiny_family: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "merged"
    out.mkdir()
    model = copy_model(tiny_family["ft1"], tmp_path / "merged.old")
    result = invoke(cli, "run", linear_recipe(tmp_path, model, tiny_family["ft2"]), out, "--overwrite")
    assert result.exit_code == 0, result.output
    assert (model / "model.safetensors").is_file() and (model / "config.json").is_file()
    assert (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith((".merged", "merged"))) == ["merged", "merged.old"]
