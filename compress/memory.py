"""Memory for the out-of-core runner: sizes, the process's resident memory, and the budget check.

    parse_size("1GiB") -> 1073741824           (bytes, or a size with a unit; CompressError otherwise)
    resident_bytes() -> int                    this process's RSS now
    release_memory()                           collect garbage and hand freed heap pages back to the OS
    freed_memory_returned()                    (context) large allocations go back to the OS when freed
    MemoryBudget(...).decide(cap, offload)     RAM or disk for the activations, or a CompressError
                                               that lists what does not fit
"""

from __future__ import annotations

import ctypes
import gc
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import psutil

from compress.errors import CompressError

MIB = 2**20


def parse_size(value, field: str = "max_memory") -> int:
    """Bytes from an int or a size such as ``1GiB``, ``512MiB``, ``2GB`` (pydantic's ByteSize rules)."""
    from pydantic import ByteSize, TypeAdapter, ValidationError

    try:
        size = int(TypeAdapter(ByteSize).validate_python(value))
    except ValidationError:
        raise CompressError(f"{field}: expected a size such as 1GiB, 512MiB or a number of bytes (got {value!r})") from None
    if size <= 0:
        raise CompressError(f"{field}: must be > 0 (got {value!r})")
    return size


def format_size(nbytes: float) -> str:
    """``1.25 GiB`` / ``310.0 MiB``."""
    if abs(nbytes) >= 2**30:
        return f"{nbytes / 2**30:.2f} GiB"
    return f"{nbytes / MIB:.1f} MiB"


def resident_bytes() -> int:
    """This process's resident set size now."""
    return psutil.Process().memory_info().rss


def release_memory(collect: bool = True) -> None:
    """Return free heap pages to the OS (glibc ``malloc_trim``) so RSS follows what is really held,
    after a full garbage collection when ``collect`` (~0.2 s in a large process: not per block,
    where tensors are freed by reference counting)."""
    if collect:
        gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters
_GLIBC_STEADY_MMAP_THRESHOLD = 32 * MIB  # where glibc's dynamic threshold ends up after large frees


def _mallopt(mmap_threshold: int) -> None:
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold)
        libc.mallopt(_M_TRIM_THRESHOLD, 2 * mmap_threshold)
    except (OSError, AttributeError):  # not glibc
        pass


@contextmanager
def freed_memory_returned(threshold: int = MIB) -> Iterator[None]:
    """While active, glibc serves every allocation of ``threshold`` bytes or more with its own
    mapping, which goes back to the OS when freed. By default the threshold grows to 32 MiB after
    the first large free, and the activations of a block forward (tens of MiB each) then stay in the
    heap once freed: RSS keeps hundreds of MiB that nothing uses. Costs some speed (fresh pages
    for each large tensor), so the steady-state 32 MiB is restored afterwards. No-op without glibc."""
    _mallopt(threshold)
    try:
        yield
    finally:
        _mallopt(_GLIBC_STEADY_MMAP_THRESHOLD)


@dataclass(frozen=True)
class MemoryBudget:
    """What one out-of-core sweep holds at its peak, in bytes.

    base: the process as it stands before the first block (interpreter, libraries, tokenizer, ids).
    block: the largest decoder block's weights in the run's dtype; slicing holds the dense block
        and its pruned copy, so 2 × block is counted.
    forward: the working memory of one block forward on one calibration batch (projections, MLP
        activations, attention, the float64 statistics of the consumer inputs), or of scoring a
        block (a consumer weight in float64 and its square), whichever is larger.
    activations: every calibration window's hidden state [n, seqlen, hidden] (held in RAM unless
        offloaded); batch_activations: one batch of them (offloaded: the batch in and the batch out).
    """

    base: int
    block: int
    forward: int
    activations: int
    batch_activations: int

    def needed(self, offload: bool) -> int:
        held = 2 * self.batch_activations if offload else self.activations + self.batch_activations
        return self.base + 2 * self.block + self.forward + held

    def decide(self, cap: int, offload_requested: bool) -> bool:
        """True to keep activations on disk: when asked, or when they do not fit in RAM under
        ``cap`` but would on disk. Raises a CompressError when even that does not fit."""
        if not offload_requested and self.needed(offload=False) <= cap:
            return False
        if self.needed(offload=True) <= cap:
            return True
        raise CompressError(
            f"max_memory {format_size(cap)} is too small for one block plus its activations: "
            f"about {format_size(self.needed(offload=True))} is needed even with the activations on disk "
            f"(this process already holds {format_size(self.base)}; the largest block is "
            f"{format_size(self.block)} and slicing holds it twice; one block forward on a calibration batch "
            f"needs {format_size(self.forward)} and one batch of activations {format_size(self.batch_activations)}). "
            "Raise --max-memory, or lower calibration.batch_size"
        )

    def to_dict(self) -> dict:
        return {
            "base_mb": round(self.base / MIB, 1),
            "block_mb": round(self.block / MIB, 1),
            "forward_mb": round(self.forward / MIB, 1),
            "activations_mb": round(self.activations / MIB, 1),
            "batch_activations_mb": round(self.batch_activations / MIB, 1),
            "needed_in_ram_mb": round(self.needed(offload=False) / MIB, 1),
            "needed_offloaded_mb": round(self.needed(offload=True) / MIB, 1),
        }


def forward_bytes(tokens: int, batch: int, seqlen: int, hidden: int, q_width: int, kv_width: int,
                  intermediate: int, heads: int, itemsize: int, statistics: bool) -> int:
    """Working memory of one decoder block forward on ``tokens`` = batch × seqlen tokens: the
    attention projections and their rotated / repeated copies, the attention weights
    [batch, heads, seqlen, seqlen], the MLP's gate, up, activation and product, the residual
    stream and norms, and (``statistics``) the float64 copy and square of a consumer input."""
    attention = tokens * (6 * q_width + 6 * kv_width) * itemsize + batch * heads * seqlen * seqlen * itemsize
    mlp = tokens * 4 * intermediate * itemsize
    residual = tokens * 4 * hidden * itemsize
    stats = tokens * 2 * max(q_width, intermediate) * 8 if statistics else 0
    return max(attention, mlp) + residual + stats


def own_weights(model) -> None:
    """Copy every parameter and buffer of ``model`` into memory of its own.

    ``from_pretrained`` leaves float32 weights as views of the checkpoint's memory map; every page
    a forward pass touched stays in this process's resident set while one tensor still views the
    file. After pruning, most of those tensors are gone but the kept ones (embeddings, skipped
    layers) hold the whole mapping: copying them releases it (the dense model's size in RSS).
    Tied weights stay tied (one Parameter object); tensors on the meta device are left alone."""
    import torch

    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if not tensor.is_meta:
                tensor.data = tensor.data.clone()

