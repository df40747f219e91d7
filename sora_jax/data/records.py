"""Example <-> bytes serialisation and ArrayRecord shards read back through Grain.

Serialisation format: MessagePack (the ``msgpack`` package, a required dependency of Flax, so
always installed with sora-jax). A record is one msgpack map from field name to value. Python
``str`` / ``bytes`` / ``int`` / ``float`` / ``bool`` / ``None`` are native msgpack values; numpy
arrays (and numpy scalars, which come back as 0-d arrays) are msgpack extension objects holding
``[dtype.str, shape, raw bytes]``, optionally deflated with zlib. Nothing is ever unpickled, so a
record read from disk cannot execute code, and dtype, byte order and shape are kept exactly.
(We measured ``np.savez`` first: its zip container costs ~0.3 ms per field, 10x msgpack.)

Shard layout for a dataset with prefix ``P`` and ``N`` shards::

    P-00000-of-0000N.array_record ... P-0000{N-1}-of-0000N.array_record
    P.meta.json      count, shard files, field shapes/dtypes summary, user metadata (seed, args)

Examples are written round-robin (example ``i`` goes to shard ``i % N`` at position ``i // N``)
so that writing streams with constant memory; ``read_dataset`` undoes the interleave, so index
``i`` of the returned dataset is the ``i``-th example written.
"""
from __future__ import annotations

import collections
import glob
import json
import os
import zlib
from typing import Any, Iterable, Mapping, Optional, Sequence, SupportsIndex

import msgpack
import numpy as np

__all__ = [
    "FORMAT",
    "encode_record",
    "decode_record",
    "shard_paths",
    "write_array_record",
    "read_meta",
    "read_dataset",
]

FORMAT = "sora-jax/msgpack-in-array_record/v1"
_VERSION_KEY = "__sora_jax_record__"
_EXT_ARRAY = 1
_EXT_ARRAY_ZLIB = 2
# Deflating tiny arrays costs more than it saves; 256 bytes keeps labels and positions raw.
_COMPRESS_MIN_BYTES = 256


def _pack_array(arr: np.ndarray, compress: bool) -> msgpack.ExtType:
    if arr.dtype.hasobject or arr.dtype.fields is not None:
        raise TypeError(f"cannot store dtype {arr.dtype} (object and structured dtypes refused)")
    raw = np.ascontiguousarray(arr).tobytes()
    code = _EXT_ARRAY
    if compress and len(raw) >= _COMPRESS_MIN_BYTES:
        # Level 1: most of the gain on mostly-black MNIST frames at a fraction of level 6's time.
        raw, code = zlib.compress(raw, 1), _EXT_ARRAY_ZLIB
    return msgpack.ExtType(code, msgpack.packb([arr.dtype.str, list(arr.shape), raw]))


def _unpack_ext(code: int, payload: bytes):
    if code not in (_EXT_ARRAY, _EXT_ARRAY_ZLIB):
        return msgpack.ExtType(code, payload)
    dtype, shape, raw = msgpack.unpackb(payload, raw=False)
    if code == _EXT_ARRAY_ZLIB:
        raw = zlib.decompress(raw)
    # bytearray gives a writable buffer: consumers may modify decoded arrays in place.
    return np.frombuffer(bytearray(raw), dtype=np.dtype(dtype)).reshape(shape)


def encode_record(example: Mapping[str, Any], compress: bool = False) -> bytes:
    """Serialise one example to bytes (msgpack).

    Args:
      example: dict with ``str`` keys (not starting with ``"__"``) and values that are numpy arrays
        (any numeric / bool / fixed-width string dtype, any shape incl. 0-d), numpy scalars,
        ``str``, ``bytes``, ``int`` (64-bit range), ``float``, ``bool`` or ``None``.
      compress: zlib-deflate arrays of 256 bytes or more; ``decode_record`` reads both forms.

    Returns:
      bytes of one msgpack map.

    Raises:
      TypeError: a key is not a str, a value has an unsupported type (lists, dicts, objects) or
        an object / structured dtype, or an int does not fit in 64 bits.
      ValueError: a key starts with ``"__"`` (reserved).
    """
    out: dict[str, Any] = {_VERSION_KEY: 1}
    for key, value in example.items():
        if not isinstance(key, str):
            raise TypeError(f"record keys must be str, got {type(key).__name__}: {key!r}")
        if key.startswith("__"):
            raise ValueError(f"record key {key!r} is reserved (starts with '__')")
        if isinstance(value, (np.ndarray, np.generic)):
            out[key] = _pack_array(np.asarray(value), compress)
        elif value is None or isinstance(value, (bool, int, float, str, bytes)):
            out[key] = value
        elif isinstance(value, bytearray):
            out[key] = bytes(value)
        else:
            raise TypeError(f"field {key!r}: unsupported value type {type(value).__name__}")
    try:
        return msgpack.packb(out, use_bin_type=True)
    except OverflowError as e:
        raise TypeError(f"an int field does not fit in 64 bits: {e}") from e


def decode_record(data: bytes) -> dict[str, Any]:
    """Inverse of ``encode_record``.

    Args:
      data: bytes produced by ``encode_record``.

    Returns:
      dict field -> value: numpy arrays come back with their dtype and shape (writable); numpy
      scalars come back as 0-d arrays; Python values come back with their type.

    Raises:
      ValueError: the bytes are not a record written by ``encode_record``.
    """
    try:
        out = msgpack.unpackb(data, raw=False, ext_hook=_unpack_ext, strict_map_key=True)
    except Exception as e:  # msgpack raises several unrelated classes for damaged input
        raise ValueError(f"not a sora-jax record ({len(data)} bytes): {e}") from e
    if not isinstance(out, dict) or out.pop(_VERSION_KEY, None) != 1:
        raise ValueError(f"not a sora-jax record ({len(data)} bytes): missing version marker")
    return out


def shard_paths(path_prefix: str, num_shards: int) -> list[str]:
    """``<prefix>-{i:05d}-of-{num_shards:05d}.array_record`` for i in range(num_shards)."""
    return [f"{path_prefix}-{i:05d}-of-{num_shards:05d}.array_record" for i in range(num_shards)]


def _meta_path(path_prefix: str) -> str:
    return f"{path_prefix}.meta.json"


def _summarise(value: Any) -> str:
    if isinstance(value, (np.ndarray, np.generic)):
        arr = np.asarray(value)
        return f"{arr.dtype.str}{list(arr.shape)}"
    return type(value).__name__


def write_array_record(
    path_prefix: str,
    examples: Iterable[Mapping[str, Any]],
    num_shards: int = 1,
    *,
    metadata: Optional[Mapping[str, Any]] = None,
    compress: bool = True,
) -> list[str]:
    """Write examples to ArrayRecord shards plus ``<prefix>.meta.json``.

    Examples are distributed round-robin (example i -> shard i % num_shards); ``read_dataset``
    restores the write order. Every record is its own ArrayRecord group (``group_size:1``) so
    random access reads exactly one record. Shards of the same prefix with a different shard
    count are deleted first so a rebuild never leaves stale files that a glob would pick up.

    Args:
      path_prefix: output path without suffix; its directory is created.
      examples: dicts accepted by ``encode_record``.
      num_shards: number of shard files (>= 1). Shards may be empty if there are fewer examples.
      metadata: JSON-serialisable dict stored under ``"metadata"`` in the meta file (seed,
        builder args, ...).
      compress: deflate arrays (MNIST clips are mostly black and shrink several-fold).

    Returns:
      The shard paths, in shard order.

    Raises:
      ValueError: num_shards < 1. TypeError: see ``encode_record``; metadata not JSON-serialisable.
    """
    from array_record.python.array_record_module import ArrayRecordWriter

    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    directory = os.path.dirname(os.path.abspath(path_prefix))
    os.makedirs(directory, exist_ok=True)
    paths = shard_paths(path_prefix, num_shards)
    for stale in glob.glob(f"{glob.escape(path_prefix)}-?????-of-?????.array_record"):
        if stale not in paths:
            os.remove(stale)
    meta_path = _meta_path(path_prefix)
    if os.path.exists(meta_path):
        # Removed first so that an interrupted write never looks complete.
        os.remove(meta_path)

    fields: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    counts = [0] * num_shards
    writers = [ArrayRecordWriter(p, "group_size:1") for p in paths]
    try:
        count = 0
        for count_i, example in enumerate(examples):
            writers[count_i % num_shards].write(encode_record(example, compress=compress))
            counts[count_i % num_shards] += 1
            for key, value in example.items():
                fields[key][_summarise(value)] += 1
            count = count_i + 1
    finally:
        for w in writers:
            w.close()

    meta = {
        "format": FORMAT,
        "count": count,
        "num_shards": num_shards,
        "shards": [os.path.basename(p) for p in paths],
        "shard_counts": counts,
        "order": "round_robin",
        # Most common shapes per field; capped so meta files stay readable for varied data.
        "fields": {k: dict(c.most_common(32)) for k, c in sorted(fields.items())},
        "metadata": dict(metadata or {}),
    }
    with open(meta_path + ".tmp", "w") as f:
        json.dump(meta, f, indent=1, sort_keys=True)
    os.replace(meta_path + ".tmp", meta_path)
    return paths


def read_meta(path_prefix: str) -> dict:
    """The ``<prefix>.meta.json`` written by ``write_array_record``.

    Raises:
      FileNotFoundError: the dataset has not been built (message names ``sora-jax prepare-data``).
    """
    path = _meta_path(path_prefix)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"dataset {path_prefix!r} is missing (no {path}); build it with `sora-jax prepare-data`"
        )
    with open(path) as f:
        return json.load(f)


class _RoundRobinSource:
    """Random-access view over round-robin shards, indexed in write order.

    ArrayRecordDataSource concatenates shards (all of shard 0, then shard 1, ...). Global write
    index i lives in shard i % n at position i // n; this maps one onto the other.
    Module-level and built from picklable parts so Grain worker processes can receive it.
    """

    def __init__(self, source, shard_counts: Sequence[int]):
        self._source = source
        self._counts = list(shard_counts)
        self._n = len(self._counts)
        self._offsets = np.concatenate([[0], np.cumsum(self._counts)[:-1]]).astype(np.int64)
        self._len = int(sum(self._counts))

    def __len__(self) -> int:
        return self._len

    def _key(self, index: SupportsIndex) -> int:
        i = int(index)
        if i < 0:
            i += self._len
        if not 0 <= i < self._len:
            raise IndexError(f"record index {int(index)} out of range for {self._len} records")
        return int(self._offsets[i % self._n]) + i // self._n

    def __getitem__(self, index: SupportsIndex) -> bytes:
        return self._source[self._key(index)]

    def __getitems__(self, indices: Sequence[SupportsIndex]) -> Sequence[bytes]:
        keys = [self._key(i) for i in indices]
        if hasattr(self._source, "__getitems__"):
            return self._source.__getitems__(keys)
        return [self._source[k] for k in keys]

    def __repr__(self) -> str:
        return f"RoundRobin({self._source!r}, records={self._len})"


def read_dataset(path_prefix: str, *, decode: bool = True):
    """Open shards written by ``write_array_record`` as a Grain ``MapDataset``.

    Args:
      path_prefix: the prefix given to ``write_array_record``.
      decode: map ``decode_record`` over the records (False: raw bytes).

    Returns:
      ``grain.MapDataset`` of length ``count``; element i is the i-th example written, as a dict
      (see ``decode_record``). Chain ``.shuffle(seed)``, ``.map``, ``.to_iter_dataset()`` as usual.

    Raises:
      FileNotFoundError: meta file or a shard is missing (names ``sora-jax prepare-data``).
    """
    import grain

    meta = read_meta(path_prefix)
    directory = os.path.dirname(os.path.abspath(path_prefix))
    paths = [os.path.join(directory, name) for name in meta["shards"]]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(
            f"dataset {path_prefix!r} is incomplete: missing {missing[:3]}"
            f"{' ...' if len(missing) > 3 else ''}; rebuild it with `sora-jax prepare-data`"
        )
    counts = meta["shard_counts"]
    if meta["count"] == 0:
        return grain.MapDataset.source([])
    source = grain.sources.ArrayRecordDataSource(paths)
    if len(source) != meta["count"]:
        raise ValueError(
            f"dataset {path_prefix!r}: shards hold {len(source)} records, meta says "
            f"{meta['count']}; rebuild it with `sora-jax prepare-data`"
        )
    ds = grain.MapDataset.source(_RoundRobinSource(source, counts) if len(paths) > 1 else source)
    return ds.map(decode_record) if decode else ds
