"""Reading and writing safetensors checkpoints one tensor at a time: single files, model folders and
sharded folders (``*.safetensors.index.json``), bfloat16 included.

The ``safetensors`` library reads whole files into numpy only for dtypes numpy has (no
bfloat16), and its readers memory-map the file, so every tensor read stays resident in the
process until the file is closed. Importing a model whose size is most of the host's memory
needs neither: :class:`SafetensorsReader` parses the header (the format's JSON: dtype, shape
and byte range per tensor; https://github.com/huggingface/safetensors#format) and reads each
tensor with one ``np.fromfile`` into its own buffer, which is freed as soon as the caller drops
it. bfloat16 tensors come back as ``ml_dtypes.bfloat16`` arrays (the type JAX uses).

Writing is ours too: the library's ``save_file`` takes every tensor at once and serializes them
all into one bytes object before writing (twice the model in host memory), and it has no
streaming writer. :func:`write_safetensors` writes the header from each tensor's key, shape and
dtype alone (:class:`TensorSpec`), then fetches, writes and drops one tensor at a time, so the
peak host memory is about one tensor; :func:`write_sharded` splits a model into
``model-0000k-of-0000N.safetensors`` shards plus ``model.safetensors.index.json`` as
transformers and diffusers write them.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any, Callable, Iterable, Iterator, Mapping, NamedTuple

import ml_dtypes
import numpy as np

__all__ = ["SafetensorsReader", "TensorInfo", "TensorSpec", "shard_name", "tensor_spec", "write_safetensors",
           "write_sharded"]

DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8,
    "U64": np.uint64, "U32": np.uint32, "U16": np.uint16, "U8": np.uint8, "BOOL": np.bool_,
}
# numpy dtype -> the format's dtype name (for writing)
DTYPE_NAMES = {np.dtype(v): k for k, v in DTYPES.items()}
INDEX_SUFFIX = ".safetensors.index.json"


class TensorInfo(NamedTuple):
    """Where one tensor lives: its file, numpy dtype, shape and absolute byte offset."""

    file: pathlib.Path
    dtype: np.dtype
    shape: tuple[int, ...]
    offset: int

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


def _header(path: pathlib.Path) -> dict[str, TensorInfo]:
    size = path.stat().st_size
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if n <= 0 or 8 + n > size:
            raise ValueError(f"{path}: not a safetensors file (header length {n}, file size {size})")
        header = json.loads(f.read(n))
    out = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        if info.get("dtype") not in DTYPES:
            raise ValueError(f"{path}: tensor {key} has unsupported dtype {info.get('dtype')}")
        t = TensorInfo(path, np.dtype(DTYPES[info["dtype"]]), tuple(int(d) for d in info["shape"]),
                       8 + n + int(info["data_offsets"][0]))
        if info["data_offsets"][1] - info["data_offsets"][0] != t.nbytes or t.offset + t.nbytes > size:
            raise ValueError(f"{path}: tensor {key} ({info['dtype']}, {t.shape}) does not fit its byte range")
        out[key] = t
    return out


def _files(path: pathlib.Path) -> list[pathlib.Path]:
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"no safetensors file or folder at {path}")
    indexes = sorted(path.glob(f"*{INDEX_SUFFIX}"))
    if len(indexes) > 1:
        raise FileNotFoundError(f"{path} holds several index files: {[p.name for p in indexes]}")
    if indexes:
        names = sorted(set(json.loads(indexes[0].read_text())["weight_map"].values()))
        missing = [n for n in names if not (path / n).is_file()]
        if missing:
            raise FileNotFoundError(f"{indexes[0]} names shards that are not in {path}: {missing}")
        return [path / n for n in names]
    files = sorted(path.glob("*.safetensors"))
    if len(files) != 1:
        raise FileNotFoundError(f"expected one .safetensors file or a *{INDEX_SUFFIX} in {path}, "
                                f"found {[p.name for p in files]}")
    return files


class SafetensorsReader(Mapping[str, np.ndarray]):
    """A read-only mapping key -> tensor over a safetensors file or model folder; a tensor is read
    from disk when it is looked up, into a fresh numpy array, and nothing is cached.

    Args:
      path: a ``.safetensors`` file, or a folder with one ``.safetensors`` file or a
        ``*.safetensors.index.json`` naming its shards (diffusers' and transformers' layouts).

    Raises:
      FileNotFoundError: no file, no (single) safetensors file in the folder, or missing shards.
      ValueError: a malformed header, an unsupported dtype, or a key in two shards.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = pathlib.Path(path)
        self.files = _files(self.path)
        self.info: dict[str, TensorInfo] = {}
        for f in self.files:
            for key, t in _header(f).items():
                if key in self.info:
                    raise ValueError(f"tensor {key} is in both {self.info[key].file.name} and {f.name}")
                self.info[key] = t

    def __getitem__(self, key: str) -> np.ndarray:
        t = self.info[key]
        count = int(np.prod(t.shape, dtype=np.int64))
        return np.fromfile(t.file, dtype=t.dtype, count=count, offset=t.offset).reshape(t.shape)

    def __iter__(self) -> Iterator[str]:
        return iter(self.info)

    def __len__(self) -> int:
        return len(self.info)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """key -> shape, from the headers alone."""
        return {k: t.shape for k, t in self.info.items()}

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data over all files."""
        return sum(t.nbytes for t in self.info.values())

    @property
    def largest_nbytes(self) -> int:
        """Bytes of the largest tensor."""
        return max((t.nbytes for t in self.info.values()), default=0)


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


class TensorSpec(NamedTuple):
    """One tensor to write, known by its key, shape and dtype before its values exist:
    ``fetch()`` returns the array (shape ``shape``, dtype ``dtype``) when the writer reaches it,
    e.g. a device-to-host copy, a cast or a layout conversion; the writer drops it after writing."""

    key: str
    shape: tuple[int, ...]
    dtype: np.dtype
    fetch: Callable[[], np.ndarray]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


def tensor_spec(key: str, array: Any) -> TensorSpec:
    """A :class:`TensorSpec` for an array that already exists (numpy, or a ``jax.Array`` which is
    copied to host only when fetched)."""
    return TensorSpec(key, tuple(int(d) for d in array.shape), np.dtype(array.dtype), lambda: np.asarray(array))


def _specs(tensors: Iterable[TensorSpec | tuple[str, Any]]) -> list[TensorSpec]:
    out = []
    for t in tensors:
        out.append(t if isinstance(t, TensorSpec) else tensor_spec(*t))
    return out


def _check_metadata(metadata: Mapping[str, str] | None) -> dict[str, str] | None:
    if metadata is None:
        return None
    bad = {k: v for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)}
    if bad:
        raise TypeError(f"safetensors metadata maps str to str; not: {bad}")
    return dict(metadata)


def write_safetensors(path: str | os.PathLike, tensors: Iterable[TensorSpec | tuple[str, Any]],
                      metadata: Mapping[str, str] | None = None) -> int:
    """Writes one safetensors file (https://github.com/huggingface/safetensors#format), one tensor
    at a time.

    Layout: 8-byte little-endian header length N; N bytes of JSON: ``{"__metadata__": {...},
    key: {"dtype": "F32", "shape": [...], "data_offsets": [begin, end]}, ...}`` padded with
    spaces to a multiple of 8 (as the library pads it, so every tensor starts 8-byte aligned);
    then the tensors' little-endian bytes, C order, largest item size first (the library's
    order: no tensor straddles its own alignment), otherwise in the order given.

    Args:
      path: the file to write (overwritten).
      tensors: :class:`TensorSpec` s, or (key, array) pairs; the header is written from their
        shapes and dtypes before the first ``fetch``.
      metadata: the header's ``__metadata__``, str -> str (e.g. provenance); None: none.

    Returns:
      the file's size in bytes.

    Raises:
      ValueError: a duplicate or reserved key, a dtype the format has no name for, or a fetched
        array whose shape or dtype is not its spec's (the file is then incomplete: write into a
        folder that is renamed only on success).
      TypeError: metadata that is not str -> str.
    """
    specs = _specs(tensors)
    metadata = _check_metadata(metadata)
    seen: set[str] = set()
    for t in specs:
        if t.key in seen or t.key == "__metadata__":
            raise ValueError(f"tensor key {t.key!r} is {'reserved' if t.key == '__metadata__' else 'duplicated'}")
        seen.add(t.key)
        if np.dtype(t.dtype) not in DTYPE_NAMES:
            raise ValueError(f"tensor {t.key}: dtype {np.dtype(t.dtype)} has no safetensors name")
    specs = sorted(specs, key=lambda t: -np.dtype(t.dtype).itemsize)  # stable: the given order within a size
    header: dict[str, Any] = {} if metadata is None else {"__metadata__": metadata}
    offset = 0
    for t in specs:
        header[t.key] = {"dtype": DTYPE_NAMES[np.dtype(t.dtype)], "shape": list(t.shape),
                         "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for t in specs:
            a = t.fetch()
            if tuple(a.shape) != tuple(t.shape) or a.dtype != np.dtype(t.dtype):
                raise ValueError(f"tensor {t.key}: fetched {a.dtype} {tuple(a.shape)}, the header says "
                                 f"{np.dtype(t.dtype)} {tuple(t.shape)}")
            a = np.ascontiguousarray(a)
            if a.dtype.byteorder == ">":
                a = a.astype(a.dtype.newbyteorder("<"))
            # a uint8 view writes the buffer as it is (tobytes() would copy the tensor once more)
            f.write(a.reshape(-1).view(np.uint8).data)
            del a
        size = f.tell()
    if size != 8 + len(raw) + offset:
        raise ValueError(f"{path}: wrote {size} bytes, expected {8 + len(raw) + offset}")
    return size


def shard_name(prefix: str, index: int, count: int) -> str:
    """transformers' / diffusers' shard file name: ``{prefix}-0000k-of-0000N.safetensors``
    (``index`` counts from 1)."""
    return f"{prefix}-{index:05d}-of-{count:05d}.safetensors"


def write_sharded(folder: str | os.PathLike, tensors: Iterable[TensorSpec | tuple[str, Any]], *,
                  prefix: str = "model", max_shard_bytes: int = 5 * 2**30,
                  metadata: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Writes a model's tensors into ``folder`` as transformers and diffusers save them: one file
    ``{prefix}.safetensors`` when the tensor bytes fit in ``max_shard_bytes``; otherwise shards
    :func:`shard_name` filled in the order given (a new shard starts when the next tensor would
    overflow; a tensor larger than the limit gets a shard of its own) plus
    ``{prefix}.safetensors.index.json``: ``{"metadata": {"total_size": bytes}, "weight_map":
    {key: file}}``. Every file carries ``metadata``.

    Args:
      folder: an existing folder.
      tensors: as :func:`write_safetensors`.
      prefix: "model" (transformers) or "diffusion_pytorch_model" (diffusers).
      max_shard_bytes: the most tensor bytes in one file (> 0).
      metadata: each file's ``__metadata__``.

    Returns:
      ``files`` (names, in order), ``index`` (the index file's name, or None), ``bytes`` (tensor
      bytes), ``file_bytes`` (name -> file size) and ``tensors`` (count).

    Raises:
      ValueError: ``max_shard_bytes`` < 1, or as :func:`write_safetensors`.
    """
    if max_shard_bytes < 1:
        raise ValueError(f"max_shard_bytes must be >= 1, got {max_shard_bytes}")
    folder = pathlib.Path(folder)
    specs = _specs(tensors)
    metadata = _check_metadata(metadata)
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for t in specs:
        if shards[-1] and size + t.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    total = sum(t.nbytes for t in specs)
    if len(shards) == 1:
        names = [f"{prefix}.safetensors"]
    else:
        names = [shard_name(prefix, i + 1, len(shards)) for i in range(len(shards))]
    file_bytes = {}
    for name, part in zip(names, shards):
        file_bytes[name] = write_safetensors(folder / name, part, metadata)
    index = None
    if len(shards) > 1:
        index = f"{prefix}{INDEX_SUFFIX}"
        weight_map = {t.key: name for name, part in zip(names, shards) for t in part}
        (folder / index).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                               indent=2) + "\n")
    return dict(files=names, index=index, bytes=total, file_bytes=file_bytes, tensors=len(specs))
