"""Uploading a merged model folder to the Hugging Face Hub (``workbench push``, ``output.push``).

Everything that can be checked locally is checked before the first request: the folder is a
finished output with weights, its model card parses and has the required fields, no file to upload
contains the token, and a token exists. Then the repo is created if missing (private if asked; an
existing *public* repo is refused when ``private`` is asked, rather than published into), the branch
is created if missing, and ``HfApi.upload_folder`` uploads. An upload that fails midway leaves the
already committed files on the Hub, and running the same push again completes it: uploads are
idempotent per file (with hf_xet installed, unchanged files are even skipped).

The token comes from huggingface_hub (``HF_TOKEN``, else the login cache). It is passed to the
client and nowhere else: messages are scrubbed of it, and nothing here writes a file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from workbench.checkpoint.hub_client import (
    HOW_TO_LOGIN,
    HubError,
    current_token,
    describe,
    endpoint,
    failures,
    offline,
)
from workbench.checkpoint.output_folder import PARTIAL_MARKER
from workbench.engine.card import check_card

#: Files never uploaded: our unfinished-output marker (a finished folder has none).
IGNORE_PATTERNS = [PARTIAL_MARKER]
#: Weight files are not scanned for the token (they are large and binary; nothing of ours writes text there).
_UNSCANNED = {".safetensors", ".bin", ".gguf", ".pt", ".pth", ".ckpt"}
COMMIT_MESSAGE = "Upload merged model (Merge Workbench)"


@dataclass(frozen=True)
class PushResult:
    repo_id: str
    url: str
    commit_url: str
    pr_url: str | None
    private: bool
    revision: str | None


def check_folder(folder: Path, token: str | None) -> None:
    """The local checks of a push: a finished output folder with weights, a valid card, no token inside."""
    if not folder.is_dir():
        raise HubError(f"{folder} is not a folder; push the output folder of a `workbench run`.")
    if (folder / PARTIAL_MARKER).exists():
        raise HubError(
            f"{folder} is an unfinished output (it holds {PARTIAL_MARKER}); finish the run (or --resume it) "
            "before pushing."
        )
    if not any(folder.glob("*.safetensors")):
        raise HubError(
            f"{folder} holds no *.safetensors weights; push the output folder of a `workbench run`."
        )
    check_card(folder)
    if token:
        needle = token.encode()
        for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix not in _UNSCANNED):
            if needle in path.read_bytes():
                raise HubError(
                    f"{path} contains the Hub token; remove it before pushing (nothing was uploaded)."
                )


def push_folder(
    folder: Path, repo_id: str, *, private: bool = False, revision: str | None = None, create_pr: bool = False
) -> PushResult:
    """Check ``folder`` locally, then create ``repo_id`` if needed and upload the folder into it."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
        if "/" not in repo_id:
            raise HFValidationError("it needs a namespace: 'org/name' or 'user/name'")
    except HFValidationError as exc:
        raise HubError(f"'{repo_id}' is not a Hub repo id ({exc}).") from None
    if create_pr and revision not in (None, "main"):
        raise HubError(
            f"a pull request is always opened against the default branch; drop --revision {revision} or --create-pr."
        )
    token = current_token()
    check_folder(folder, token)
    if offline():
        raise HubError(
            f"cannot push {folder} to {repo_id}: offline mode is on (HF_HUB_OFFLINE=1); unset it to upload."
        )
    if not token:
        raise HubError(
            f"cannot push {folder} to {repo_id}: no Hugging Face token was found; {HOW_TO_LOGIN} (a token "
            "with write access)."
        )

    api = HfApi(endpoint=endpoint(), token=token, library_name="merge-workbench")
    uploading = False
    try:
        repo_url = api.create_repo(repo_id, private=private, exist_ok=True)
        info = api.model_info(repo_id)
        if private and not info.private:
            raise HubError(
                f"{repo_id} already exists on {endpoint()} and is public, but a private push was asked for; nothing was"
                " uploaded. Make the repo private on the Hub first, or push without --private / private: true."
            )
        if revision and revision != "main" and not create_pr:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        uploading = True
        commit = api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            revision=revision,
            create_pr=create_pr,
            commit_message=COMMIT_MESSAGE,
            ignore_patterns=list(IGNORE_PATTERNS),
        )
    except failures() as exc:
        message = f"pushing {folder}: " + describe(exc, f"repo {repo_id}")
        if uploading:
            message += (
                " Files already committed stay on the Hub; run the same push again to complete the upload."
            )
        raise HubError(message) from None
    return PushResult(
        repo_id=repo_id,
        url=str(repo_url),
        commit_url=commit.commit_url,
        pr_url=commit.pr_url,
        private=bool(info.private),
        revision=revision,
    )
