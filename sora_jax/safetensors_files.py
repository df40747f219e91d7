"""Reading safetensors checkpoints one tensor at a time: single files, model folders and sharded
folders (``*.safetensors.index.json``), bfloat16 included.

The ``safetensors`` library reads whole files into numpy only for dtypes numpy has (no
bfloat16), and its readers memory-map the file, so every tensor read stays resident in the
process until the file is closed. Importing a model whose size is most of the host's memory
needs neither: :class:`SafetensorsReader` parses the header (the format's JSON: dtype, shape
and byte range per tensor; https://github.com/huggingface/safetensors#format) and reads each
tensor with one ``np.fromfile`` into its own buffer, which is freed as soon as the caller drops
it. bfloat16 tensors come back as ``ml_dtypes.bfloat16`` arrays (the type JAX uses).
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Iterator, Mapping, NamedTuple

import ml_dtypes
import numpy as np

__all__ = ["SafetensorsReader", "TensorInfo"]

DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
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
