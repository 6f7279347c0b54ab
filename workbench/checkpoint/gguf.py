"""GGUF checkpoints (llama.cpp's format) as inputs, for Llama-family models.

The file is parsed by the ``gguf`` package's memory-mapped ``GGUFReader``; a tensor is dequantised to
torch only when it is read (and only the rows asked for), so memory stays bounded by one tensor.
Names are mapped to the Hugging Face layout, and a ``config.json`` is synthesised from the metadata.

The header is checked first (:func:`workbench.checkpoint.gguf_header.check_header`).

llama.cpp's converter interleaves the rows of each attention head of q_proj and k_proj (its rotary
embedding rotates adjacent pairs, Hugging Face's rotates the two halves of a head); reading undoes it.
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from workbench.checkpoint.base import CheckpointReader, TensorInfo
from workbench.checkpoint.dtypes import to_torch
from workbench.checkpoint.gguf_header import check_header
from workbench.checkpoint.sidecars import tokenizer_from_gguf
from workbench.errors import CheckpointError, shown

if TYPE_CHECKING:
    import numpy as np
    import torch
    from gguf import GGMLQuantizationType, GGUFReader

#: Tensor types read as they are stored; every other type is dequantised to F32.
_NATIVE = {
    "F32": "F32",
    "F16": "F16",
    "BF16": "BF16",
    "F64": "F64",
    "I8": "I8",
    "I16": "I16",
    "I32": "I32",
    "I64": "I64",
}


def find_gguf(path: Path) -> list[Path]:
    """The ``.gguf`` file itself, or the ``.gguf`` files of a folder (sorted)."""
    if path.is_file():
        return [path] if path.suffix.lower() == ".gguf" else []
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.suffix.lower() == ".gguf" and p.is_file())
    return []


# ------------------------------------------------------------------------------------------------
# Llama: names, shapes and config
# ------------------------------------------------------------------------------------------------

_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BLOCK = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_ATTENTION, _MLP, _NORMS = (
    ("attn_q", "attn_k", "attn_v", "attn_output"),
    ("ffn_gate", "ffn_up", "ffn_down"),
    ("attn_norm", "ffn_norm"),
)
_NAME = re.compile(r"(?:blk\.(\d+)\.)?(\w+)\.(weight|bias)")


def hf_name(gguf_name: str) -> str | None:
    """The Hugging Face (Llama) name of a GGUF tensor name, or None if it has none."""
    m = _NAME.fullmatch(gguf_name)
    if not m:
        return None
    layer, module, kind = m.groups()
    if layer is None:
        return f"{_TOP[module]}.{kind}" if module in _TOP else None
    return f"model.layers.{int(layer)}.{_BLOCK[module]}.{kind}" if module in _BLOCK else None


class _Metadata:
    """Typed access to the metadata of a parsed file; every failure names the file and the key."""

    def __init__(self, reader: GGUFReader, path: Path, prefix: str = "") -> None:
        self.reader, self.path, self.prefix = reader, path, prefix

    def get(self, key: str) -> Any:
        field = self.reader.get_field(self.prefix + key)
        if field is None:
            return None
        try:
            return field.contents()
        except MemoryError:
            raise
        except Exception as exc:  # noqa: BLE001 - the gguf package: UnicodeDecodeError, IndexError, ... on bad bytes
            raise CheckpointError(
                f"{self.path}: metadata '{self.prefix}{key}' is unreadable ({type(exc).__name__}: {exc})."
            ) from None

    def _typed(self, key: str, kinds: tuple[type, ...], label: str, default: Any) -> Any:
        value = self.get(key)
        if value is None:
            if default is None:
                raise CheckpointError(f"{self.path}: metadata '{self.prefix}{key}' is missing.")
            return default
        if isinstance(value, bool) or not isinstance(value, kinds):
            raise CheckpointError(f"{self.path}: metadata '{self.prefix}{key}' is {value!r}, not {label}.")
        return value

    def integer(self, key: str, default: int | None = None, low: int = 1) -> int:
        value = self._typed(key, (int,), "an integer", default)
        if value < low:
            raise CheckpointError(
                f"{self.path}: metadata '{self.prefix}{key}' is {value}; it must be at least {low}."
            )
        return int(value)

    def number(self, key: str, default: float | None = None) -> float:
        value = float(self._typed(key, (int, float), "a number", default))
        if not math.isfinite(value) or value <= 0:
            raise CheckpointError(
                f"{self.path}: metadata '{self.prefix}{key}' is {value}; it must be a positive number."
            )
        return value

    def text(self, key: str, default: str | None = None) -> str:
        return str(self._typed(key, (str,), "a string", default))


def _llama_config(meta: _Metadata, shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    """config.json of a Hugging Face ``LlamaForCausalLM`` from the file's ``llama.*`` metadata, checked
    against the tensors present (every expected tensor, nothing else, every shape)."""
    path = meta.path
    if meta.integer("expert_count", 0, low=0) > 0:
        raise CheckpointError(f"{path}: a mixture-of-experts GGUF (llama.expert_count > 0) is not supported.")
    if "rope_freqs.weight" in shapes:
        raise CheckpointError(
            f"{path}: tensor 'rope_freqs.weight' (Llama 3.1-style rope scaling) is not supported."
        )
    layers = meta.integer("block_count")
    if layers > len(shapes):
        raise CheckpointError(
            f"{path}: llama.block_count is {layers}, but the file has only {len(shapes)} tensors."
        )
    hidden, ffn, heads = (
        meta.integer("embedding_length"),
        meta.integer("feed_forward_length"),
        meta.integer("attention.head_count"),
    )
    kv_heads = meta.integer("attention.head_count_kv", heads)
    head_dim = meta.integer("attention.key_length", max(1, hidden // heads))
    if heads % kv_heads or head_dim % 2 or meta.integer("attention.value_length", head_dim) != head_dim:
        raise CheckpointError(
            f"{path}: {heads} attention heads, {kv_heads} key/value heads, head size {head_dim}: not a "
            "Llama attention layout."
        )
    if meta.integer("rope.dimension_count", head_dim) != head_dim:
        raise CheckpointError(
            f"{path}: llama.rope.dimension_count differs from the head size {head_dim} (partial rotary is not Llama)."
        )
    embed = shapes.get("token_embd.weight")
    if embed is None or len(embed) != 2:
        raise CheckpointError(f"{path}: tensor 'token_embd.weight' is missing or not a matrix.")
    vocab = embed[1]
    if meta.integer("vocab_size", vocab) != vocab:
        raise CheckpointError(
            f"{path}: llama.vocab_size says {meta.integer('vocab_size')}, tensor 'token_embd.weight' has {vocab} rows."
        )
    q, kv = heads * head_dim, kv_heads * head_dim
    rows = {
        "attn_q": q,
        "attn_k": kv,
        "attn_v": kv,
        "attn_output": hidden,
        "ffn_gate": ffn,
        "ffn_up": ffn,
        "ffn_down": hidden,
    }
    cols = {
        "attn_q": hidden,
        "attn_k": hidden,
        "attn_v": hidden,
        "attn_output": q,
        "ffn_gate": hidden,
        "ffn_up": hidden,
        "ffn_down": ffn,
    }
    attention_bias, mlp_bias = "blk.0.attn_q.bias" in shapes, "blk.0.ffn_up.bias" in shapes
    expected = {"token_embd.weight": (hidden, vocab), "output_norm.weight": (hidden,)}
    tied = "output.weight" not in shapes
    if not tied:
        expected["output.weight"] = (hidden, vocab)
    for i in range(layers):
        for module in _ATTENTION + _MLP:
            expected[f"blk.{i}.{module}.weight"] = (cols[module], rows[module])  # GGUF order
            if attention_bias if module in _ATTENTION else mlp_bias:
                expected[f"blk.{i}.{module}.bias"] = (rows[module],)
        for module in _NORMS:
            expected[f"blk.{i}.{module}.weight"] = (hidden,)
    for name, shape in shapes.items():
        if name not in expected:
            raise CheckpointError(
                f"{path}: tensor {shown(name)} has no place in a Llama model of {layers} layers"
                + ("" if hf_name(name) else " (no Hugging Face name)")
                + "."
            )
        if shape != expected[name]:
            raise CheckpointError(
                f"{path}: tensor {shown(name)} has shape {list(shape)}; the metadata implies "
                f"{list(expected[name])} (GGUF order)."
            )
    missing = [name for name in expected if name not in shapes]
    if missing:
        raise CheckpointError(f"{path}: tensor '{missing[0]}' is missing ({len(missing)} tensor(s) missing).")
    config: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": ffn,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": meta.integer("context_length", 2048),
        "rms_norm_eps": meta.number("attention.layer_norm_rms_epsilon"),
        "rope_theta": meta.number("rope.freq_base", 10000.0),
        "attention_bias": attention_bias,
        "mlp_bias": mlp_bias,
        "tie_word_embeddings": tied,
        "torch_dtype": "float32",
    }
    scaling = meta.text("rope.scaling.type", "none")
    if scaling == "linear":
        config["rope_scaling"] = {"rope_type": "linear", "factor": meta.number("rope.scaling.factor")}
    elif scaling != "none":
        raise CheckpointError(f"{path}: rope scaling {shown(scaling)} is not supported (only linear).")
    tokenizer = _Metadata(meta.reader, path, "tokenizer.ggml.")
    for key, ours in (
        ("bos_token_id", "bos_token_id"),
        ("eos_token_id", "eos_token_id"),
        ("padding_token_id", "pad_token_id"),
    ):
        if tokenizer.get(key) is not None:
            config[ours] = tokenizer.integer(key, low=0)
    return config


# ------------------------------------------------------------------------------------------------
# The reader
# ------------------------------------------------------------------------------------------------


@cache
def _dequantisable() -> frozenset[int]:
    """GGML types the installed gguf package can dequantise (probed on one zero block each, so a
    newer gguf with more types is used as it is)."""
    import numpy as np
    from gguf.constants import GGML_QUANT_SIZES
    from gguf.quants import dequantize

    ok = set()
    for qtype, (_, type_size) in GGML_QUANT_SIZES.items():
        try:
            dequantize(np.zeros((1, type_size), np.uint8), qtype)
            ok.add(int(qtype))
        except NotImplementedError:
            pass
    return frozenset(ok)


def unpermuted_rows(n_rows: int, heads: int) -> np.ndarray:
    """For each Hugging Face row of q_proj/k_proj, the GGUF row it is stored in.

    llama.cpp stores row ``h*d + 2i + j`` of head ``h`` where Hugging Face has ``h*d + j*d/2 + i``
    (``d`` the head size, ``i < d/2``, ``j`` in {0, 1})."""
    import numpy as np

    d = n_rows // heads
    head, within = np.divmod(np.arange(n_rows), d)
    j, i = np.divmod(within, d // 2)
    return head * d + 2 * i + j


@dataclass(frozen=True)
class _Tensor:
    gguf_name: str
    qtype: GGMLQuantizationType
    dtype: str
    shape: tuple[int, ...]  # Hugging Face order
    data: np.ndarray  # memory-mapped; a quantised tensor's last axis is bytes
    heads: int | None  # rotary heads whose rows llama.cpp interleaved

    @property
    def quantised(self) -> bool:
        return self.qtype.name not in _NATIVE


def _parse(file: Path) -> GGUFReader:
    from gguf import GGUFReader

    try:
        return GGUFReader(file, "r")
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - the gguf package raises whatever numpy raises on bad input
        raise CheckpointError(f"{file} is not a readable GGUF file ({type(exc).__name__}: {exc}).") from None


class GGUFCheckpoint(CheckpointReader):
    """A Llama-family GGUF file (or a folder holding exactly one), read lazily under Hugging Face names."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise CheckpointError(f"model path {self.path} does not exist.")
        files = find_gguf(self.path)
        if len(files) != 1:
            found = (
                f"holds {len(files)} GGUF files ({', '.join(f.name for f in files)}); name the one to use"
                if files
                else "is not a .gguf file and holds none"
            )
            raise CheckpointError(f"{self.path} {found}.")
        self.file = files[0]
        check_header(self.file)
        reader = _parse(self.file)
        general = _Metadata(reader, self.file, "general.")
        arch = general.text("architecture")
        if arch != "llama":
            raise CheckpointError(
                f"{self.file}: architecture {shown(arch)} is not supported (GGUF inputs are mapped for llama only)."
            )
        if _Metadata(reader, self.file, "split.").integer("count", 1) > 1:
            raise CheckpointError(
                f"{self.file} is one part of a split GGUF; join the parts first (llama-gguf-split --merge)."
            )
        self._has_tokenizer = "tokenizer.ggml.model" in reader.fields
        shapes = {t.name: tuple(int(d) for d in t.shape) for t in reader.tensors}
        self._config = _llama_config(_Metadata(reader, self.file, "llama."), shapes)
        heads = {"attn_q": self._config["num_attention_heads"], "attn_k": self._config["num_key_value_heads"]}
        self._tensors: dict[str, _Tensor] = {}
        for t in reader.tensors:
            name = hf_name(t.name)
            assert name is not None  # _llama_config accepted only mapped names
            type_name = t.tensor_type.name
            if type_name not in _NATIVE and int(t.tensor_type) not in _dequantisable():
                raise CheckpointError(
                    f"{self.file}: tensor {shown(t.name)} is quantised as {type_name}, which the installed gguf "
                    "package cannot dequantise."
                )
            module = t.name.split(".")[2] if t.name.startswith("blk.") else ""
            shape = tuple(reversed(shapes[t.name]))
            self._tensors[name] = _Tensor(
                t.name, t.tensor_type, _NATIVE.get(type_name, "F32"), shape, t.data, heads.get(module)
            )

    def tensor_names(self) -> list[str]:
        return list(self._tensors)

    def __contains__(self, name: str) -> bool:
        return name in self._tensors

    def _get(self, name: str) -> _Tensor:
        try:
            return self._tensors[name]
        except KeyError:
            raise CheckpointError(f"tensor {shown(name)} is missing from model {self.file}.") from None

    def info(self, name: str) -> TensorInfo:
        t = self._get(name)
        return TensorInfo(name, t.dtype, t.shape, self.file)

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """Dequantise rows ``[start, stop)`` (default: all) of one tensor, and nothing more."""
        t = self._get(name)
        start, stop = (0, t.shape[0]) if rows is None else rows
        if not 0 <= start <= stop <= t.shape[0]:
            raise CheckpointError(
                f"{self.file}: rows [{start}, {stop}) of tensor {shown(name)} are outside its {t.shape[0]} rows."
            )
        try:
            return _decode(t, start, stop)
        except (ValueError, TypeError, IndexError, NotImplementedError) as exc:
            raise CheckpointError(
                f"{self.file}: tensor {shown(t.gguf_name)} ({t.qtype.name}) could not be decoded "
                f"({type(exc).__name__}: {exc})."
            ) from None

    def config(self) -> dict[str, Any] | None:
        """Synthesised from the GGUF metadata, never from a config.json beside the file: the metadata
        is what llama.cpp runs these tensors with."""
        return copy.deepcopy(self._config)

    def files(self) -> list[Path]:
        return [self.file]

    def embedded_tokenizer(self, dest: Path) -> list[str]:
        return tokenizer_from_gguf(self.file, dest) if self._has_tokenizer else []

    def close(self) -> None:
        self._tensors.clear()  # the memory maps go with the last views


def _decode(t: _Tensor, start: int, stop: int) -> torch.Tensor:
    import numpy as np
    import torch
    from gguf.quants import dequantize

    if start == stop:  # the dequantisers cannot reshape zero rows
        return torch.empty((0, *t.shape[1:]), dtype=to_torch(t.dtype))
    index: slice | np.ndarray = (
        slice(start, stop) if t.heads is None else unpermuted_rows(t.shape[0], t.heads)[start:stop]
    )
    with np.errstate(all="ignore"):  # non-finite scales give non-finite values, as they do in llama.cpp
        if t.quantised and len(t.shape) == 1:  # its rows are elements inside quantisation blocks
            return torch.from_numpy(np.ascontiguousarray(dequantize(np.asarray(t.data), t.qtype)[index]))
        block = np.array(t.data[index])  # a copy of just these rows, out of the memory map
        if t.quantised:
            return torch.from_numpy(dequantize(block, t.qtype))
    if t.dtype == "BF16":
        return torch.from_numpy(block.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(block)
