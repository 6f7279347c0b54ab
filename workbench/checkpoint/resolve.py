"""Turning a model reference from a recipe into a local path.

A reference is a local file or folder, or a Hub id ``org/name[@revision]``. Hub ids go through
huggingface_hub's cache (see :mod:`workbench.checkpoint.remote`): a cached model opens from there; an
uncached one is first known from its safetensors headers alone (so validating a recipe downloads no
weights) and is downloaded (only weights, configs and tokenizer files) when its data or files are
first needed; offline, only the cache is used. ``BASE+ADAPTER`` (or a PEFT adapter folder alone) is
a base with LoRA adapters applied as it is read.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from workbench.errors import CheckpointError

if TYPE_CHECKING:
    from workbench.checkpoint.base import CheckpointReader


class Registry(Protocol):
    """What opening a reference needs of the plugin registry: its formats (the ground floor does not
    import the registry itself)."""

    def open_checkpoint(self, path: Path) -> CheckpointReader: ...


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")


def looks_like_hub_id(ref: str) -> bool:
    return bool(_HUB_ID.match(ref)) and not ref.startswith((".", "/", "~"))


def is_hub_reference(ref: str) -> bool:
    """A Hub id that is not also a local path (a local folder wins, as for transformers)."""
    return looks_like_hub_id(ref) and not Path(ref).expanduser().exists()


def resolve_model(ref: str) -> Path:
    """The local path of a model reference, downloading a Hub model into the cache if needed."""
    path = Path(ref).expanduser()
    if path.exists():
        return path
    if not looks_like_hub_id(ref):
        raise CheckpointError(f"model path {ref} does not exist.")
    from workbench.checkpoint.remote import HubRef, download

    hub = HubRef.parse(ref)
    return download(hub, hub.revision)


def ensure_local(readers: Iterable[CheckpointReader]) -> None:
    """Download every Hub input still known only from its headers, before a merge starts, so that a
    download failure comes first and every input has its files on disk (``files()`` needs them)."""
    for reader in readers:
        reader.files()


def split_adapters(ref: str) -> tuple[str, list[Path]]:
    """``BASE+ADAPTER[+ADAPTER…]`` → (base reference, adapter folders); a PEFT adapter folder alone
    stands for its ``base_model_name_or_path`` plus itself; anything else is a plain reference."""
    from workbench.checkpoint.lora_adapter import LoraAdapter, is_adapter

    path = Path(ref).expanduser()
    if is_adapter(path):
        base = LoraAdapter(path).base_reference
        if not base:
            raise CheckpointError(
                f"{ref} is a LoRA adapter without base_model_name_or_path; name its base as BASE+{ref}."
            )
        return base, [path]
    if path.exists() or "+" not in ref:
        return ref, []
    base, *adapters = ref.split("+")
    folders = [Path(a).expanduser() for a in adapters]
    for folder in folders:
        if not is_adapter(folder):
            raise CheckpointError(
                f"model '{ref}' is not a path, and as BASE+ADAPTER its part '{folder}' is not a PEFT "
                "adapter folder (no adapter_config.json)."
            )
    return base, folders


def open_reference(registry: Registry, ref: str) -> tuple[Path, CheckpointReader]:
    """The local path (the base's, for ``BASE+ADAPTER``) and a lazy reader of a model reference."""
    from workbench.checkpoint.adapted import AdaptedReader
    from workbench.checkpoint.lora_adapter import LoraAdapter

    base, adapters = split_adapters(ref)
    if is_hub_reference(base):
        from workbench.checkpoint.remote import open_hub

        path, reader = open_hub(base, registry.open_checkpoint)
    else:
        path = resolve_model(base)
        reader = registry.open_checkpoint(path)
    if not adapters:
        return path, reader
    try:
        return path, AdaptedReader(reader, [LoraAdapter(folder) for folder in adapters])
    except BaseException:
        reader.close()
        raise
