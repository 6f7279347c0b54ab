"""Building an MoE folder from a mergekit-moe config: open, check, route, stream, publish.

Everything that can be checked from headers and configs is checked before the routers are computed
(the one step that may load a model), and the routers before the output is started. The output is
built in ``<out>.partial/`` under the output's lock (:func:`workbench.checkpoint.output_folder.building`)
and moved into place only when whole, so a failure at any point leaves nothing at ``--out``.
Tensors are copied one at a time from the memory-mapped inputs into streaming safetensors writers:
memory holds one input tensor (plus the base model while hidden-state gates are computed).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from workbench.checkpoint.dtypes import FLOAT_CODES, code_from_name, to_torch
from workbench.checkpoint.folder import plan_shards, write_index
from workbench.checkpoint.output_folder import DISK_FULL, PARTIAL_MARKER, building, check_free_space
from workbench.checkpoint.resolve import Registry, ensure_local, open_reference
from workbench.checkpoint.safetensors_io import StreamingFileWriter
from workbench.checkpoint.sidecars import copy_config, copy_tokenizer, model_folder
from workbench.engine.manifest import MANIFEST_FILE, Manifest
from workbench.engine.progress import ProgressCallback, ProgressEvent
from workbench.errors import CheckpointError, OutputError, RecipeError
from workbench.moe.architectures import Architecture, output_config, select_architecture
from workbench.moe.card import moe_card
from workbench.moe.config import Expert, LoadedConfig, check_config
from workbench.moe.layout import Input, Layout, materialize, plan_layout
from workbench.moe.routers import compute_gates, degenerate_layers
from workbench.recipe.sources import format_path

if TYPE_CHECKING:
    import torch

#: mergekit-moe's config file in its output (written here too, verbatim).
CONFIG_FILE = "mergekit_moe_config.yml"
DEFAULT_SHARD_SIZE = 5 * 10**9


@dataclass
class MoEResult:
    out_dir: Path
    architecture: str
    experts: int
    tensors: int
    bytes_written: int
    seconds: float
    warnings: list[str] = field(default_factory=list)


def _open_inputs(
    loaded: LoadedConfig, registry: Registry
) -> tuple[Input, list[tuple[Input, Expert]], list[tuple[Input, Expert]], list[Input]]:
    """(base, routed experts, shared experts, every distinct input): each reference is opened once."""
    config = loaded.config
    opened: dict[str, Input] = {}

    def open_one(ref: str, *path: Any) -> Input:
        if ref not in opened:
            try:
                folder, reader = open_reference(registry, ref)
            except CheckpointError as exc:
                raise CheckpointError(f"{loaded.where(*path)}: {exc}") from None
            opened[ref] = Input(ref, format_path(path), folder, reader, path)
        return opened[ref]

    try:
        base = open_one(config.base_model, "base_model")
        experts = [
            (open_one(e.source_model, "experts", i, "source_model"), e) for i, e in enumerate(config.experts)
        ]
        shared = [
            (open_one(e.source_model, "shared_experts", i, "source_model"), e)
            for i, e in enumerate(config.shared_experts or [])
        ]
    except BaseException:
        for model in opened.values():
            model.reader.close()
        raise
    return base, experts, shared, list(opened.values())


def _model_type(loaded: LoadedConfig, model: Input, config: dict[str, Any] | None) -> str:
    if config is None or not isinstance(config.get("model_type"), str):
        raise CheckpointError(
            f"{loaded.where(*model.field)}: {model.ref} has no config.json with a model_type; the output "
            "architecture is chosen from the inputs' model types."
        )
    return str(config["model_type"])


def _output_dtype(loaded: LoadedConfig, base_config: dict[str, Any]) -> str | None:
    """The config's dtype, else the base config's torch_dtype (mergekit's ``select_dtype``), else None
    (each tensor keeps its own)."""
    if loaded.config.dtype_code is not None:
        return loaded.config.dtype_code
    for key in ("torch_dtype", "dtype"):
        value = base_config.get(key)
        if isinstance(value, str):
            try:
                code = code_from_name(value.removeprefix("torch."))
            except ValueError:
                continue
            if code in FLOAT_CODES:
                return code
    return None


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


class _Progress:
    """Counts written tensors and read bytes into ``ProgressEvent``s (the events ``workbench run`` emits)."""

    def __init__(self, layout: Layout, callback: ProgressCallback | None) -> None:
        self.callback = callback
        self.total = len(layout.tensors)
        self.total_bytes = sum(p.nbytes_read for t in layout.tensors for p in t.pieces)
        self.done = 0
        self.bytes_read = 0

    def emit(self, kind: Any, tensor: str | None = None, note: str | None = None) -> None:
        if self.callback is not None:
            self.callback(
                ProgressEvent(kind, self.done, self.total, self.bytes_read, self.total_bytes, tensor, note)
            )


def _write_tensors(
    partial: Path,
    layout: Layout,
    gates: "torch.Tensor",
    shard_size: int,
    manifest: Manifest,
    progress: _Progress,
) -> None:
    files = plan_shards([t.spec for t in layout.tensors], shard_size)
    planned = {t.spec.name: t for t in layout.tensors}
    for file in files:
        path = partial / file.name
        writer = StreamingFileWriter(path, file.tensors, {"format": "pt"})
        try:
            for spec in file.tensors:
                dtype = to_torch(spec.dtype)
                for piece in planned[spec.name].pieces:
                    writer.write(spec.name, materialize(piece, gates, dtype))
                    progress.bytes_read += piece.nbytes_read
                progress.done += 1
                progress.emit("tensor", tensor=spec.name)
        finally:
            writer.close()
        if not writer.complete:  # pragma: no cover - the plan and the pieces agree by construction
            raise RuntimeError(f"{path}: written incompletely")
        manifest.record(path, writer.sha256)
    write_index(partial, files)


def build_moe(
    loaded: LoadedConfig,
    registry: Registry,
    out_dir: Path,
    *,
    overwrite: bool = False,
    device: str = "cpu",
    router_dtype: str = "bfloat16",
    seed: int = 0,
    per_expert: bool = False,
    shard_size: int = DEFAULT_SHARD_SIZE,
    allow_all_same: bool = False,
    on_progress: ProgressCallback | None = None,
    warn: Callable[[str], None] = lambda message: None,
) -> MoEResult:
    """Build the MoE that ``loaded`` describes into ``out_dir`` (see the module docstring).

    ``per_expert`` writes one tensor per expert and projection (the classic layout) instead of the
    fused expert tensors of transformers 5; ``seed`` fixes random gates and expert noise.
    """
    from workbench.engine.plan import InputModel, check_output_path
    from workbench.engine.run import resolve_device

    config = loaded.config
    warnings = check_config(loaded, allow_all_same)
    if router_dtype not in ("bfloat16", "float32", "float16"):
        raise RecipeError(f"router dtype '{router_dtype}' is not one of bfloat16, float32, float16.")
    device = resolve_device(device)
    base, experts, shared, inputs = _open_inputs(loaded, registry)
    try:
        check_output_path(out_dir, [InputModel(m.ref, m.label, m.path, m.reader) for m in inputs], overwrite)
        base_config = base.reader.config()
        types = [_model_type(loaded, m, m.reader.config()) for m in [base, *(m for m, _ in experts + shared)]]
        architecture = select_architecture(loaded, types)
        assert base_config is not None
        out_dtype = _output_dtype(loaded, base_config)
        layout = plan_layout(
            architecture,
            base,
            experts,
            shared,
            out_dtype=out_dtype,
            per_expert=per_expert,
            seed=seed,
            tied_embeddings=bool(base_config.get("tie_word_embeddings", False)),
        )
        warnings += layout.warnings
        for message in warnings:
            warn(message)
        ensure_local(m.reader for m in inputs)
        folder = model_folder(base.path if base.path.exists() else base.reader.files()[0])
        progress = _Progress(layout, on_progress)
        start = time.perf_counter()
        gates = compute_gates(
            loaded,
            base,
            folder,
            layers=layout.layers,
            hidden=layout.hidden_size,
            vocab=layout.vocab_size,
            device=device,
            router_dtype=router_dtype,
            seed=seed,
            note=lambda text: progress.emit("note", note=text),
        )
        degenerate = degenerate_layers(gates)
        if degenerate:
            message = (
                f"the routers of layer(s) {', '.join(map(str, degenerate))} are nearly degenerate (condition "
                "number above 5): the prompts of some experts are too similar, and those experts will be "
                "under-used."
            )
            warnings.append(message)
            warn(message)
        check_free_space(out_dir, layout.nbytes)
        out_config = output_config(
            architecture,
            base_config,
            experts=len(experts),
            experts_per_token=config.experts_per_token,
            hidden_size=layout.hidden_size,
            intermediate_size=layout.intermediate_size,
            layers=layout.layers,
            vocab_size=layout.vocab_size,
            out_dtype=out_dtype,
        )
        identity = _identity(loaded, inputs, device, router_dtype, seed, per_expert)
        try:
            with building(out_dir, overwrite) as partial:
                manifest = Manifest(partial, identity)
                progress.emit("start")
                try:
                    _write_tensors(partial, layout, gates, shard_size, manifest, progress)
                finally:
                    progress.emit("finish")
                _finish_folder(
                    partial, loaded, architecture, folder, out_config, out_dir.name, warn, warnings
                )
                for path in sorted(partial.rglob("*")):
                    name = path.relative_to(partial).as_posix()
                    if (
                        path.is_file()
                        and path.name not in (PARTIAL_MARKER, MANIFEST_FILE)
                        and name not in manifest.files
                    ):
                        manifest.record(path)
                manifest.complete = True
                manifest.save()
        except OSError as exc:
            if exc.errno not in DISK_FULL:
                raise
            raise OutputError(
                f"the disk ran out of space writing {exc.filename or out_dir} ({exc.strerror}); nothing was "
                f"written at {out_dir}. Free some space or choose another --out."
            ) from exc
        seconds = time.perf_counter() - start
    finally:
        for model in inputs:
            model.reader.close()
    return MoEResult(
        out_dir,
        architecture.name,
        len(experts),
        len(layout.tensors),
        layout.nbytes,
        seconds,
        warnings,
    )


def _identity(
    loaded: LoadedConfig, inputs: list[Input], device: str, router_dtype: str, seed: int, per_expert: bool
) -> dict[str, str]:
    """What the output depends on, for the manifest (inputs by their files' sizes and times)."""
    from workbench._version import __version__

    identity = {
        "moe config": _digest(loaded.text),
        "environment": _digest(
            {
                "workbench": __version__,
                "device": device,
                "router_dtype": router_dtype,
                "seed": seed,
                "per_expert": per_expert,
            }
        ),
    }
    for model in inputs:
        stats = [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in model.reader.files()]
        identity[f"input {model.label} ({model.ref})"] = _digest(stats)
    return identity


def _finish_folder(
    partial: Path,
    loaded: LoadedConfig,
    architecture: Architecture,
    base_folder: Path,
    out_config: dict[str, Any],
    title: str,
    warn: Callable[[str], None],
    warnings: list[str],
) -> None:
    """config.json, the base's generation config and tokenizer, the config verbatim, the card."""
    (partial / "config.json").write_text(json.dumps(out_config, indent=2) + "\n")
    copy_config(base_folder, partial, None, None)  # generation_config.json, if the base has one
    if not copy_tokenizer(base_folder, partial):
        message = f"the base model {base_folder} has no tokenizer files; the output has none either."
        warnings.append(message)
        warn(message)
    (partial / CONFIG_FILE).write_text(loaded.text)
    (partial / "README.md").write_text(moe_card(loaded, architecture, title))
