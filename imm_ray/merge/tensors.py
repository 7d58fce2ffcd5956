"""Streaming safetensors I/O for the merge: model folders, input validation, the output shard plan.

The safetensors format is simple (an 8-byte little-endian header length, a JSON header giving each tensor's dtype,
shape and byte range, then the raw little-endian data), and both directions stream through it directly:

- reading: ``os.pread`` of exactly the byte range of a chunk. A memory map would be as fast, but every page of a
  1 GB shard a worker touches would count in that worker's resident memory until unmapped; a read into a chunk
  buffer keeps a worker's memory bounded by its chunk size, on a local disk and on shared storage alike.
- writing: the driver writes every output header first (the shard plan fixes each tensor's byte range), then any
  worker on any node writes any range of any tensor with ``os.pwrite``. The files do not depend on how many workers
  wrote them, or in which order.

Files are validated on open (header, offsets, size), so a truncated or corrupt file is reported by name before any
work starts. Pickle checkpoints (.bin, .pt, ...) are refused; nothing is ever unpickled.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import struct
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from imm_ray.merge.errors import MergeError, PickleCheckpointError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
MAX_SHARD_BYTES = 5_000_000_000
MAX_HEADER_BYTES = 100_000_000
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
AUX_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model", "chat_template.jinja",
    "chat_template.json",
)
ITEMSIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16"})
OUTPUT_DTYPES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}
CONFIG_DTYPE_NAMES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64"}


@dataclass(frozen=True)
class TensorInfo:
    """One stored tensor: where its bytes are (absolute file offset) and what they hold."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path
    offset: int
    nbytes: int

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def itemsize(self) -> int:
        return ITEMSIZES[self.dtype]

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOAT_DTYPES


@dataclass(frozen=True)
class ModelFiles:
    """A validated Hugging Face model folder: its tensors in storage order, and its config (or {})."""

    root: Path
    role: str
    tensors: Mapping[str, TensorInfo]
    config: Mapping[str, object]

    @property
    def files(self) -> tuple[Path, ...]:
        return tuple(dict.fromkeys(info.file for info in self.tensors.values()))


def read_header(path: Path) -> tuple[bytes, dict[str, TensorInfo]]:
    """Parse and check one safetensors file's header; the raw header bytes come back for fingerprints."""
    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            prefix = handle.read(8)
            length = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else -1
            if not 0 < length <= min(MAX_HEADER_BYTES, size - 8):
                raise MergeError(f"{path}: not a safetensors file, or truncated (header length {length})")
            raw = handle.read(length)
    except OSError as error:
        raise MergeError(f"{path}: cannot read ({error.strerror})") from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise MergeError(f"{path}: corrupt safetensors header ({error})") from None
    if not isinstance(header, dict):
        raise MergeError(f"{path}: corrupt safetensors header (not a JSON object)")
    header.pop("__metadata__", None)
    tensors = {name: _tensor_info(path, 8 + length, name, entry) for name, entry in header.items()}
    _check_layout(path, size - 8 - length, tensors.values(), 8 + length)
    return raw, tensors


def _tensor_info(path: Path, data_start: int, name: str, entry: object) -> TensorInfo:
    try:
        dtype, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]  # type: ignore[index]
        begin, end = int(begin), int(end)
        if not all(isinstance(dim, int) and dim >= 0 for dim in shape):
            raise ValueError
    except (KeyError, TypeError, ValueError):
        raise MergeError(f"{path}: corrupt safetensors header entry for tensor {name!r}") from None
    if dtype not in ITEMSIZES:
        raise MergeError(f"{path}: tensor {name!r} has dtype {dtype}, which the merge does not support")
    info = TensorInfo(name, dtype, shape, path, data_start + begin, end - begin)
    if info.nbytes != info.numel * info.itemsize or begin < 0:
        raise MergeError(f"{path}: tensor {name!r} has a byte range that does not match its shape and dtype")
    return info


def _check_layout(path: Path, data_size: int, tensors: Iterable[TensorInfo], data_start: int) -> None:
    """The byte ranges must tile the data section exactly; a shorter file is truncated."""
    ranges = sorted((info.offset - data_start, info.offset - data_start + info.nbytes, info.name) for info in tensors)
    position = 0
    for begin, end, name in ranges:
        if begin != position:
            raise MergeError(f"{path}: corrupt safetensors file (tensor {name!r} does not follow its neighbour)")
        position = end
    if position > data_size:
        raise MergeError(f"{path}: truncated safetensors file ({data_size} of {position} data bytes present)")
    if position < data_size:
        raise MergeError(f"{path}: corrupt safetensors file ({data_size - position} unexpected trailing bytes)")


def open_model(root: Path, role: str) -> ModelFiles:
    """Resolve a model folder (sharded with an index, or one model.safetensors) and check every file in it."""
    root = Path(root)
    if root.is_file():
        if root.suffix in PICKLE_SUFFIXES:
            raise PickleCheckpointError(_pickle_message(role, root))
        raise MergeError(f"{role} {root}: expected a Hugging Face model folder, got a file")
    if not root.is_dir():
        raise MergeError(f"{role} {root}: no such model folder")
    if (root / INDEX_NAME).is_file():
        tensors = _indexed_tensors(root, role)
    elif (root / SINGLE_NAME).is_file():
        tensors = read_header(root / SINGLE_NAME)[1]
    else:
        pickles = sorted(p.name for p in root.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise PickleCheckpointError(_pickle_message(role, root / pickles[0]))
        raise MergeError(f"{role} {root}: no {SINGLE_NAME} or {INDEX_NAME} in the folder")
    ordered = dict(sorted(tensors.items(), key=lambda item: (str(item[1].file), item[1].offset)))
    return ModelFiles(root, role, ordered, _read_config(root, role))


def _indexed_tensors(root: Path, role: str) -> dict[str, TensorInfo]:
    index_path = root / INDEX_NAME
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
        files = {name: root / file for name, file in weight_map.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise MergeError(f"{index_path}: corrupt index (no readable weight_map)") from None
    headers: dict[Path, dict[str, TensorInfo]] = {}
    tensors: dict[str, TensorInfo] = {}
    for name, file in files.items():
        if file not in headers:
            if not file.is_file():
                raise MergeError(f"{index_path}: names shard {file.name}, which is missing")
            headers[file] = read_header(file)[1]
        if name not in headers[file]:
            raise MergeError(f"{index_path}: tensor {name!r} is not in {file.name}")
        tensors[name] = headers[file][name]
    return tensors


def _read_config(root: Path, role: str) -> dict[str, object]:
    path = root / "config.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except ValueError as error:
        raise MergeError(f"{role} {path}: not valid JSON ({error})") from None


def _pickle_message(role: str, path: Path) -> str:
    return (
        f"{role} {path}: pickle checkpoints are refused (loading one can run arbitrary code). Convert it once, in "
        "an environment you trust, with: python -c \"from transformers import AutoModelForCausalLM as M; "
        f"M.from_pretrained('{path.parent if path.is_file() else path}')"
        ".save_pretrained('CONVERTED_DIR', safe_serialization=True)\""
    )


def check_compatible(reference: ModelFiles, other: ModelFiles) -> None:
    """Same tensor names, shapes and dtypes, or an error naming the first tensor that differs."""
    missing = [name for name in reference.tensors if name not in other.tensors]
    if missing:
        raise MergeError(f"tensor {missing[0]!r} is in {reference.role} ({reference.root}) but not in {other.role} "
                         f"({other.root}); {len(missing)} tensor(s) missing")
    extra = [name for name in other.tensors if name not in reference.tensors]
    if extra:
        raise MergeError(f"tensor {extra[0]!r} is in {other.role} ({other.root}) but not in {reference.role} "
                         f"({reference.root}); {len(extra)} extra tensor(s)")
    for name, ours in reference.tensors.items():
        theirs = other.tensors[name]
        for field in ("shape", "dtype"):
            if getattr(ours, field) != getattr(theirs, field):
                raise MergeError(f"tensor {name!r}: {field} {getattr(ours, field)} in {reference.role} "
                                 f"({reference.root}) but {getattr(theirs, field)} in {other.role} ({other.root})")


def tied_duplicates(model: ModelFiles) -> frozenset[str]:
    """Stored tensors that a tied model does not need: ``lm_head.weight`` when the config ties embeddings.

    Transformers re-ties them on load, so the output writes the shared weight once, under the embedding's name.
    """
    tied = model.config.get("tie_word_embeddings") is True
    if tied and "lm_head.weight" in model.tensors and "model.embed_tokens.weight" in model.tensors:
        return frozenset({"lm_head.weight"})
    return frozenset()


def fingerprint(model: ModelFiles, sample_bytes: int = 4096) -> str:
    """A cheap content fingerprint: blake2b-256 of config.json, every shard's name, size and header, and the first
    and last ``sample_bytes`` of every tensor. Not a full hash: reading 1 GB twice more would cost as much as the
    merge itself, while two different fine-tunes differ in every sampled tensor."""
    digest = hashlib.blake2b(digest_size=32)
    config = model.root / "config.json"
    digest.update(config.read_bytes() if config.is_file() else b"")
    for file in sorted(model.files):
        digest.update(f"{file.name}|{file.stat().st_size}|".encode())
        digest.update(read_header(file)[0])
    with ChunkReader() as reader:
        for info in model.tensors.values():
            for begin in sorted({0, max(info.nbytes - sample_bytes, 0)}):
                digest.update(reader.read_bytes(info.file, info.offset + begin, min(sample_bytes, info.nbytes)).data)
    return digest.hexdigest()


class ChunkReader:
    """Reads element ranges of stored tensors with ``os.pread``; keeps one descriptor per file open."""

    def __init__(self) -> None:
        self._fds: dict[Path, int] = {}

    def _fd(self, file: Path) -> int:
        fd = self._fds.get(file)
        if fd is None:
            fd = self._fds[file] = os.open(file, os.O_RDONLY)
        return fd

    def read_bytes(self, file: Path, offset: int, count: int) -> np.ndarray:
        """``count`` bytes at ``offset``, read straight into a fresh buffer (one copy from the page cache)."""
        buffer = np.empty(count, dtype=np.uint8)
        got = os.preadv(self._fd(file), [buffer], offset) if count else 0
        if got != count:
            raise MergeError(f"{file}: truncated while reading ({got} of {count} bytes at offset {offset})")
        return buffer

    def read(self, info: TensorInfo, start: int, stop: int) -> np.ndarray:
        """The raw bytes of elements ``start .. stop-1`` of the flattened tensor."""
        size = info.itemsize
        return self.read_bytes(info.file, info.offset + start * size, (stop - start) * size)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> ChunkReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class OutputTensor:
    """Where one output tensor's bytes go: shard file (name in the output folder) and absolute offset."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: str
    offset: int

    @property
    def itemsize(self) -> int:
        return ITEMSIZES[self.dtype]

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


@dataclass(frozen=True)
class OutputShard:
    file: str
    header: bytes
    size: int


@dataclass(frozen=True)
class ShardPlan:
    """The output files, fixed by the tensors' names, shapes and dtypes alone (never by the worker count)."""

    shards: tuple[OutputShard, ...]
    tensors: Mapping[str, OutputTensor]

    @property
    def total_bytes(self) -> int:
        return sum(t.numel * t.itemsize for t in self.tensors.values())

    def index(self) -> dict[str, object]:
        weight_map = {name: self.tensors[name].file for name in sorted(self.tensors)}
        return {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}


def plan_shards(
    tensors: Sequence[tuple[str, str, tuple[int, ...]]], max_shard_bytes: int = MAX_SHARD_BYTES
) -> ShardPlan:
    """Pack (name, dtype, shape) in the given order into shards of at most ``max_shard_bytes`` (a larger tensor
    gets a shard of its own). Inside a shard, tensors are laid out by decreasing item size, then in order, so
    every tensor starts aligned to its item size, as the safetensors library itself does."""
    groups: list[list[tuple[str, str, tuple[int, ...]]]] = [[]]
    used = 0
    for entry in tensors:
        nbytes = int(np.prod(entry[2], dtype=np.int64)) * ITEMSIZES[entry[1]]
        if groups[-1] and used + nbytes > max_shard_bytes:
            groups.append([])
            used = 0
        groups[-1].append(entry)
        used += nbytes
    count = len(groups)
    shards, placed = [], {}
    for number, group in enumerate(groups, start=1):
        file = f"model-{number:05d}-of-{count:05d}.safetensors"
        shard, outputs = _layout_shard(file, group)
        shards.append(shard)
        placed.update(outputs)
    return ShardPlan(tuple(shards), placed)


def _layout_shard(file: str, group: list[tuple[str, str, tuple[int, ...]]]) -> tuple[OutputShard, dict]:
    ordered = sorted(group, key=lambda entry: -ITEMSIZES[entry[1]])  # stable: keeps storage order
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    position = 0
    for name, dtype, shape in ordered:
        nbytes = int(np.prod(shape, dtype=np.int64)) * ITEMSIZES[dtype]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [position, position + nbytes]}
        position += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    start = 8 + len(raw)
    outputs = {
        name: OutputTensor(name, dtype, shape, file, start + header[name]["data_offsets"][0])  # type: ignore[index]
        for name, dtype, shape in ordered
    }
    return OutputShard(file, struct.pack("<Q", len(raw)) + raw, start + position), outputs


def create_shards(plan: ShardPlan, folder: Path) -> None:
    """Create every output file at its final size with its header written; workers fill in the data."""
    for shard in plan.shards:
        with (folder / shard.file).open("wb") as handle:
            handle.write(shard.header)
            handle.truncate(shard.size)


class ShardWriter:
    """Writes element ranges of output tensors into the pre-created shard files with ``os.pwrite``."""

    def __init__(self, folder: Path) -> None:
        self._folder = folder
        self._fds: dict[str, int] = {}

    def write(self, tensor: OutputTensor, start: int, data: np.ndarray) -> None:
        """Write the raw bytes ``data`` of elements from ``start`` on."""
        fd = self._fds.get(tensor.file)
        if fd is None:
            fd = self._fds[tensor.file] = os.open(self._folder / tensor.file, os.O_WRONLY)
        written = os.pwrite(fd, data, tensor.offset + start * tensor.itemsize)
        if written != len(data):
            raise MergeError(f"{self._folder / tensor.file}: short write ({written} of {len(data)} bytes)")

    def close(self) -> None:
        """Close every descriptor: on shared storage (NFS) this is what makes the data visible to other nodes."""
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def copy_aux_files(source: Path, folder: Path, dtype: str | None) -> None:
    """Copy config, generation config and tokenizer files; record a changed dtype in config.json."""
    for name in AUX_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, folder / name)
    config_path = folder / "config.json"
    if dtype is not None and config_path.is_file():
        config = json.loads(config_path.read_text())
        config["dtype"] = CONFIG_DTYPE_NAMES[dtype]
        if "torch_dtype" in config:  # the name transformers < 5 wrote
            config["torch_dtype"] = CONFIG_DTYPE_NAMES[dtype]
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


@contextlib.contextmanager
def staged_folder(out: Path, overwrite: bool) -> Iterator[Path]:
    """A temporary folder next to ``out`` that becomes ``out`` only if the block succeeds.

    On any error the temporary folder (and any parent folder this call created) is removed and an existing
    ``out`` is left untouched; with ``overwrite`` the old ``out`` is replaced only after the new one is complete.
    """
    check_output(out, overwrite)
    created = [parent for parent in (out.parent, *out.parent.parents) if not parent.exists()]
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        yield staging
        _publish(staging, out, overwrite)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        for parent in created:
            with contextlib.suppress(OSError):
                parent.rmdir()
        raise


def check_output(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        raise MergeError(f"output folder {out} already exists; pass --overwrite to replace it")
    if out.exists() and not out.is_dir():
        raise MergeError(f"output {out} exists and is not a folder")


def _publish(staging: Path, out: Path, overwrite: bool) -> None:
    if not out.exists():
        os.rename(staging, out)
        return
    check_output(out, overwrite)
    retired = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
    os.rename(out, retired)
    os.rename(staging, out)
    shutil.rmtree(retired, ignore_errors=True)
