"""`workbench push` and `output.push` against the fake Hub with the real huggingface_hub client: the
round trip is byte-identical, private means private, the token is never shown or written, a bad card
or a bad token stops the push with a clear message, and a push that failed midway completes when
run again."""

from __future__ import annotations

import hashlib
import logging
import shutil
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from cli_failures import WIDE, assert_failed
from click.testing import CliRunner, Result
from fake_hub import TOKEN, FakeHub, hub_fixture, sha256_tree  # noqa: F401  (hub_fixture provides `hub`)

from workbench.cli.main import main
from workbench.errors import RecipeError
from workbench.recipe.schema import parse_recipe


@pytest.fixture(scope="module")
def merged(tiny_family: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished `workbench run` output (from local inputs); tests copy it before changing it."""
    root = tmp_path_factory.mktemp("merged")
    recipe = root / "recipe.yaml"
    recipe.write_text(f"method: linear\nmodels: [{tiny_family['ft1']}, {tiny_family['ft2']}]\n")
    result = CliRunner().invoke(main, ["run", str(recipe), "--out", str(root / "out"), "-q"])
    assert result.exit_code == 0, result.output
    return root / "out"


def push(cli: CliRunner, folder: Path, *args: str) -> Result:
    return cli.invoke(main, ["push", str(folder), *args], env=WIDE)


def download(hub: FakeHub, repo: str, tmp_path: Path, revision: str | None = None) -> Path:
    from huggingface_hub import snapshot_download

    return Path(
        snapshot_download(repo, revision=revision, cache_dir=tmp_path / "download-cache", endpoint=hub.url)
    )


def test_push_round_trip_is_byte_identical(
    hub: FakeHub, merged: Path, cli: CliRunner, tmp_path: Path
) -> None:
    result = push(cli, merged, "--repo", "org/merged")
    assert result.exit_code == 0, result.output
    assert f"pushed to {hub.url}/org/merged" in result.output
    want = sha256_tree(merged)
    assert "README.md" in want and "model.safetensors" in want and "workbench_recipe.yaml" in want
    back = sha256_tree(download(hub, "org/merged", tmp_path))
    back.pop(".gitattributes")  # the Hub's own first commit
    assert back == want
    from huggingface_hub import HfApi

    assert HfApi(endpoint=hub.url).model_info("org/merged").private is False
    assert hub.logged("POST", "/api/validate-yaml")  # the client had the Hub check the card's metadata too


def test_private_flag_is_honoured(hub: FakeHub, merged: Path, cli: CliRunner, tmp_path: Path) -> None:
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError

    result = push(cli, merged, "--repo", "org/private-merge", "--private")
    assert result.exit_code == 0, result.output
    assert "(private repo)" in result.output
    assert hub.repos["org/private-merge"].private
    assert HfApi(endpoint=hub.url, token=TOKEN).model_info("org/private-merge").private is True
    with pytest.raises(RepositoryNotFoundError):
        HfApi(endpoint=hub.url, token=False).model_info("org/private-merge")
    for url in (
        f"{hub.url}/api/models/org/private-merge",
        f"{hub.url}/org/private-merge/resolve/main/model.safetensors",
    ):
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(url)  # no token
        assert refused.value.code in (401, 404)
    assert download(hub, "org/private-merge", tmp_path)  # with the token: readable


def test_private_push_into_an_existing_public_repo_is_refused(
    hub: FakeHub, merged: Path, cli: CliRunner
) -> None:
    hub.create("org/public")
    result = push(cli, merged, "--repo", "org/public", "--private")
    assert_failed(result, None, "org/public already exists", "is public", "nothing was uploaded")
    assert not hub.logged("POST", "/commit/")
    assert set(hub.files("org/public")) == {".gitattributes"}


def test_a_refused_token_fails_clearly_and_is_never_shown(
    hub: FakeHub, merged: Path, cli: CliRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    bad = "hf_NotAcceptedByTheFakeHub0123456789"
    monkeypatch.setenv("HF_TOKEN", bad)
    result = push(cli, merged, "--repo", "org/refused")
    assert_failed(result, None, "org/refused", "refused the token (401 Unauthorized)", "HF_TOKEN")
    assert bad not in result.output and bad[3:15] not in result.output  # the fake echoes it back in its error
    assert "org/refused" not in hub.repos


def test_missing_token_stops_before_any_request(
    hub: FakeHub, merged: Path, cli: CliRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("HF_TOKEN")
    assert_failed(push(cli, merged, "--repo", "org/anon"), None, "no Hugging Face token", "hf auth login")
    assert hub.requests == []


def test_token_from_the_login_cache(
    hub: FakeHub, merged: Path, cli: CliRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import constants

    monkeypatch.delenv("HF_TOKEN")
    Path(constants.HF_TOKEN_PATH).parent.mkdir(parents=True, exist_ok=True)
    Path(constants.HF_TOKEN_PATH).write_text(TOKEN)
    result = push(cli, merged, "--repo", "org/logged-in")
    assert result.exit_code == 0, result.output
    assert "model.safetensors" in hub.files("org/logged-in")


def test_run_with_output_push_never_writes_or_logs_the_token(
    hub: FakeHub,
    tiny_family: dict[str, Path],
    cli: CliRunner,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    hub.add_folder("org/base", tiny_family["base"])
    recipe = tmp_path / "recipe.yaml"
    out = tmp_path / "out"
    recipe.write_text(
        f"method: task_arithmetic\nbase: org/base\nmodels: [{tiny_family['ft1']}, {tiny_family['ft2']}]\n"
        f"output: {{path: {out}, push: {{repo: org/pushed, private: true}}}}\n"
    )
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="huggingface_hub")  # its logger has a level of its own
    result = cli.invoke(main, ["run", str(recipe)], env=WIDE)
    assert result.exit_code == 0, result.output
    assert "pushed to" in result.output
    stored = hub.files("org/pushed")
    assert {
        name: hashlib.sha256(data).hexdigest() for name, data in stored.items() if name != ".gitattributes"
    } == sha256_tree(out)
    card = stored["README.md"].decode()
    assert (
        "base_model:\n- org/base\n" in card and "base_model_relation: merge" in card and "## Recipe" in card
    )
    assert (
        "push:" in stored["workbench_recipe.yaml"].decode()
        and "org/pushed" in stored["workbench_recipe.yaml"].decode()
    )
    assert hub.repos["org/pushed"].private
    needle = TOKEN.encode()
    assert "(authenticated: True)" in caplog.text  # the client's request log was captured
    assert TOKEN not in result.output and TOKEN not in caplog.text
    assert all(needle not in data for data in stored.values())
    assert all(
        needle not in p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()
    )  # output, cache, logs


BAD_CARDS = {
    "yaml": (
        lambda text: text.replace("library_name: transformers", "library_name: [transformers"),
        "metadata block",
    ),
    "library": (lambda text: text.replace("library_name: transformers\n", ""), "'library_name' is missing"),
    "tags": (lambda text: text.replace("- merge\n", "", 1), "'tags' must be a list that includes 'merge'"),
    "base_model": (
        lambda text: text.replace(
            "tags:", "base_model:\n- not a repo id!\nbase_model_relation: merge\ntags:"
        ),
        "is not a Hub repo id",
    ),
    "recipe": (lambda text: text.split("## Recipe")[0], "no '## Recipe' section"),
}


@pytest.mark.parametrize("case", sorted(BAD_CARDS))
def test_a_bad_card_stops_the_push_before_any_request(
    hub: FakeHub, merged: Path, cli: CliRunner, tmp_path: Path, case: str
) -> None:
    folder = tmp_path / "out"
    shutil.copytree(merged, folder)
    edit, fragment = BAD_CARDS[case]
    card = folder / "README.md"
    changed = edit(card.read_text())
    assert changed != card.read_text()
    card.write_text(changed)
    assert_failed(push(cli, folder, "--repo", "org/carded"), None, str(card), fragment)
    assert hub.requests == []


def test_a_token_inside_the_folder_stops_the_push(
    hub: FakeHub, merged: Path, cli: CliRunner, tmp_path: Path
) -> None:
    folder = tmp_path / "out"
    shutil.copytree(merged, folder)
    (folder / "notes.txt").write_text(f"pushed with {TOKEN}\n")
    result = push(cli, folder, "--repo", "org/leaky")
    assert_failed(result, None, "notes.txt contains the Hub token", "nothing was uploaded")
    assert TOKEN not in result.output and hub.requests == []


def test_a_push_that_failed_midway_completes_when_run_again(
    hub: FakeHub, merged: Path, cli: CliRunner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import constants

    # Without hf_xet the client makes one commit and does not retry it; with hf_xet it retries
    # transient errors itself, so the failure would not reach us.
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    hub.fail_commits = 1
    first = push(cli, merged, "--repo", "org/retried")
    assert_failed(first, None, "org/retried", "answered 500", "run the same push again")
    assert TOKEN not in first.output
    assert set(hub.files("org/retried")) == {".gitattributes"}  # the repo exists, the files are not there yet
    second = push(cli, merged, "--repo", "org/retried")
    assert second.exit_code == 0, second.output
    back = sha256_tree(download(hub, "org/retried", tmp_path))
    back.pop(".gitattributes")
    assert back == sha256_tree(merged)


def test_revision_and_pull_request(hub: FakeHub, merged: Path, cli: CliRunner) -> None:
    hub.create("org/target")
    result = push(cli, merged, "--repo", "org/target", "--revision", "dev")
    assert result.exit_code == 0, result.output
    assert "model.safetensors" in hub.files("org/target", "dev")
    assert "model.safetensors" not in hub.files("org/target", "main")
    result = push(cli, merged, "--repo", "org/target", "--create-pr")
    assert result.exit_code == 0, result.output
    assert "pull request" in result.output and "/discussions/1" in result.output
    assert "model.safetensors" in hub.files("org/target", "refs/pr/1")
    assert "model.safetensors" not in hub.files("org/target", "main")
    before = len(hub.requests)
    assert_failed(
        push(cli, merged, "--repo", "org/target", "--create-pr", "--revision", "dev"), None, "default branch"
    )
    assert len(hub.requests) == before


def test_push_refuses_what_is_not_a_finished_output(
    hub: FakeHub, merged: Path, cli: CliRunner, tmp_path: Path
) -> None:
    assert_failed(push(cli, tmp_path / "nothing", "--repo", "org/x"), None, "is not a folder")
    folder = tmp_path / "out"
    shutil.copytree(merged, folder)
    (folder / ".workbench-partial").write_text("")
    assert_failed(push(cli, folder, "--repo", "org/x"), None, "unfinished output")
    assert_failed(push(cli, merged, "--repo", "not-a-repo"), None, "'not-a-repo' is not a Hub repo id")
    assert hub.requests == []


def test_recipe_push_section_is_validated() -> None:
    recipe = parse_recipe(
        "method: linear\nmodels: [a, b]\noutput:\n  push: {repo: org/name, private: true, revision: dev}\n"
    )
    assert (
        recipe.output.push is not None and recipe.output.push.private and recipe.output.push.revision == "dev"
    )
    with pytest.raises(
        RecipeError, match=r"recipe.yaml:4: output.push.repo: .*'no slash' is not a Hub repo id"
    ):
        parse_recipe("method: linear\nmodels: [a, b]\noutput:\n  push: {repo: no slash}\n", "recipe.yaml")
    with pytest.raises(RecipeError, match="output.push.*default branch"):
        parse_recipe(
            "method: linear\nmodels: [a, b]\noutput:\n  push: {repo: org/name, create_pr: true, revision: dev}\n"
        )
    with pytest.raises(RecipeError, match="output.push.token: unknown field"):
        parse_recipe("method: linear\nmodels: [a, b]\noutput:\n  push: {repo: org/name, token: hf_x}\n")


def test_messages_are_scrubbed_of_tokens(hub: FakeHub) -> None:
    from workbench.checkpoint.hub_client import scrub

    other = "hf_" + "Q" * 34  # a token of the right shape that is not the current one
    text = scrub(
        f"server said: token {TOKEN} refused; also {other}; header "
        "Authorization: Bearer abc.def; hf_hub_download failed"
    )
    assert TOKEN not in text and other not in text and "abc.def" not in text
    assert text.count("<token>") == 3 and "hf_hub_download failed" in text
    assert scrub("custom-token-without-shape", token="custom-token-without-shape") == "<token>"
