"""What a push would talk to, said before anything is sent: the Hub endpoint and whether a token is
found (never the token itself). Shared by the Publish screen and the Run screen's ``output.push``."""

from __future__ import annotations


def hub_line() -> tuple[str, bool]:
    """A line naming the endpoint and the token's presence, and whether a push can authenticate."""
    import os

    from workbench.checkpoint.hub_client import HOW_TO_LOGIN, current_token, endpoint, offline

    where = endpoint()
    if offline():
        return f"Hub {where} - offline mode is on (HF_HUB_OFFLINE=1).", False
    if current_token() is None:
        return f"Hub {where} - no token found: {HOW_TO_LOGIN}.", False
    source = "HF_TOKEN" if os.environ.get("HF_TOKEN") else "the login cache"
    return f"Hub {where} - token found ({source}).", True


def visibility_question(folder: str, repo: str, where: str) -> str:
    """The confirmation asked before a public push."""
    return (
        f"Push {folder} to {repo} on {where} as a PUBLIC repo?\n\n"
        "Anyone will be able to download it. Turn on 'private repo' for a private one."
    )
