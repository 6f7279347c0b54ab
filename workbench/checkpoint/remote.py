"""Hub models as checkpoints: facts from the Hub's headers, tensor data from huggingface_hub's cache.

``org/name[@revision]`` is resolved once to a commit, so everything read afterwards (headers, config,
the download) is of that one commit even if the branch moves meanwhile. Then:

- **cached** (the snapshot of that commit holds complete safetensors weights): it is opened from the
  cache like a local folder, and nothing is downloaded;
- **not cached**: a ``RemoteSafetensorsReader`` answers names, shapes, dtypes and the config from
  ``config.json`` and the safetensors headers, read with HTTP range requests (a few KB per file),
  so ``workbench validate`` checks a recipe without downloading weights. The first request for tensor
  data or for the files (``read``, ``files``) downloads the snapshot (only ``HUB_PATTERNS``) into the
  cache and reads from there;
- **offline** (``HF_HUB_OFFLINE=1``): only the cache is used, and a model that is not there fails
  with a message that says so.
"""

from __future__ import annotations

import dataclasses
import json
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from workbench.checkpoint.base import CheckpointReader, TensorInfo
from workbench.checkpoint.folder import INDEX_NAME, SINGLE_NAME, find_safetensors
from workbench.checkpoint.hub_client import cache_dir, describe, endpoint, failures, offline
from workbench.checkpoint.safetensors_io import (
    MAX_HEADER_BYTES,
    loads_json,
    parse_header,
)
from workbench.errors import CheckpointError

if TYPE_CHECKING:
    import torch
    from huggingface_hub import ResolvedRevision

#: Files of a Hub model that a merge needs: weights, configs, tokenizer files.
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.txt", "*.jinja"]
#: The first range request of a safetensors file; real headers are a few KB to a few hundred KB.
FIRST_BLOCK = 1 << 16
_CONTENT_RANGE_TOTAL = re.compile(r"/(\d+)\s*$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
Opener = Callable[[Path], CheckpointReader]


@dataclass(frozen=True)
class HubRef:
    """``org/name[@revision]`` as a recipe names it."""

    repo_id: str
    revision: str | None

    @classmethod
    def parse(cls, ref: str) -> HubRef:
        repo_id, _, revision = ref.partition("@")
        return cls(repo_id, revision or None)

    def __str__(self) -> str:
        return f"{self.repo_id}@{self.revision}" if self.revision else self.repo_id


def hub_commit(path: Path) -> str | None:
    """The commit of a snapshot folder of the Hub cache (``.../snapshots/<sha>``), else None."""
    return path.name if path.parent.name == "snapshots" and _COMMIT.match(path.name) else None


def _has_weights(path: Path) -> bool:
    """Whether a cached snapshot holds complete safetensors weights (not just a config fetched by
    another tool): every shard its index names, or a safetensors file."""
    index, files = find_safetensors(path)
    if index is None:
        return bool(files)
    try:
        shards = set(json.loads(index.read_text())["weight_map"].values())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False
    return all((path / str(shard)).is_file() for shard in shards)


def _cached(hub: HubRef, revision: str | ResolvedRevision | None) -> Path | None:
    """The cached snapshot of ``revision`` if it is complete, without any network request."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        path = Path(
            snapshot_download(
                hub.repo_id, revision=revision, allow_patterns=HUB_PATTERNS, local_files_only=True
            )
        )
    except LocalEntryNotFoundError:
        return None
    return path if _has_weights(path) else None


def _not_cached_offline(hub: HubRef) -> CheckpointError:
    return CheckpointError(
        f"model '{hub}' is not in the Hugging Face cache ({cache_dir()}) and offline mode is on (HF_HUB_OFFLINE=1),"
        " so it cannot be downloaded: run once with the Hub reachable to cache it, or unset HF_HUB_OFFLINE."
    )


def _resolve(hub: HubRef) -> ResolvedRevision:
    """The commit ``hub`` names now (one API request; recorded in the cache's refs for offline use)."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RevisionResolutionError

    try:
        return HfApi(endpoint=endpoint()).resolve_revision(hub.repo_id, revision=hub.revision)
    except RevisionResolutionError as exc:
        raise CheckpointError(
            f"model '{hub}' is not in the Hugging Face cache ({cache_dir()}) and the Hub at {endpoint()} "
            f"could not be reached ({type(exc.__cause__).__name__ if exc.__cause__ else 'no answer'}); "
            "check the connection or HF_ENDPOINT."
        ) from None
    except failures() as exc:
        raise CheckpointError(f"model {describe(exc, repr(str(hub)))}") from None


def download(hub: HubRef, revision: str | ResolvedRevision | None) -> Path:
    """Download the files a merge needs into the cache (only those missing) and return the snapshot."""
    from huggingface_hub import snapshot_download

    if offline():
        path = _cached(hub, revision)
        if path is None:
            raise _not_cached_offline(hub)
        return path
    try:
        path = Path(
            snapshot_download(
                hub.repo_id, revision=revision, allow_patterns=HUB_PATTERNS, endpoint=endpoint()
            )
        )
    except failures() as exc:
        raise CheckpointError(f"downloading model {describe(exc, repr(str(hub)))}") from None
    if not _has_weights(path):
        raise CheckpointError(
            f"model '{hub}' has no safetensors weights on the Hub (only safetensors models can be merged from the Hub)."
        )
    return path


def open_hub(ref: str, open_local: Opener) -> tuple[Path, CheckpointReader]:
    """(snapshot path, lazy reader) of a Hub model: from the cache when it is there, else from headers."""
    hub = HubRef.parse(ref)
    if offline():
        path = download(hub, hub.revision)  # offline: the cache or a clear error, never the network
        return path, open_local(path)
    revision = _resolve(hub)
    cached = _cached(hub, revision)
    if cached is not None:
        return cached, open_local(cached)
    reader = RemoteSafetensorsReader(hub, revision, open_local)
    return reader.path, reader


# --------------------------------------------------------------------------------------------------
# Headers over HTTP
# --------------------------------------------------------------------------------------------------


class _RangeFile:
    """One file of a Hub repo, read by byte ranges; the first block is kept (it holds most headers)."""

    def __init__(self, url: str, headers: dict[str, str], label: str) -> None:
        self.url, self.headers, self.label = url, headers, label
        self.first, total = self._get(0, FIRST_BLOCK)
        if total is None:
            raise CheckpointError(f"{label}: the Hub did not say how large the file is (no Content-Range).")
        self.size = total

    def read_at(self, offset: int, n: int) -> bytes:
        if offset + n <= len(self.first):
            return self.first[offset : offset + n]
        return self._get(offset, n)[0]

    def _get(self, offset: int, n: int) -> tuple[bytes, int | None]:
        """Bytes ``offset .. offset+n`` and the file's total size. The response is streamed and
        dropped after what was asked for, so a server that ignores ``Range`` still costs no download."""
        from huggingface_hub.utils import get_session, hf_raise_for_status

        headers = {**self.headers, "Range": f"bytes={offset}-{offset + n - 1}", "Accept-Encoding": "identity"}
        with get_session().stream("GET", self.url, headers=headers) as response:
            if response.status_code == 416:  # the range starts past the end: an empty or short file
                match = _CONTENT_RANGE_TOTAL.search(response.headers.get("Content-Range", ""))
                return b"", int(match[1]) if match else None
            if response.status_code >= 400:
                response.read()
                hf_raise_for_status(response)
            skip = offset if response.status_code == 200 else 0  # Range ignored: the body starts at byte 0
            data = bytearray()
            for chunk in response.iter_bytes():
                data += chunk
                if len(data) >= skip + n:
                    break
            if response.status_code == 206:
                match = _CONTENT_RANGE_TOTAL.search(response.headers.get("Content-Range", ""))
                total = int(match[1]) if match else None
            else:
                total = (
                    int(response.headers["Content-Length"]) if "Content-Length" in response.headers else None
                )
        return bytes(data[skip : skip + n]), total


class RemoteSafetensorsReader(CheckpointReader):
    """A Hub model known from its safetensors headers and config; the data is downloaded on first need.

    Tensor facts match what the local reader gives once the snapshot is downloaded (same order, same
    ``file`` paths in the cache), so a plan made from headers is the plan the merge runs.
    """

    def __init__(self, hub: HubRef, revision: ResolvedRevision, open_local: Opener) -> None:
        self.hub = hub
        self.revision = revision
        self.sha = revision.resolved
        self._open_local = open_local
        self._local: CheckpointReader | None = None
        self._lock = threading.Lock()
        from huggingface_hub import HfApi
        from huggingface_hub.file_download import repo_folder_name

        self.path = (
            cache_dir() / repo_folder_name(repo_id=hub.repo_id, repo_type="model") / "snapshots" / self.sha
        )
        try:
            info = HfApi(endpoint=endpoint()).model_info(hub.repo_id, revision=self.sha, files_metadata=True)
        except failures() as exc:
            raise CheckpointError(f"model {describe(exc, repr(str(hub)))}") from None
        self._sizes = {s.rfilename: s.size for s in info.siblings or []}
        self._config = self._json("config.json") if "config.json" in self._sizes else None
        self._tensors = self._read_headers()

    def _url(self, filename: str) -> str:
        from urllib.parse import quote

        return f"{endpoint()}/{self.hub.repo_id}/resolve/{self.sha}/{quote(filename)}"

    def _headers(self) -> dict[str, str]:
        from huggingface_hub.utils import build_hf_headers

        return build_hf_headers(library_name="merge-workbench")

    def _label(self, filename: str) -> Path:
        return Path(f"{self.hub}/{filename}")

    def _json(self, filename: str, strict: bool = False) -> Any:
        """A small JSON file of the repo (config, index), parsed as the local readers parse it."""
        from huggingface_hub.utils import get_session, hf_raise_for_status

        size = self._sizes.get(filename)
        if size is not None and size > MAX_HEADER_BYTES:
            raise CheckpointError(
                f"{self._label(filename)} is {size} bytes, more than any config or index needs ({MAX_HEADER_BYTES})."
            )
        try:
            response = get_session().get(self._url(filename), headers=self._headers())
            hf_raise_for_status(response)
        except failures() as exc:
            raise CheckpointError(
                f"reading {filename} of model {describe(exc, repr(str(self.hub)))}"
            ) from None
        try:
            return loads_json(response.content) if strict else json.loads(response.content)
        except ValueError as exc:
            raise CheckpointError(f"{self._label(filename)} is not valid JSON ({exc}).") from None

    def _header(self, filename: str) -> dict[str, tuple[TensorInfo, int]]:
        label = self._label(filename)
        try:
            remote = _RangeFile(self._url(filename), self._headers(), str(label))
        except failures() as exc:
            raise CheckpointError(
                f"reading the header of {filename} of model {describe(exc, repr(str(self.hub)))}"
            ) from None
        tensors, _, _ = parse_header(label, remote.size, remote.read_at)
        file = self.path / filename
        return {
            name: (dataclasses.replace(info, file=file), begin) for name, (info, begin) in tensors.items()
        }

    def _read_headers(self) -> dict[str, TensorInfo]:
        """Tensor facts in the local reader's order: by index (shard, offset), else file by file."""
        if INDEX_NAME in self._sizes:
            index = self._json(INDEX_NAME, strict=True)
            weight_map = index.get("weight_map") if isinstance(index, dict) else None
            if not isinstance(weight_map, dict):
                raise CheckpointError(
                    f"{self._label(INDEX_NAME)} is not a valid safetensors index (no weight_map object)."
                )
            by_file: dict[str, set[str]] = {}
            for name, file in weight_map.items():
                by_file.setdefault(str(file), set()).add(name)
            placed: dict[str, tuple[TensorInfo, int]] = {}
            for file, names in by_file.items():
                if file not in self._sizes:
                    raise CheckpointError(
                        f"{self._label(INDEX_NAME)} lists shard '{file}', which model '{self.hub}' does not have."
                    )
                header = self._header(file)
                missing = sorted(names - set(header))
                if missing:
                    raise CheckpointError(
                        f"{self._label(INDEX_NAME)} places tensor '{missing[0]}' in {file}, but that shard "
                        f"does not hold it ({len(missing)} such tensor(s))."
                    )
                placed.update((name, header[name]) for name in names)
            ordered = sorted(placed.items(), key=lambda kv: (str(kv[1][0].file), kv[1][1]))
            return {name: info for name, (info, _) in ordered}
        files = (
            [SINGLE_NAME]
            if SINGLE_NAME in self._sizes
            else sorted(
                f
                for f in self._sizes
                if f.endswith(".safetensors") and "/" not in f and not f.startswith("adapter_")
            )
        )
        if not files:
            have = ", ".join(sorted(self._sizes)) or "nothing"
            raise CheckpointError(
                f"model '{self.hub}' has no safetensors weights on the Hub (it has: {have}); only "
                "safetensors models can be merged from the Hub."
            )
        tensors: dict[str, TensorInfo] = {}
        for file in files:
            for name, (info, _) in self._header(file).items():
                if name in tensors:
                    raise CheckpointError(
                        f"model '{self.hub}': tensor '{name}' is stored twice ({tensors[name].file.name} and {file})."
                    )
                tensors[name] = info
        return tensors

    # -- CheckpointReader -------------------------------------------------------------------------

    def tensor_names(self) -> list[str]:
        return list(self._tensors)

    def __contains__(self, name: str) -> bool:
        return name in self._tensors

    def info(self, name: str) -> TensorInfo:
        try:
            return self._tensors[name]
        except KeyError:
            raise CheckpointError(f"tensor '{name}' is missing from model '{self.hub}'.") from None

    def config(self) -> dict[str, Any] | None:
        return self._config if isinstance(self._config, dict) else None

    @property
    def downloaded(self) -> bool:
        return self._local is not None

    def local(self) -> CheckpointReader:
        """The reader of the downloaded snapshot, downloading it (once, thread-safely) if needed."""
        with self._lock:
            if self._local is None:
                path = download(self.hub, self.revision)
                if path.resolve() != self.path.resolve():
                    raise CheckpointError(
                        f"model '{self.hub}': the download landed in {path}, not in the planned snapshot {self.path}."
                    )
                self._local = self._open_local(path)
            return self._local

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        self.info(name)
        return self.local().read(name, rows)

    def files(self) -> list[Path]:
        return self.local().files()

    def close(self) -> None:
        with self._lock:
            if self._local is not None:
                self._local.close()


def is_downloaded(reader: CheckpointReader) -> bool:
    """Whether a reader's files are on disk (a Hub model known only from its headers is not)."""
    return not isinstance(reader, RemoteSafetensorsReader) or reader.downloaded
