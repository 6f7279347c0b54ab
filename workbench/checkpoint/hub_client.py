"""What the Hub code shares: the endpoint, offline mode, the token, and errors a user can act on.

Everything comes from huggingface_hub's own configuration (``HF_ENDPOINT``, ``HF_HUB_OFFLINE``,
``HF_HUB_CACHE``, ``HF_TOKEN`` or the login cache), read when a call is made rather than copied at
import, so the workbench goes wherever the client is pointed. The token is handed to the client and
never kept, printed or written: every message that leaves here is scrubbed of it first, because
server answers and client exceptions may quote request details.
"""

from __future__ import annotations

import re
from pathlib import Path

from workbench.errors import WorkbenchError

#: Shapes of Hugging Face access tokens, scrubbed from messages even when the token is not known here.
_TOKEN_SHAPES = re.compile(r"\b(?:hf|api_org)_[A-Za-z0-9]{30,}\b")
_BEARER = re.compile(r"(?i)(bearer\s+)\S+")
HOW_TO_LOGIN = "set HF_TOKEN or run `hf auth login`"


class HubError(WorkbenchError):
    """The Hub refused a request, could not be reached, or a push was stopped before uploading."""


def endpoint() -> str:
    """The Hub the client talks to (``HF_ENDPOINT``, default https://huggingface.co)."""
    from huggingface_hub import constants

    return constants.ENDPOINT.rstrip("/")


def offline() -> bool:
    """Whether huggingface_hub is in offline mode (``HF_HUB_OFFLINE=1``)."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def cache_dir() -> Path:
    """The Hub cache (``HF_HUB_CACHE``, default ``~/.cache/huggingface/hub``)."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE).expanduser().resolve()  # as huggingface_hub resolves it


def current_token() -> str | None:
    """The token the client would send (``HF_TOKEN``, else the login cache), for scrubbing and checks."""
    from huggingface_hub import get_token

    return get_token()


def scrub(text: str, token: str | None = None) -> str:
    """``text`` with the token, and anything shaped like a Hub token or bearer credential, masked."""
    token = token if token is not None else current_token()
    if token:
        text = text.replace(token, "<token>")
    return _BEARER.sub(r"\1<token>", _TOKEN_SHAPES.sub("<token>", text))


def failures() -> tuple[type[BaseException], ...]:
    """What a Hub call raises for a cause outside the program (answers, network, cache, offline,
    bad arguments), as opposed to a bug: these become messages, anything else stays a traceback."""
    import httpx2
    from huggingface_hub import errors

    return (errors.HfHubHTTPError, errors.OfflineModeIsEnabled, httpx2.HTTPError, OSError, ValueError)


def describe(exc: BaseException, what: str) -> str:
    """One paragraph about a failed Hub call on ``what`` (a repo id, maybe with a revision), scrubbed."""
    import httpx2
    from huggingface_hub import errors

    where = endpoint()
    if isinstance(exc, errors.OfflineModeIsEnabled):
        text = f"{what}: the Hub cannot be used because offline mode is on (HF_HUB_OFFLINE=1)."
    elif isinstance(exc, errors.GatedRepoError):
        text = (
            f"{what} is gated on {where}: accept its terms on the model page with the account whose token is "
            f"used ({HOW_TO_LOGIN})."
        )
    elif isinstance(exc, errors.RevisionNotFoundError):
        text = f"{what}: that revision does not exist on {where} (check the branch, tag or commit after '@')."
    elif isinstance(exc, errors.RepositoryNotFoundError):
        text = (
            f"{what} was not found on {where}: it does not exist, or it is private and no token with access was sent"
            f" ({HOW_TO_LOGIN})."
        )
    elif (
        isinstance(exc, errors.HfHubHTTPError)
        and exc.response is not None
        and exc.response.status_code in (401, 403)
    ):
        status = exc.response.status_code
        text = (
            f"{what}: the Hub at {where} refused the token ({status} "
            f"{'Unauthorized' if status == 401 else 'Forbidden'}). The token (from HF_TOKEN or the login "
            f"cache) is invalid, expired, or has no write access to this repo; {HOW_TO_LOGIN} with a valid "
            "one."
        )
    elif isinstance(exc, errors.HfHubHTTPError):
        status = exc.response.status_code if exc.response is not None else "?"
        server = (exc.server_message or str(exc).splitlines()[0]).strip()
        text = f"{what}: the Hub at {where} answered {status} ({server})."
    elif isinstance(exc, httpx2.TransportError):
        text = f"{what}: could not reach the Hub at {where} ({type(exc).__name__}: {exc})."
    else:
        text = f"{what}: {type(exc).__name__}: {exc}"
    return scrub(text)
