"""Hub models as recipe inputs, against the fake Hub with the real huggingface_hub client: validate
reads config and headers only, run downloads only what a merge needs and merges exactly like the
local folders, a second run is served from the cache, offline mode uses the cache or says why not."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from cli_failures import WIDE, assert_failed
from click.testing import CliRunner
from fake_hub import FakeHub, hub_fixture, sha256_tree  # noqa: F401  (hub_fixture provides `hub`)

from workbench.checkpoint.remote import FIRST_BLOCK, RemoteSafetensorsReader
from workbench.checkpoint.resolve import open_reference
from workbench.cli.main import main

BIG = b"\0" * 200_000  # a file a merge does not need: it must never be fetched


def seed(hub: FakeHub, family: dict[str, Path], private: bool = False) -> dict[str, str]:
    """Put the tiny family on the fake Hub as org/base, org/ft1, org/ft2; returns their commits."""
    return {
        key: hub.add_folder(
            f"org/{key}", path, private=private, extra={"pytorch_model.bin": BIG, "README.md": b"# model\n"}
        )
        for key, path in family.items()
    }


def recipe(tmp_path: Path, base: str, *models: str, name: str = "recipe.yaml", extra: str = "") -> Path:
    path = tmp_path / name
    path.write_text(
        f"method: task_arithmetic\nbase: {json.dumps(base)}\n"
        f"models: {json.dumps(list(models))}\nparameters: {{lambda: 0.7}}\n{extra}"
    )
    return path


def cached_weights(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "hf-cache").rglob("*.safetensors"))


def test_validate_reads_only_config_and_headers(
    hub: FakeHub, tiny_family: dict[str, Path], cli: CliRunner, tmp_path: Path
) -> None:
    seed(hub, tiny_family)
    result = cli.invoke(
        main, ["validate", str(recipe(tmp_path, "org/base@main", "org/ft1", "org/ft2"))], env=WIDE
    )
    assert result.exit_code == 0, result.output
    assert "ok" in result.output and "3 input(s)" in result.output
    weights = [r for r in hub.logged(contains=".safetensors")]
    assert weights and all(r.method == "GET" for r in weights)
    for request in weights:  # every weight read is a range inside the first block: the header only
        assert request.range is not None and request.status == 206, request
        start, stop = map(int, request.range.removeprefix("bytes=").split("-"))
        assert start == 0 and stop < FIRST_BLOCK
    full_size = (tiny_family["base"] / "model.safetensors").stat().st_size
    assert full_size > FIRST_BLOCK, (
        "the weights must be larger than the header block for this test to mean anything"
    )
    assert not hub.logged(contains="pytorch_model.bin") and not hub.logged(contains="/tree/")
    assert {r.path.rsplit("/", 1)[-1] for r in hub.file_downloads()} == {"config.json", "model.safetensors"}
    assert cached_weights(tmp_path) == []  # nothing large landed in the cache


def test_plan_reads_only_config_and_headers(
    hub: FakeHub, tiny_family: dict[str, Path], cli: CliRunner, tmp_path: Path
) -> None:
    seed(hub, tiny_family)
    result = cli.invoke(
        main,
        ["plan", str(recipe(tmp_path, "org/base", "org/ft1", "org/ft2")), "--out", str(tmp_path / "out")],
        env=WIDE,
    )
    assert result.exit_code == 0, result.output
    assert result.output.count("(on the Hub, not downloaded yet)") == 3
    raw = (tiny_family["base"] / "model.safetensors").read_bytes()
    data_bytes = len(raw) - 8 - struct.unpack("<Q", raw[:8])[0]  # the tensors' bytes, without the header
    assert f"{data_bytes / 1e6:.2f} MB" in result.output
    assert {r.path.rsplit("/", 1)[-1] for r in hub.file_downloads()} == {"config.json", "model.safetensors"}
    assert all(r.range is not None for r in hub.logged(contains=".safetensors"))
    assert cached_weights(tmp_path) == []


def test_remote_reader_matches_local_reader_on_a_sharded_model(
    hub: FakeHub, tiny_family: dict[str, Path], registry, cli: CliRunner, tmp_path: Path
) -> None:
    local_recipe = recipe(tmp_path, str(tiny_family["base"]), str(tiny_family["ft1"]))
    sharded = tmp_path / "sharded"
    assert (
        cli.invoke(
            main, ["run", str(local_recipe), "--out", str(sharded), "--shard-size", "150KB", "-q"]
        ).exit_code
        == 0
    )
    assert (sharded / "model.safetensors.index.json").is_file()
    hub.add_folder("org/sharded", sharded)
    path, remote = open_reference(registry, "org/sharded")
    local = registry.open_checkpoint(sharded)
    assert isinstance(remote, RemoteSafetensorsReader)
    assert remote.tensor_names() == local.tensor_names()
    for name in local.tensor_names():
        a, b = remote.info(name), local.info(name)
        assert (a.dtype, a.shape, a.file.name) == (b.dtype, b.shape, b.file.name)
        assert a.file.parent == path
    assert remote.config() == local.config()
    assert cached_weights(tmp_path) == []
    assert remote.read(local.tensor_names()[0]).equal(
        local.read(local.tensor_names()[0])
    )  # the first read downloads
    assert len(cached_weights(tmp_path)) == len(list(sharded.glob("*.safetensors"))) > 1
    remote.close()
    local.close()


def test_run_downloads_only_needed_files_and_merges_like_local(
    hub: FakeHub, tiny_family: dict[str, Path], cli: CliRunner, tmp_path: Path
) -> None:
    commits = seed(hub, tiny_family)
    local = cli.invoke(
        main,
        [
            "run",
            str(recipe(tmp_path, *map(str, tiny_family.values()), name="local.yaml")),
            "--out",
            str(tmp_path / "local"),
            "-q",
        ],
    )
    assert local.exit_code == 0, local.output
    from_hub = cli.invoke(
        main,
        [
            "run",
            str(recipe(tmp_path, "org/base@main", "org/ft1", "org/ft2")),
            "--out",
            str(tmp_path / "hub"),
            "-q",
        ],
        env=WIDE,
    )
    assert from_hub.exit_code == 0, from_hub.output
    want, got = sha256_tree(tmp_path / "local"), sha256_tree(tmp_path / "hub")
    for name in ("model.safetensors", "config.json"):
        assert got[name] == want[name]
    fetched = {r.path.rsplit("/", 1)[-1] for r in hub.file_downloads()}
    assert fetched == {"config.json", "model.safetensors"}  # not pytorch_model.bin, README.md, .gitattributes
    card = (tmp_path / "hub" / "README.md").read_text()
    for key, commit in commits.items():
        assert f"- org/{key}\n" in card and f"{hub.url}/org/{key}/tree/{commit}" in card
    assert "base_model_relation: merge" in card


def test_second_run_is_served_from_the_cache(
    hub: FakeHub, tiny_family: dict[str, Path], cli: CliRunner, tmp_path: Path
) -> None:
    seed(hub, tiny_family)
    path = recipe(tmp_path, "org/base", "org/ft1", "org/ft2")
    assert cli.invoke(main, ["run", str(path), "--out", str(tmp_path / "a"), "-q"]).exit_code == 0
    before = len(hub.requests)
    assert hub.file_downloads()
    second = cli.invoke(main, ["run", str(path), "--out", str(tmp_path / "b"), "-q"])
    again = cli.invoke(main, ["validate", str(path)])
    assert second.exit_code == 0 and again.exit_code == 0, second.output + again.output
    later = hub.requests[before:]
    assert [r for r in later if "/resolve/" in r.path] == []  # no file request at all, headers included
    assert sorted(r.path for r in later) == sorted(
        f"/api/models/org/{key}" for key in tiny_family for _ in range(2)
    )  # a look-up per model and command
    assert (
        sha256_tree(tmp_path / "a")["model.safetensors"] == sha256_tree(tmp_path / "b")["model.safetensors"]
    )


def test_offline_uses_the_cache_and_names_what_is_missing(
    hub: FakeHub,
    tiny_family: dict[str, Path],
    cli: CliRunner,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from huggingface_hub import constants

    seed(hub, tiny_family)
    cached = recipe(tmp_path, "org/base@main", "org/ft1", "org/ft2")
    assert cli.invoke(main, ["run", str(cached), "--out", str(tmp_path / "online"), "-q"]).exit_code == 0
    missing = recipe(tmp_path, "org/base", "org/ft1", "org/never-downloaded", name="missing.yaml")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    before = len(hub.requests)
    result = cli.invoke(main, ["run", str(cached), "--out", str(tmp_path / "offline"), "-q"])
    assert result.exit_code == 0, result.output
    assert (
        sha256_tree(tmp_path / "offline")["model.safetensors"]
        == sha256_tree(tmp_path / "online")["model.safetensors"]
    )
    for command in ("validate", "run"):
        out = tmp_path / f"missing-{command}"
        result = cli.invoke(main, [command, str(missing), "--out", str(out)], env=WIDE)
        assert_failed(
            result,
            out,
            "org/never-downloaded",
            "is not in the Hugging Face cache",
            "offline mode is on (HF_HUB_OFFLINE=1)",
        )
    assert len(hub.requests) == before  # offline: not a single request
    # Online but with the Hub unreachable: the cache still serves what it has, and says what it lacks.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    hub.stop()
    assert cli.invoke(main, ["validate", str(cached)]).exit_code == 0
    result = cli.invoke(main, ["validate", str(missing)], env=WIDE)
    assert_failed(
        result, None, "org/never-downloaded", "is not in the Hugging Face cache", "could not be reached"
    )


def test_hub_errors_name_the_model(
    hub: FakeHub,
    tiny_family: dict[str, Path],
    cli: CliRunner,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seed(hub, {"base": tiny_family["base"]})
    hub.add_folder("org/secret", tiny_family["ft1"], private=True)
    cases = {
        "org/nowhere": ["models[0]", "'org/nowhere' was not found on", hub.url],
        "org/base@no-such-branch": ["models[0]", "'org/base@no-such-branch'", "revision does not exist"],
    }
    for ref, fragments in cases.items():
        assert_failed(
            cli.invoke(main, ["validate", str(recipe(tmp_path, "org/base", ref))], env=WIDE), None, *fragments
        )
    assert (
        cli.invoke(main, ["validate", str(recipe(tmp_path, "org/base", "org/secret"))]).exit_code == 0
    )  # the token sees it
    monkeypatch.delenv("HF_TOKEN")
    result = cli.invoke(main, ["validate", str(recipe(tmp_path, "org/base", "org/secret"))], env=WIDE)
    assert_failed(result, None, "'org/secret' was not found", "private", "HF_TOKEN")


def test_a_lying_header_on_the_hub_fails_validate_without_a_download(
    hub: FakeHub, tiny_family: dict[str, Path], cli: CliRunner, tmp_path: Path
) -> None:
    seed(hub, {"base": tiny_family["base"]})
    broken = tmp_path / "broken"
    broken.mkdir()
    data = (tiny_family["ft1"] / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(
        data[: len(data) - 1000]
    )  # cut short: the header promises more
    (broken / "config.json").write_bytes((tiny_family["ft1"] / "config.json").read_bytes())
    hub.add_folder("org/broken", broken)
    result = cli.invoke(main, ["validate", str(recipe(tmp_path, "org/base", "org/broken"))], env=WIDE)
    assert_failed(result, None, "org/broken/model.safetensors", "truncated")
    assert all(r.range for r in hub.logged("GET", "org/broken/resolve") if r.path.endswith(".safetensors"))
    header_len = struct.unpack("<Q", data[:8])[0]
    assert header_len + 8 < FIRST_BLOCK
