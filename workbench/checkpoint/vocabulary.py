"""Embedding and head rows re-indexed by token: each model's rows moved to the output vocabulary.

Row i of an embedding (or LM head) belongs to token i of *that model's* tokenizer. Merging rows by
index across models whose tokenizers differ mixes different tokens; mergekit's
``PermutedVocabulary`` instead builds, for every model, a matrix indexed by the output vocabulary:

* a token the model has: its own row (unless ``force``\\ d);
* a token it lacks (or a forced one) takes a default row, the same for every model that takes one:
  a ``tokens:`` override's source (a model's row of that token, a model's row of another token,
  or zero); without one, the only model that has the token gives it; else the base, if it has it;
  else the average over the models that have it; a token no model has is zero;
* with ``pad_to_multiple_of``, the rows past the vocabulary hold the mean of the model's aligned
  rows (the initialisation suggested at https://nlp.stanford.edu/~johnhew/vocab-expansion.html).

The merge method then sees aligned tensors and merges them row by row as usual.

:class:`AlignedReader` presents one model's tensors this way and everything else unchanged. Nothing
is materialised up front: a read of rows ``[a, b)`` reads the source rows they come from, the few
default rows are read once per tensor (row by row, from the models that give them) and kept, and
the padding mean once per tensor and model. Memory stays at about one tensor per model.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from workbench.architecture import place
from workbench.checkpoint.base import CheckpointReader, TensorInfo
from workbench.checkpoint.dtypes import to_torch
from workbench.errors import CheckpointError

if TYPE_CHECKING:
    import torch

#: Embedding-like tensors that are not indexed by token.
_NOT_VOCABULARY = re.compile(r"(^|\.)(wpe|position_embeddings|embed_positions|token_type_embeddings)(\.|$)")
#: Rows per block when a padding mean is summed.
_BLOCK_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class Fill:
    """The row a model takes for a token it lacks (or a forced one): ``zero``; or the mean of the
    source rows ``sources`` ((model position, row in that model)), a copy when there is one."""

    sources: tuple[tuple[int, int], ...] = ()

    @property
    def kind(self) -> str:
        return "zero" if not self.sources else ("copy" if len(self.sources) == 1 else "mean")


def vocabulary_tensors(reader: CheckpointReader) -> tuple[int, list[str]]:
    """(rows, names): the model's vocabulary size (its config's ``vocab_size`` where a tensor has it,
    else the first embedding's rows) and the embedding and head tensors indexed by token."""
    candidates = []
    for name in reader.tensor_names():
        where = place(name)
        if where.module_kind in ("embedding", "head") and not _NOT_VOCABULARY.search(name):
            info = reader.info(name)
            if info.shape and info.is_float:
                candidates.append((name, where.module_kind, info.shape[0]))
    if not candidates:
        return 0, []
    declared = (reader.config() or {}).get("vocab_size")
    if not (isinstance(declared, int) and any(rows == declared for _, _, rows in candidates)):
        declared = next((rows for _, kind, rows in candidates if kind == "embedding"), candidates[0][2])
    return declared, [name for name, _, rows in candidates if rows == declared]


def _gather(reader: CheckpointReader, name: str, rows: np.ndarray) -> "torch.Tensor":
    """Rows ``rows`` (any order) of a tensor: one read of their span when they lie close together (a
    permutation that mostly keeps ids), else one read per run of consecutive rows, so that a
    scattered permutation never reads the whole tensor once per row block."""
    import torch

    order = np.argsort(rows, kind="stable")
    ordered = rows[order]
    low, high = int(ordered[0]), int(ordered[-1]) + 1
    if high - low <= 2 * len(rows) + 64:
        return reader.read(name, (low, high))[torch.from_numpy(rows - low)]
    runs = np.split(ordered, np.nonzero(np.diff(ordered) != 1)[0] + 1)
    stacked = torch.cat([reader.read(name, (int(run[0]), int(run[-1]) + 1)) for run in runs])
    result = torch.empty_like(stacked)
    result[torch.from_numpy(order)] = stacked
    return result


def _promoted(codes: list[str]) -> str:
    """The dtype rows of every model fit in (as torch.promote_types): equal, else F64 or F32."""
    if len(set(codes)) == 1:
        return codes[0]
    return "F64" if "F64" in codes else "F32"


@dataclass
class VocabularyAlignment:
    """Every model's rows in the output vocabulary.

    ``permutation[m, i]``: model m's row of output token i (-1: it lacks it); ``own[m, i]``: whether
    model m keeps its row there (it has the token and it is not forced); ``fills`` and
    ``fill_index[i]`` (-1: none): the default row of token i for the models that do not keep theirs.
    """

    readers: list[CheckpointReader]
    names: set[str]
    permutation: np.ndarray
    own: np.ndarray
    fills: list[Fill]
    fill_index: np.ndarray
    vocabulary_size: int  # output token ids: 0 .. vocabulary_size - 1
    rows: int  # output rows (vocabulary_size padded to a multiple)
    #: What ``read`` returns, the same for every model: the models' common dtype (several: the
    #: widest, as torch.promote_types), float32 where half-precision models get computed rows
    #: (averages, padding means), which mergekit computes and merges in the recipe's dtype (float32
    #: by default) instead of rounding them to the storage dtype first. Every value is exact in it.
    _read_dtypes: dict[str, str] = field(default_factory=dict)
    _defaults: dict[str, "torch.Tensor"] = field(default_factory=dict)
    _means: dict[tuple[int, str], "torch.Tensor"] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        for name in self.names:
            infos = [reader.info(name) for reader in self.readers]
            rest = {info.shape[1:] for info in infos}
            if len(rest) > 1:
                raise CheckpointError(
                    f"tensor '{name}' has rows of different sizes in the models ({sorted(rest)}); the "
                    "models must have the same architecture."
                )
            self._read_dtypes[name] = _promoted([info.dtype for info in infos])
        computed = self.rows > self.vocabulary_size or any(len(f.sources) > 1 for f in self.fills)
        for name, code in self._read_dtypes.items():
            self._read_dtypes[name] = "F32" if computed and code in ("BF16", "F16") else code

    def info(self, m: int, name: str) -> TensorInfo:
        """The model's own dtype (the output stores the reference's), the output's rows."""
        inner = self.readers[m].info(name)
        return TensorInfo(name, inner.dtype, (self.rows, *inner.shape[1:]), inner.file)

    def read(self, m: int, name: str, start: int, stop: int) -> "torch.Tensor":
        """Rows ``[start, stop)`` of model m's aligned tensor ``name``."""
        import torch

        info = self.readers[m].info(name)
        dtype = to_torch(self._read_dtypes[name])
        out = torch.zeros((stop - start, *info.shape[1:]), dtype=dtype)
        end = min(stop, self.vocabulary_size)
        if start < end:
            own = self.own[m, start:end]
            if own.any():
                source = self.permutation[m, start:end][own]
                rows = _gather(self.readers[m], name, source)
                out[torch.from_numpy(np.nonzero(own)[0])] = rows.to(dtype)
            if not own.all():
                at = np.nonzero(~own)[0]
                table = self._default_rows(name)
                out[torch.from_numpy(at)] = table[torch.from_numpy(self.fill_index[start:end][at])].to(dtype)
        if stop > self.vocabulary_size:
            out[max(start, self.vocabulary_size) - start :] = self._mean(m, name).to(dtype)
        return out

    def _default_rows(self, name: str) -> "torch.Tensor":
        """Every fill's row of tensor ``name`` (float32; float64 for float64 models), computed once:
        the source rows are read run by run, never a whole tensor."""
        with self._lock:
            if name not in self._defaults:
                self._defaults[name] = self._compute_defaults(name)
            return self._defaults[name]

    def _compute_defaults(self, name: str) -> "torch.Tensor":
        import torch

        precision = torch.float64 if self._read_dtypes[name] == "F64" else torch.float32
        wanted: dict[int, set[int]] = {}
        for fill in self.fills:
            for m, row in fill.sources:
                wanted.setdefault(m, set()).add(row)
        found: dict[tuple[int, int], torch.Tensor] = {}
        for m, rows in wanted.items():
            ordered = np.array(sorted(rows), dtype=np.int64)
            block = _gather(self.readers[m], name, ordered).to(precision)
            for k, row in enumerate(ordered.tolist()):
                found[(m, row)] = block[k]
        shape = self.readers[0].info(name).shape[1:]
        table = torch.zeros((max(len(self.fills), 1), *shape), dtype=precision)
        for i, fill in enumerate(self.fills):
            if fill.sources:  # summed in order, then divided: mergekit's average
                total = torch.zeros(shape, dtype=precision)
                for source in fill.sources:
                    total += found[source]
                table[i] = total / len(fill.sources)
        return table

    def _mean(self, m: int, name: str) -> "torch.Tensor":
        """The mean of model m's aligned rows of ``name`` over the vocabulary (for padding rows)."""
        import torch

        with self._lock:
            if (m, name) in self._means:
                return self._means[(m, name)]
        shape = self.readers[m].info(name).shape[1:]
        width = max(1, int(np.prod(shape)) if shape else 1)
        step = max(1, _BLOCK_ELEMENTS // width)
        total = torch.zeros(shape, dtype=torch.float64)
        for start in range(0, self.vocabulary_size, step):
            stop = min(start + step, self.vocabulary_size)
            total += self.read(m, name, start, stop).double().sum(dim=0)
        mean = (total / self.vocabulary_size).float()
        with self._lock:
            self._means[(m, name)] = mean
        return mean


def build_alignment(
    readers: list[CheckpointReader],
    names: list[str],
    vocabulary: dict[str, int],
    model_vocabularies: list[dict[str, int]],
    model_rows: list[int],
    base: int | None,
    overrides: dict[int, tuple[Fill | None, bool]],
    pad_to_multiple_of: int | None,
) -> tuple[VocabularyAlignment, list[str]]:
    """The alignment of every model (``readers[m]`` with ``model_vocabularies[m]`` over its first
    ``model_rows[m]`` rows) to ``vocabulary``, by mergekit's rules (see the module docstring);
    ``overrides``: output id -> (fill or None for the default rules, force). Also returns the output
    tokens no model has (their rows are zero)."""
    size = max(vocabulary.values(), default=-1) + 1
    count = len(readers)
    permutation = np.full((count, size), -1, dtype=np.int64)
    for m, (own_vocabulary, rows) in enumerate(zip(model_vocabularies, model_rows)):
        for token, index in own_vocabulary.items():
            target = vocabulary.get(token)
            if target is not None and 0 <= index < rows:
                permutation[m, target] = index
    present = permutation >= 0
    forced = np.zeros(size, dtype=bool)
    for index, (_, force) in overrides.items():
        forced[index] = force
    own = present & ~forced
    fills: list[Fill] = []
    fill_index = np.full(size, -1, dtype=np.int64)
    unique: dict[Fill, int] = {}
    for index in np.nonzero(~own.all(axis=0))[0].tolist():
        fill, _ = overrides.get(index, (None, False))
        if fill is None:
            having = np.nonzero(present[:, index])[0].tolist()
            if len(having) == 1 or (base is not None and base in having):
                donor = having[0] if len(having) == 1 else base
                assert donor is not None
                fill = Fill(((donor, int(permutation[donor, index])),))
            else:  # none (zero) or several, the base not among them: their average
                fill = Fill(tuple((m, int(permutation[m, index])) for m in having))
        fill_index[index] = unique.setdefault(fill, len(unique))
    fills = list(unique)
    multiple = pad_to_multiple_of or 1
    rows = -(-size // multiple) * multiple
    by_id = {index: token for token, index in vocabulary.items()}
    nowhere = [by_id[i] for i in np.nonzero(~present.any(axis=0))[0].tolist() if i in by_id]
    nowhere = [t for t in nowhere if overrides.get(vocabulary[t], (None, False))[0] is None]
    alignment = VocabularyAlignment(readers, set(names), permutation, own, fills, fill_index, size, rows)
    return alignment, nowhere


class AlignedReader(CheckpointReader):
    """Model ``index`` of an alignment: its vocabulary tensors in the output vocabulary (and its
    config's ``vocab_size`` with them), every other tensor as the model has it.

    ``info`` gives a vocabulary tensor's stored dtype (the output keeps the reference's); ``read``
    may return a wider one, the same for every model (see ``VocabularyAlignment._read_dtypes``), so
    that rows taken from other models and computed rows are exact, as in mergekit."""

    def __init__(self, inner: CheckpointReader, alignment: VocabularyAlignment, index: int) -> None:
        self.inner = inner
        self.path = inner.path
        self.alignment = alignment
        self.index = index

    def tensor_names(self) -> list[str]:
        return self.inner.tensor_names()

    def __contains__(self, name: str) -> bool:
        return name in self.inner

    def info(self, name: str) -> TensorInfo:
        if name in self.alignment.names:
            return self.alignment.info(self.index, name)
        return self.inner.info(name)

    def read(self, name: str, rows: tuple[int, int] | None = None) -> "torch.Tensor":
        if name not in self.alignment.names:
            return self.inner.read(name, rows)
        start, stop = rows or (0, self.alignment.rows)
        return self.alignment.read(self.index, name, start, stop)

    def config(self) -> dict[str, Any] | None:
        config = self.inner.config()
        if config is None:
            return None
        config = dict(config)
        config["vocab_size"] = self.alignment.rows
        text = config.get("text_config")
        if isinstance(text, dict) and "vocab_size" in text:
            config["text_config"] = {**text, "vocab_size": self.alignment.rows}
        return config

    def files(self) -> list[Path]:
        return self.inner.files()

    def embedded_tokenizer(self, dest: Path) -> list[str]:
        return self.inner.embedded_tokenizer(dest)

    def close(self) -> None:
        self.inner.close()
