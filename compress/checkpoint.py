"""Safetensors checkpoints read lazily and written piece by piece (the out-of-core path).

    CheckpointReader(folder)        which file holds each tensor (model.safetensors, or the shards
                                    named by model.safetensors.index.json); shapes and dtypes from
                                    the headers; tensors read on demand through ``safe_open``
    write_safetensors(path, items)  one safetensors file written tensor by tensor, a large tensor in
                                    chunks, so nothing has to be in memory whole
    ShardedWriter(folder)           numbered shards + model.safetensors.index.json, as
                                    ``save_pretrained`` writes a sharded checkpoint

Memory: ``safe_open`` memory-maps the file, and the tensors it returns are copy-on-write views of
the mapping. Pages count in the process's RSS once touched and stay resident until the last
tensor read through that opening is freed and the file is closed. So every read below opens the
file, reads, and closes it; the caller frees one block's tensors together. Anything kept longer
(a norm weight, gathered embedding rows) is cloned out of the mapping first.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch

from compress.errors import ModelSourceError

WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# safetensors dtype names <-> torch dtypes (the ones a decoder checkpoint holds)
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives and what it is, from the file's header (nothing read yet)."""

    name: str
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]

    def nbytes(self, dtype: torch.dtype | None = None) -> int:
        """Bytes of the tensor in ``dtype`` (default: its stored dtype)."""
        numel = 1
        for size in self.shape:
            numel *= size
        return numel * _itemsize(dtype or self.dtype)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def read_header(path: Path) -> dict:
    """The JSON header of a safetensors file (8-byte little-endian length, then the JSON)."""
    try:
        with open(path, "rb") as handle:
            length_bytes = handle.read(8)
            if len(length_bytes) != 8:
                raise ValueError("shorter than a safetensors header")
            (length,) = struct.unpack("<Q", length_bytes)
            if length > 100_000_000:
                raise ValueError(f"header length {length} is implausible")
            header = json.loads(handle.read(length))
    except (OSError, ValueError) as error:
        raise ModelSourceError(f"{path}: not a readable safetensors file ({error})") from None
    if not isinstance(header, dict):
        raise ModelSourceError(f"{path}: not a readable safetensors file (the header is not a mapping)")
    return header


class CheckpointReader:
    """The tensors of a safetensors checkpoint folder, read on demand.

    The folder holds ``model.safetensors``, or shards listed in ``model.safetensors.index.json``
    (its ``weight_map``), or, failing both, any ``*.safetensors`` files (their union).
    """

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.infos: dict[str, TensorInfo] = {}
        for file in self._files():
            for name, entry in read_header(file).items():
                if name == "__metadata__":
                    continue
                dtype = SAFETENSORS_DTYPES.get(entry.get("dtype"))
                if dtype is None:
                    raise ModelSourceError(f"{file}: tensor {name} has dtype {entry.get('dtype')!r}, "
                                           f"which out-of-core loading does not read ({', '.join(SAFETENSORS_DTYPES)})")
                self.infos[name] = TensorInfo(name, file, dtype, tuple(int(s) for s in entry["shape"]))

    def _files(self) -> list[Path]:
        index = self.folder / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as error:
                raise ModelSourceError(f"{index}: not a readable shard index ({error})") from None
            files = sorted({self.folder / name for name in weight_map.values()})
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise ModelSourceError(f"{index} names shards that are not in {self.folder}: {', '.join(missing[:4])}")
            return files
        if (self.folder / WEIGHTS_FILE).is_file():
            return [self.folder / WEIGHTS_FILE]
        files = sorted(self.folder.glob("*.safetensors"))
        if not files:
            raise ModelSourceError(f"{self.folder}: no *.safetensors weights to read")
        return files

    # ------------------------------------------------------------------ metadata
    def __contains__(self, name: str) -> bool:
        return name in self.infos

    def info(self, name: str) -> TensorInfo:
        if name not in self.infos:
            raise ModelSourceError(f"{self.folder}: the checkpoint has no tensor {name!r}")
        return self.infos[name]

    def names(self, prefix: str = "") -> list[str]:
        """Tensor names starting with ``prefix``, sorted."""
        return sorted(name for name in self.infos if name.startswith(prefix))

    def nbytes(self, names: Iterable[str], dtype: torch.dtype | None = None) -> int:
        return sum(self.info(name).nbytes(dtype) for name in names)

    # ------------------------------------------------------------------ reading
    def read(self, names: Iterable[str], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """``{name: tensor}`` in ``dtype`` (default: as stored). Tensors whose dtype is unchanged are
        views of the file mapping (freed with the last of them); converted ones are new tensors."""
        from safetensors import safe_open

        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(self.info(name).file, []).append(name)
        tensors = {}
        for file, file_names in by_file.items():
            with safe_open(str(file), framework="pt") as handle:
                for name in file_names:
                    tensor = handle.get_tensor(name)
                    tensors[name] = tensor if dtype is None or tensor.dtype == dtype else tensor.to(dtype)
        return tensors

    def read_rows(self, name: str, start: int, stop: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Rows ``start:stop`` of a tensor as a new tensor (not tied to the mapping) [stop-start, ...]."""
        from safetensors import safe_open

        info = self.info(name)
        with safe_open(str(info.file), framework="pt") as handle:
            rows = handle.get_slice(name)[start:stop]
            owned = rows.to(dtype or info.dtype, copy=True)
            del rows
        return owned

    def row_chunks(self, name: str, chunk_bytes: int, dtype: torch.dtype | None = None) -> Iterator[tuple[int, torch.Tensor]]:
        """``(first row, rows)`` over the whole tensor, about ``chunk_bytes`` per chunk (in ``dtype``)."""
        info = self.info(name)
        rows = info.shape[0] if info.shape else 1
        row_bytes = max(1, info.nbytes(dtype) // max(1, rows))
        step = max(1, chunk_bytes // row_bytes)
        for start in range(0, rows, step):
            yield start, self.read_rows(name, start, min(rows, start + step), dtype)

    def gather_rows(self, name: str, ids: torch.Tensor, chunk_bytes: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """[len(ids), ...] the rows ``ids`` (int64, any order, repeats allowed) of a 2-D tensor such as
        the embedding, read chunk by chunk so that at most ``chunk_bytes`` of it are resident."""
        info = self.info(name)
        ids = ids.reshape(-1).to(torch.long)
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= info.shape[0]):
            raise ModelSourceError(f"token id {int(ids.max())} is outside the embedding {name} "
                                   f"({info.shape[0]} rows); the tokenizer does not match the model")
        out = torch.empty((ids.numel(), *info.shape[1:]), dtype=dtype or info.dtype)
        for start, chunk in self.row_chunks(name, chunk_bytes, dtype):
            inside = (ids >= start) & (ids < start + chunk.shape[0])
            if inside.any():
                out[inside] = chunk.index_select(0, ids[inside] - start)
        return out


# ---------------------------------------------------------------------------------------- writing
# What a file entry holds: a tensor, or (dtype, shape, chunks) where ``chunks()`` yields tensors
# whose bytes, concatenated in order, are the tensor's (e.g. row blocks).
Chunks = Callable[[], Iterator[torch.Tensor]]


@dataclass(frozen=True)
class StreamedTensor:
    """A tensor written from chunks: ``chunks()`` yields row blocks of ``shape`` in ``dtype``."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    chunks: Chunks

    @property
    def nbytes(self) -> int:
        numel = 1
        for size in self.shape:
            numel *= size
        return numel * _itemsize(self.dtype)


def _entry_layout(item: torch.Tensor | StreamedTensor) -> tuple[torch.dtype, tuple[int, ...], int]:
    if isinstance(item, StreamedTensor):
        return item.dtype, tuple(item.shape), item.nbytes
    return item.dtype, tuple(item.shape), item.numel() * item.element_size()


def _raw_bytes(tensor: torch.Tensor):
    """The tensor's bytes as a buffer (little-endian, as safetensors stores them)."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy() if flat.numel() else b""


def write_safetensors(path: Path, items: dict[str, torch.Tensor | StreamedTensor],
                      metadata: dict[str, str] | None = None) -> int:
    """Write one safetensors file (the format ``safetensors.torch.save_file`` writes: header
    padded to 8 bytes, tensors contiguous in the given order). Returns the tensor bytes written."""
    header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for name, item in items.items():
        dtype, shape, nbytes = _entry_layout(item)
        if dtype not in DTYPE_NAMES:
            raise ValueError(f"{name}: dtype {dtype} cannot be written to safetensors here")
        header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(encoded)))
        handle.write(encoded)
        for name, item in items.items():
            dtype, shape, nbytes = _entry_layout(item)
            written = 0
            pieces = item.chunks() if isinstance(item, StreamedTensor) else [item]
            for piece in pieces:
                if piece.dtype != dtype:
                    raise ValueError(f"{name}: a chunk is {piece.dtype}, the tensor {dtype}")
                buffer = _raw_bytes(piece)
                handle.write(buffer)
                written += len(buffer) if isinstance(buffer, bytes) else buffer.nbytes
            if written != nbytes:
                raise ValueError(f"{name}: wrote {written} bytes, the header promised {nbytes}")
    return offset


class ShardedWriter:
    """Writes a checkpoint as numbered shards plus ``model.safetensors.index.json``.

    Each ``add`` writes one shard at once (under a provisional name); ``finish`` renames them to
    ``model-0000k-of-0000N.safetensors`` and writes the index mapping every tensor to its shard.
    """

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.shards: list[tuple[Path, list[str]]] = []
        self.total_size = 0

    def add(self, items: dict[str, torch.Tensor | StreamedTensor]) -> None:
        """Write ``items`` as the next shard (an empty mapping writes nothing)."""
        if not items:
            return
        taken = {name for _, names in self.shards for name in names}
        twice = sorted(taken & set(items))
        if twice:
            raise ValueError(f"tensors written twice: {twice[:4]}")
        path = self.folder / f".shard-{len(self.shards):05d}.safetensors"
        self.total_size += write_safetensors(path, items)
        self.shards.append((path, list(items)))

    @property
    def names(self) -> list[str]:
        return [name for _, names in self.shards for name in names]

    def finish(self) -> list[str]:
        """Rename the shards to their final names and write the index; returns the file names."""
        count = len(self.shards)
        weight_map, files = {}, []
        for k, (path, names) in enumerate(self.shards, start=1):
            final = f"model-{k:05d}-of-{count:05d}.safetensors"
            os.replace(path, self.folder / final)
            files.append(final)
            weight_map.update(dict.fromkeys(names, final))
        index = {"metadata": {"total_size": self.total_size}, "weight_map": dict(sorted(weight_map.items()))}
        (self.folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        return files + [INDEX_FILE]
