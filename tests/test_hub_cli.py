"""The real `workbench` command in fresh processes, pointed at the fake Hub only through the usual
environment variables (HF_ENDPOINT, HF_HOME, HF_HUB_CACHE, HF_TOKEN), as a user would run it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from fake_hub import TOKEN, FakeHub, hub_fixture, sha256_tree, subprocess_env  # noqa: F401  (hub_fixture provides `hub`)


def workbench(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "workbench", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_validate_run_and_push_in_fresh_processes(
    hub: FakeHub, tiny_family: dict[str, Path], tmp_path: Path
) -> None:
    for key, path in tiny_family.items():
        hub.add_folder(f"org/{key}", path)
    out = tmp_path / "merged"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "method: ties\nbase: org/base@main\nmodels: [org/ft1, org/ft2]\nparameters: {density: 0.5}\n"
        f"output: {{path: {out}, push: {{repo: org/cli-merge, private: true}}}}\n"
    )
    env = subprocess_env(hub, tmp_path)

    validated = workbench(env, "validate", str(recipe))
    assert validated.returncode == 0, validated.stderr
    assert all(r.range for r in hub.file_downloads() if r.path.endswith(".safetensors"))  # headers only

    ran = workbench(env, "run", str(recipe))
    assert ran.returncode == 0, ran.stderr
    assert "pushed to" in ran.stdout and "(private repo)" in ran.stdout
    stored = hub.files("org/cli-merge")
    assert sorted(set(stored) - {".gitattributes"}) == sorted(sha256_tree(out))
    assert (out / "model.safetensors").read_bytes() == stored["model.safetensors"]
    assert hub.repos["org/cli-merge"].private

    bad = "hf_RefusedInAFreshProcess0123456789"
    refused = workbench(subprocess_env(hub, tmp_path, token=bad), "push", str(out), "--repo", "org/elsewhere")
    assert refused.returncode == 2
    assert "refused the token (401 Unauthorized)" in refused.stderr and "Traceback" not in refused.stderr
    for text in (validated.stdout, validated.stderr, ran.stdout, ran.stderr, refused.stdout, refused.stderr):
        assert TOKEN not in text and bad not in text
    assert "org/elsewhere" not in hub.repos
