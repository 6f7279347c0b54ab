"""A stand-in Hugging Face Hub for the tests: a stdlib HTTP server on 127.0.0.1, run in a thread.

It answers the endpoints the real ``huggingface_hub`` client calls to create a repo, commit files
(``preupload`` answers "regular" for every file, so no LFS/Xet transfer protocol is needed), open a
pull request, create a branch, read repo info and file listings, and download files (``resolve``,
with HEAD and byte ranges). Repos hold real commits, so a download after an upload returns exactly
what was committed, at the commit a branch points to.

Like the real Hub it hides a private repo from a request without a valid token (404 RepoNotFound),
and refuses an unknown token with 401. The refusal deliberately echoes the token back in its error
body, so that the tests prove the workbench scrubs it from every message. Every request is logged
(method, path, Range header, whether it was authorised) without the token itself.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import pytest

GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
#: The token the fake accepts; distinctive, so that finding it anywhere in output or files is a leak.
TOKEN = "hf_WorkbenchFakeToken7Zq4Lw9Xc2Vb8Nm3"


def git_oid(content: bytes) -> str:
    """The git blob id of a file: what the Hub reports as a regular file's oid and ETag."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


@dataclass
class Logged:
    method: str
    path: str  # unquoted, without the query
    query: dict[str, list[str]]
    range: str | None
    authorized: bool
    status: int = 0


@dataclass
class FakeRepo:
    repo_id: str
    private: bool
    refs: dict[str, str] = field(default_factory=dict)  # branch / refs/pr/N -> commit sha
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)
    discussions: int = 0

    def commit(self, files: dict[str, bytes], message: str, parent: str | None) -> str:
        tree = dict(self.commits[parent]) if parent else {}
        tree.update(files)
        body = json.dumps(
            [parent, message, len(self.commits), sorted((p, git_oid(c)) for p, c in tree.items())]
        )
        sha = hashlib.sha1(body.encode()).hexdigest()
        self.commits[sha] = tree
        return sha


class FakeHub:
    """The server's state and controls. ``url`` is its endpoint; ``tokens`` the accepted tokens."""

    def __init__(self, tokens: tuple[str, ...] = ("hf_fake_valid_token",)) -> None:
        self.tokens = set(tokens)
        self.repos: dict[str, FakeRepo] = {}
        self.requests: list[Logged] = []
        #: Answer this many commit POSTs with a 500 (and store nothing) before accepting commits.
        self.fail_commits = 0
        self.lock = threading.Lock()
        self.connections: set[Any] = set()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._server.daemon_threads = True
        self._server.hub = self  # type: ignore[attr-defined]
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FakeHub:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop answering, also on kept-alive connections: afterwards the Hub is unreachable."""
        if self._thread.is_alive():
            self._server.shutdown()
            self._server.server_close()
        with self.lock:
            for connection in self.connections:
                try:
                    connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    # -- seeding and inspection (no HTTP) ----------------------------------------------------------

    def create(self, repo_id: str, private: bool = False) -> FakeRepo:
        repo = FakeRepo(repo_id, private)
        repo.refs["main"] = repo.commit({".gitattributes": GITATTRIBUTES}, "initial commit", None)
        self.repos[repo_id] = repo
        return repo

    def add_folder(
        self,
        repo_id: str,
        folder: Path,
        private: bool = False,
        branch: str = "main",
        extra: dict[str, bytes] | None = None,
    ) -> str:
        """Commit every file of ``folder`` (plus ``extra``) to ``branch``; returns the commit sha."""
        repo = self.repos.get(repo_id) or self.create(repo_id, private)
        files = {
            p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
        }
        files.update(extra or {})
        repo.refs[branch] = repo.commit(files, "add model", repo.refs.get(branch, repo.refs["main"]))
        return repo.refs[branch]

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        repo = self.repos[repo_id]
        return repo.commits[repo.refs.get(revision, revision)]

    def logged(self, method: str | None = None, contains: str = "") -> list[Logged]:
        with self.lock:
            return [r for r in self.requests if (method is None or r.method == method) and contains in r.path]

    def file_downloads(self) -> list[Logged]:
        """GETs of file contents (HEAD requests and API calls excluded)."""
        return [r for r in self.logged("GET") if "/resolve/" in r.path]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Any

    def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
        pass

    def setup(self) -> None:
        super().setup()
        with self.hub.lock:
            self.hub.connections.add(self.connection)

    def finish(self) -> None:
        with self.hub.lock:
            self.hub.connections.discard(self.connection)
        super().finish()

    @property
    def hub(self) -> FakeHub:
        return self.server.hub

    # -- plumbing ---------------------------------------------------------------------------------

    def _send(
        self,
        status: int,
        body: bytes = b"",
        headers: dict[str, str] | None = None,
        content_length: int | None = None,
    ) -> None:
        self._entry.status = status
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body) if content_length is None else content_length))
        self.end_headers()
        if (
            self.command != "HEAD"
        ):  # a HEAD answer must carry no body (httpx reads it as the next status line)
            self.wfile.write(body)

    def _json(self, status: int, data: Any, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(data).encode(), {"Content-Type": "application/json", **(headers or {})})

    def _error(self, status: int, message: str, code: str | None = None) -> None:
        headers = {"X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        self._json(status, {"error": message}, headers)

    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _token(self) -> str | None:
        auth = self.headers.get("Authorization") or ""
        return auth[len("Bearer ") :] if auth.startswith("Bearer ") else None

    def _handle(self) -> None:
        parts = urlsplit(self.path)
        token = self._token()
        self._entry = Logged(
            self.command,
            unquote(parts.path),
            parse_qs(parts.query),
            self.headers.get("Range"),
            token in self.hub.tokens,
        )
        with self.hub.lock:
            self.hub.requests.append(self._entry)
        body = self._body()
        if token is not None and token not in self.hub.tokens:
            # The real Hub refuses unknown tokens; this one also repeats it, to test that we scrub it.
            self._error(401, f"Invalid credentials in Authorization header (token '{token}' is not valid)")
            return
        try:
            self._route([unquote(s) for s in parts.path.strip("/").split("/")], body)
        except _Stop:
            pass

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _handle

    # -- routing ----------------------------------------------------------------------------------

    def _repo(self, repo_id: str, write: bool = False) -> FakeRepo:
        repo = self.hub.repos.get(repo_id)
        authorized = self._entry.authorized
        if repo is None or (repo.private and not authorized):
            self._error(404, "Repository not found", "RepoNotFound")
            raise _Stop
        if write and not authorized:
            self._error(401, "You must be authenticated to write to this repository")
            raise _Stop
        return repo

    def _sha(self, repo: FakeRepo, revision: str) -> str:
        sha = repo.refs.get(revision, revision if revision in repo.commits else None)
        if sha is None:
            self._error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
            raise _Stop
        return sha

    def _route(self, seg: list[str], body: bytes) -> None:
        method = self.command
        if seg[:2] == ["api", "validate-yaml"] and method == "POST":
            return self._json(200, {"errors": [], "warnings": []})
        if seg[:3] == ["api", "repos", "create"] and method == "POST":
            return self._create_repo(json.loads(body))
        if seg[:2] == ["api", "models"] and len(seg) >= 4:
            return self._api(f"{seg[2]}/{seg[3]}", seg[4:], body)
        if len(seg) >= 5 and seg[2] == "resolve" and method in ("GET", "HEAD"):
            repo = self._repo(f"{seg[0]}/{seg[1]}")
            return self._resolve(repo, self._sha(repo, seg[3]), "/".join(seg[4:]))
        self._error(404, f"fake hub: no route for {method} {self._entry.path}")

    def _create_repo(self, payload: dict[str, Any]) -> None:
        if not self._entry.authorized:
            return self._error(401, "You must be authenticated to create a repository")
        repo_id = f"{payload.get('organization') or 'user'}/{payload['name']}"
        if repo_id in self.hub.repos:  # like the Hub, the conflict answer still carries the repo's url
            message = "You already created this model repo"
            return self._json(
                409, {"error": message, "url": f"{self.hub.url}/{repo_id}"}, {"X-Error-Message": message}
            )
        self.hub.create(
            repo_id, private=payload.get("visibility") == "private" or bool(payload.get("private"))
        )
        self._json(200, {"url": f"{self.hub.url}/{repo_id}", "name": repo_id})

    def _api(self, repo_id: str, rest: list[str], body: bytes) -> None:
        method = self.command
        write = method == "POST"
        repo = self._repo(repo_id, write=write)
        action = rest[0] if rest else None
        if method == "GET" and action in (None, "revision"):
            return self._info(repo, self._sha(repo, "/".join(rest[1:]) if rest else "main"))
        if method == "GET" and action == "tree":
            sha = self._sha(repo, rest[1])
            tree = repo.commits[sha]
            return self._json(
                200,
                [
                    {"type": "file", "oid": git_oid(c), "size": len(c), "path": p}
                    for p, c in sorted(tree.items())
                ],
            )
        if action == "preupload" and write:
            tree = repo.commits.get(repo.refs.get(rest[1], ""), {})
            files = json.loads(body)["files"]
            answer = [
                {
                    "path": f["path"],
                    "uploadMode": "regular",
                    "shouldIgnore": False,
                    "oid": git_oid(tree[f["path"]]) if f["path"] in tree else None,
                }
                for f in files
            ]
            return self._json(200, {"files": answer, "commitOid": repo.refs.get(rest[1])})
        if action == "commit" and write:
            return self._commit(repo, "/".join(rest[1:]), body)
        if action == "branch" and write:
            branch = "/".join(rest[1:])
            if branch in repo.refs:
                return self._error(409, f"Reference {branch} already exists")
            start = (json.loads(body) if body else {}).get("startingPoint") or "main"
            repo.refs[branch] = self._sha(repo, start)
            return self._json(200, {})
        if action == "discussions" and write and len(rest) == 1:
            repo.discussions += 1
            repo.refs[f"refs/pr/{repo.discussions}"] = repo.refs["main"]
            return self._json(
                200,
                {"num": repo.discussions, "url": f"{self.hub.url}/{repo_id}/discussions/{repo.discussions}"},
            )
        if action == "discussions" and method == "GET" and len(rest) == 2:
            num = int(rest[1])
            return self._json(
                200,
                {
                    "num": num,
                    "title": "upload",
                    "status": "draft",
                    "isPullRequest": True,
                    "createdAt": "2026-01-01T00:00:00.000Z",
                    "author": {"name": "user"},
                    "repo": {"name": repo_id, "type": "model"},
                    "events": [],
                    "changes": {"base": "refs/heads/main"},
                    "filesWithConflicts": [],
                },
            )
        self._error(404, f"fake hub: no route for {method} {self._entry.path}")

    def _info(self, repo: FakeRepo, sha: str) -> None:
        blobs = self._entry.query.get("blobs") == ["true"]
        siblings = [
            {"rfilename": p, **({"size": len(c), "blobId": git_oid(c)} if blobs else {})}
            for p, c in sorted(repo.commits[sha].items())
        ]
        self._json(
            200,
            {
                "_id": repo.repo_id,
                "id": repo.repo_id,
                "modelId": repo.repo_id,
                "sha": sha,
                "private": repo.private,
                "disabled": False,
                "gated": False,
                "downloads": 0,
                "likes": 0,
                "tags": [],
                "lastModified": "2026-01-01T00:00:00.000Z",
                "createdAt": "2026-01-01T00:00:00.000Z",
                "siblings": siblings,
            },
        )

    def _commit(self, repo: FakeRepo, revision: str, body: bytes) -> None:
        if self.hub.fail_commits > 0:
            self.hub.fail_commits -= 1
            return self._error(500, "Internal Error - the commit could not be stored, try again")
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        files = {}
        for line in lines:
            if line["key"] == "file":
                files[line["value"]["path"]] = base64.b64decode(line["value"]["content"])
            elif line["key"] != "header":
                return self._error(400, f"fake hub: unsupported commit operation {line['key']}")
        pr_url = None
        if self._entry.query.get("create_pr") == ["1"]:
            repo.discussions += 1
            revision = f"refs/pr/{repo.discussions}"
            repo.refs[revision] = repo.refs["main"]
            pr_url = f"{self.hub.url}/{repo.repo_id}/discussions/{repo.discussions}"
        parent = self._sha(repo, revision)
        message = lines[0]["value"]["summary"] if lines and lines[0]["key"] == "header" else ""
        repo.refs[revision] = sha = repo.commit(files, message, parent)
        self._json(
            200,
            {
                "commitUrl": f"{self.hub.url}/{repo.repo_id}/commit/{sha}",
                "commitOid": sha,
                "pullRequestUrl": pr_url,
            },
        )

    def _resolve(self, repo: FakeRepo, sha: str, path: str) -> None:
        content = repo.commits[sha].get(path)
        if content is None:
            return self._error(404, f"Entry not found: {path}", "EntryNotFound")
        headers = {
            "ETag": f'"{git_oid(content)}"',
            "X-Repo-Commit": sha,
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
        }
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range") or "")
        if match and self.command == "GET":
            start, stop = int(match[1]), min(int(match[2] or len(content) - 1), len(content) - 1)
            if start >= len(content):
                return self._send(416, b"", {"Content-Range": f"bytes */{len(content)}"})
            headers["Content-Range"] = f"bytes {start}-{stop}/{len(content)}"
            return self._send(206, content[start : stop + 1], headers)
        self._send(200, content, headers, content_length=len(content))


class _Stop(Exception):
    """An error answer has been sent; stop routing."""


# -- pytest wiring ----------------------------------------------------------------------------------


@pytest.fixture(name="hub")
def hub_fixture(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    """A running fake Hub that huggingface_hub, and so the workbench, talks to in this process.

    huggingface_hub reads HF_ENDPOINT, HF_HUB_CACHE and HF_HUB_OFFLINE at import, so the constants
    are set here exactly as those variables would set them; the token comes from HF_TOKEN, and the
    login cache is an empty temporary file path (the user's own login is never used).
    """
    from huggingface_hub import constants

    server = FakeHub(tokens=(TOKEN,)).start()
    home = tmp_path / "hf-home"
    monkeypatch.setattr(constants, "ENDPOINT", server.url)
    monkeypatch.setattr(
        constants, "HUGGINGFACE_CO_URL_TEMPLATE", server.url + "/{repo_id}/resolve/{revision}/{filename}"
    )
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(home / "stored_tokens"))
    monkeypatch.setattr(constants, "AGENT_HARNESSES_PATH", str(home / "agent_harnesses.json"))
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.delenv("HF_OIDC_RESOURCE", raising=False)
    yield server
    server.stop()


def subprocess_env(hub: FakeHub, tmp_path: Path, token: str | None = TOKEN) -> dict[str, str]:
    """Environment of a fresh ``workbench`` process pointed at the fake through the usual variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE_"))}
    env.update(
        HF_ENDPOINT=hub.url,
        HF_HOME=str(tmp_path / "hf-home"),
        HF_HUB_CACHE=str(tmp_path / "hf-cache"),
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        COLUMNS="1000",
    )
    if token is not None:
        env["HF_TOKEN"] = token
    return env


def sha256_tree(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder``, by path relative to it."""
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }
