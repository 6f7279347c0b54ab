"""Turning a model reference from a recipe into a local path.

A reference is a local file or folder, or a Hub id ``org/name[@revision]``. Hub ids are fetched
(only weights, configs and tokenizer files) through huggingface_hub's cache, which also serves them
offline once downloaded. ``BASE+ADAPTER`` (or a PEFT adapter folder alone) is a base with LoRA
adapters applied as it is read.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

from workbench.errors import CheckpointError

if TYPE_CHECKING:
    from workbench.checkpoint.base import CheckpointReader
    from workbench.registry import Registry

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.txt", "*.jinja"]


def looks_like_hub_id(ref: str) -> bool:
    return bool(_HUB_ID.match(ref)) and not ref.startswith((".", "/", "~"))


def resolve_model(ref: str) -> Path:
    """The local path of a model reference, downloading a Hub model into the cache if needed."""
    path = Path(ref).expanduser()
    if path.exists():
        return path
    if not looks_like_hub_id(ref):
        raise CheckpointError(f"model path {ref} does not exist.")
    repo_id, _, revision = ref.partition("@")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, revision=revision or None, allow_patterns=HUB_PATTERNS))
    except Exception as exc:
        raise CheckpointError(
            f"model '{ref}' is not a local path and could not be fetched from the Hugging Face Hub"
            f" ({type(exc).__name__}: {exc})."
        ) from exc


def split_adapters(ref: str) -> tuple[str, list[Path]]:
    """``BASE+ADAPTER[+ADAPTER…]`` → (base reference, adapter folders); a PEFT adapter folder alone
    stands for its ``base_model_name_or_path`` plus itself; anything else is a plain reference."""
    from workbench.lora.adapter import LoraAdapter, is_adapter

    path = Path(ref).expanduser()
    if is_adapter(path):
        base = LoraAdapter(path).base_reference
        if not base:
            raise CheckpointError(f"{ref} is a LoRA adapter without base_model_name_or_path; name its base as BASE+{ref}.")
        return base, [path]
    if path.exists() or "+" not in ref:
        return ref, []
    base, *adapters = ref.split("+")
    folders = [Path(a).expanduser() for a in adapters]
    for folder in folders:
        if not is_adapter(folder):
            raise CheckpointError(f"model '{ref}' is not a path, and as BASE+ADAPTER its part '{folder}' is not a PEFT adapter folder (no adapter_config.json).")
    return base, folders


def open_reference(registry: "Registry", ref: str) -> tuple[Path, "CheckpointReader"]:
    """The local path (the base's, for ``BASE+ADAPTER``) and a lazy reader of a model reference."""
    from workbench.checkpoint.adapted import AdaptedReader
    from workbench.lora.adapter import LoraAdapter

    base, adapters = split_adapters(ref)
    path = resolve_model(base)
    reader = registry.open_checkpoint(path)
    if not adapters:
        return path, reader
    try:
        return path, AdaptedReader(reader, [LoraAdapter(folder) for folder in adapters])
    except BaseException:
        reader.close()
        raise
