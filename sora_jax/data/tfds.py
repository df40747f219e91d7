"""TFDS datasets as clip sources: ``tfds:NAME[/CONFIG][:VERSION][:SPLIT]`` specs.

A dataset a lab already has in TensorFlow Datasets form can be used wherever a records prefix
is accepted (``data_pipelines.encode``'s input, through :func:`open_records`), provided it was
prepared with ``file_format="array_record"``: it is then read with ``tfds.data_source``, a
random-access source over the ArrayRecord shards, and **TensorFlow is not needed** (nor
installed by the ``tfds`` extra). Datasets prepared as TFRecord (TFDS's default) cannot be read
this way; build them again with ``file_format="array_record"`` (TFDS's prepare step).

Records come back as plain dicts shaped like :func:`sora_jax.data.records.read_dataset`'s:
``Text`` features are ``str`` (TFDS returns ``bytes``), tensors are numpy arrays and scalars
are Python scalars. A clip dataset needs ``video`` uint8 (T, H, W, 3) and ``caption`` (Text);
``data_pipelines/tfds_moving_mnist.py`` builds one.

``tensorflow_datasets`` is an optional dependency (``pip install 'sora-jax[tfds]'``); it is
imported only when a ``tfds:`` spec is opened or fingerprinted, so the rest of sora-jax works
without it.

Spec grammar (``parse_tfds_spec``)::

    tfds:NAME[/CONFIG][:VERSION][:SPLIT]

    tfds:moving_mnist_captioned                 split "train", latest prepared version
    tfds:moving_mnist_captioned:eval
    tfds:moving_mnist_captioned:1.0.0:eval      a pinned version (X.Y.Z, "*" allowed for Y, Z)
    tfds:some_ds/some_config:test[:10%]         a config, and a TFDS split slice

``NAME[/CONFIG][:VERSION]`` is passed to TFDS as the dataset name (its own
``name[/config][:version]`` syntax); a colon-separated part that looks like a version X.Y.Z
is the version, anything after it the split.

The data directory: an explicit ``data_dir`` argument, else the ``TFDS_DATA_DIR`` environment
variable read at call time, else ``~/tensorflow_datasets`` (TFDS's own default; TFDS reads the
variable once at import, these functions read it on every call, so setting it later works).
"""
from __future__ import annotations

import hashlib
import os
import re
from typing import Any, Optional

import numpy as np

from sora_jax.data import records
from sora_jax.io import file_sha256

__all__ = [
    "PREFIX",
    "is_tfds_spec",
    "parse_tfds_spec",
    "tfds_data_dir",
    "read_tfds",
    "tfds_fingerprint",
    "open_records",
    "records_fingerprint",
]

PREFIX = "tfds:"
_FORM = "tfds:NAME[/CONFIG][:VERSION][:SPLIT] (e.g. 'tfds:moving_mnist_captioned:eval')"
_INSTALL = "pip install 'sora-jax[tfds]'"

_NAME = r"[a-z][a-z0-9_]*(?:/[A-Za-z0-9_.+=,-]+){0,2}"
_VERSION = r"\d+\.(?:\d+|\*)\.(?:\d+|\*)"
_SPLIT_PART = r"[A-Za-z0-9_]+(?:\[[^\]\s]*\])?"
_SPEC_RE = re.compile(
    rf"(?P<name>{_NAME})(?::(?P<version>{_VERSION}))?(?::(?P<split>{_SPLIT_PART}(?:\+{_SPLIT_PART})*))?"
)


def _import_tfds():
    """``tensorflow_datasets``, or an ImportError that says how to install it."""
    try:
        import tensorflow_datasets
    except ImportError as e:
        raise ImportError(
            f"reading TFDS datasets (tfds:... specs) needs tensorflow-datasets: {_INSTALL} "
            f"(TensorFlow itself is not needed; datasets must be prepared as array_record). "
            f"Import failed: {e}"
        ) from e
    return tensorflow_datasets


def is_tfds_spec(spec: Any) -> bool:
    """True when ``spec`` is a str starting with ``"tfds:"`` (well-formed or not: use
    ``parse_tfds_spec`` to validate). Paths and other objects give False."""
    return isinstance(spec, str) and spec.startswith(PREFIX)


def parse_tfds_spec(spec: str) -> tuple[str, str]:
    """Split a ``tfds:NAME[/CONFIG][:VERSION][:SPLIT]`` spec into TFDS's name and split.

    Args:
      spec: e.g. ``"tfds:moving_mnist_captioned"``, ``"tfds:moving_mnist_captioned:eval"``,
        ``"tfds:moving_mnist_captioned:1.0.0:eval"``, ``"tfds:ds/config:train[:10%]+test"``.
        NAME is snake_case (lower-case letters, digits, ``_``, starting with a letter);
        VERSION is X.Y.Z (Y and Z may be ``*``); SPLIT is a TFDS split expression (names of
        letters, digits and ``_``, optional ``[...]`` slices, joined with ``+``).

    Returns:
      ``(name, split)``: ``name`` is what ``tfds.builder`` / ``tfds.data_source`` take,
      ``"NAME[/CONFIG][:VERSION]"`` (version kept); ``split`` defaults to ``"train"``.

    Raises:
      ValueError: not a str starting with ``tfds:``, or not of the form above; the message
        shows the expected form.
    """
    if not is_tfds_spec(spec):
        raise ValueError(f"not a TFDS spec: {spec!r}; expected {_FORM}")
    m = _SPEC_RE.fullmatch(spec[len(PREFIX):])
    if m is None:
        raise ValueError(f"malformed TFDS spec {spec!r}; expected {_FORM}")
    name = m["name"] + (f":{m['version']}" if m["version"] else "")
    return name, m["split"] or "train"


def tfds_data_dir(data_dir: Optional[str] = None) -> str:
    """The TFDS data directory used: ``data_dir`` if given, else ``$TFDS_DATA_DIR`` (read now),
    else ``~/tensorflow_datasets``."""
    if data_dir:
        return os.fspath(data_dir)
    return os.environ.get("TFDS_DATA_DIR") or os.path.join(os.path.expanduser("~"),
                                                           "tensorflow_datasets")


def _prepared_builder(spec: str, data_dir: Optional[str]):
    """(tfds module, builder, name, split, data_dir) of a prepared dataset; see ``read_tfds``."""
    name, split = parse_tfds_spec(spec)
    tfds = _import_tfds()
    data_dir = tfds_data_dir(data_dir)
    hint = (f"prepare it there with file_format='array_record' (for the captioned Moving MNIST: "
            f"`python -m data_pipelines.tfds_moving_mnist --data-dir {data_dir}`), or point "
            f"data_dir / TFDS_DATA_DIR at the folder that holds it")
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except (tfds.core.registered.DatasetNotFoundError, AssertionError) as e:
        # DatasetNotFoundError: no builder class and nothing prepared under that name/version.
        # AssertionError: a registered builder class that cannot give the requested version.
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FileNotFoundError(
            f"TFDS dataset {name!r} ({spec}) not found in {data_dir} ({first}): {hint}") from e
    if not builder.is_prepared():
        raise FileNotFoundError(
            f"TFDS dataset {name!r} ({spec}) is not prepared in {data_dir} "
            f"(no {builder.data_dir}): {hint}")
    fmt = getattr(builder.info.file_format, "value", builder.info.file_format)
    if str(fmt) != "array_record":
        raise ValueError(
            f"TFDS dataset {name!r} in {builder.data_dir} is stored as {fmt}; reading without "
            f"TensorFlow needs array_record: prepare it again with file_format='array_record'")
    try:
        builder.info.splits[split]
    except (KeyError, ValueError) as e:
        raise ValueError(
            f"TFDS dataset {name!r} has no split {split!r} (splits: "
            f"{sorted(builder.info.splits.keys())}): {e}") from e
    return tfds, builder, name, split, data_dir


def _text_paths(features) -> list[tuple[str, ...]]:
    """Key paths of the ``Text`` features in a (nested) ``FeaturesDict``."""
    import tensorflow_datasets as tfds

    out = []
    for key, feature in features.items():
        if isinstance(feature, tfds.features.Text):
            out.append((key,))
        elif isinstance(feature, tfds.features.FeaturesDict):
            out.extend((key,) + sub for sub in _text_paths(feature))
    return out


def _to_str(value: Any) -> Any:
    return value.decode("utf-8") if isinstance(value, bytes) else value


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, np.generic):
        return value.item()
    return value


class _PlainRecord:
    """Picklable map function: TFDS example dict -> plain record (Text paths decoded to str)."""

    def __init__(self, text_paths: list[tuple[str, ...]]):
        self._text_paths = [tuple(p) for p in text_paths]

    def __call__(self, example: dict) -> dict:
        out = _plain(dict(example))
        for path in self._text_paths:
            node = out
            for key in path[:-1]:
                node = node.get(key) if isinstance(node, dict) else None
            if isinstance(node, dict) and path[-1] in node:
                node[path[-1]] = _to_str(node[path[-1]])
        return out


def read_tfds(spec: str, data_dir: Optional[str] = None):
    """Open a prepared TFDS dataset split as a Grain ``MapDataset`` of plain dict records.

    Args:
      spec: ``tfds:NAME[/CONFIG][:VERSION][:SPLIT]`` (see ``parse_tfds_spec``).
      data_dir: TFDS data directory (default ``$TFDS_DATA_DIR``, else ``~/tensorflow_datasets``).
        Only this directory is searched; nothing is downloaded or prepared.

    Returns:
      ``grain.MapDataset`` with one element per example of the split, in the stored order
      (TFDS shuffles examples when it writes them, deterministically per example key). Each
      element is a dict of the dataset's features: ``Text`` features (top level or in nested
      ``FeaturesDict``) as ``str``, tensors as numpy arrays of their feature dtype (e.g.
      ``video`` uint8 (T, H, W, 3) for a clip dataset), scalars as Python scalars, nested
      ``FeaturesDict`` as nested dicts. Other string data (``Sequence(Text)``, string
      tensors) is left as TFDS returns it (bytes / object arrays).

    Raises:
      ValueError: malformed spec, unknown split, or the dataset is not stored as array_record.
      FileNotFoundError: the dataset (or that version / config) is not prepared in the data dir.
      ImportError: tensorflow-datasets is not installed (message: ``pip install 'sora-jax[tfds]'``).
    """
    import grain

    _, builder, _, split, _ = _prepared_builder(spec, data_dir)
    source = builder.as_data_source(split=split)
    return grain.MapDataset.source(source).map(_PlainRecord(_text_paths(builder.info.features)))


def _local_stat(path) -> tuple[int, int]:
    """(size bytes, mtime ns) of a file, local or on an etils.epath backend (mtime then s)."""
    p = os.fspath(path)
    if "://" not in p:
        st = os.stat(p)
        return int(st.st_size), int(st.st_mtime_ns)
    st = path.stat()
    return int(st.length), int(st.mtime) * 1_000_000_000


def tfds_fingerprint(spec: str, data_dir: Optional[str] = None) -> dict:
    """What identifies a prepared TFDS split (for reuse stamps such as ``encode``'s).

    Args:
      spec, data_dir: as for ``read_tfds``.

    Returns:
      JSON-able dict: ``kind`` "tfds", ``name`` (as in the spec, version included if given),
      ``full_name`` (TFDS's ``name[/config]/version`` of the dataset found), ``version``,
      ``split``, ``count`` (examples in the split or slice), ``info_sha256`` (SHA-256 over the
      names and bytes of the JSON files of the prepared version folder: ``dataset_info.json``,
      ``features.json``, ``metadata.json`` when present) and ``files``: ``[name, size bytes,
      mtime ns]`` per shard file the split reads, sorted. A rebuilt dataset has new shard
      mtimes (and usually new info), so stamps made from the old one no longer match. The data
      directory's path is not part of it.

    Raises:
      as ``read_tfds``.
    """
    tfds, builder, name, split, _ = _prepared_builder(spec, data_dir)
    from etils import epath

    folder = epath.Path(builder.data_dir)
    h = hashlib.sha256()
    for fname in ("dataset_info.json", "features.json", "metadata.json"):
        p = folder / fname
        if p.exists():
            h.update(fname.encode() + b"\0" + p.read_bytes() + b"\0")
    split_info = builder.info.splits[split]
    files = []
    for p in sorted(split_info.filepaths, key=os.fspath):
        size, mtime = _local_stat(p)
        files.append([p.name, size, mtime])
    return dict(kind="tfds", name=name, full_name=str(builder.info.full_name),
                version=str(builder.info.version), split=split,
                count=int(split_info.num_examples), info_sha256=h.hexdigest(), files=files)


def open_records(spec: str, data_dir: Optional[str] = None):
    """A records prefix or a ``tfds:`` spec, opened as a Grain ``MapDataset`` of dict records.

    Args:
      spec: ``tfds:NAME[/CONFIG][:VERSION][:SPLIT]`` (read with ``read_tfds``) or a prefix of
        ``sora_jax.data.records`` shards (read with ``records.read_dataset``).
      data_dir: TFDS data directory for ``tfds:`` specs (ignored for prefixes).

    Raises:
      FileNotFoundError: the dataset is missing. ValueError: malformed ``tfds:`` spec, unknown
      split, or a TFDS dataset not stored as array_record. ImportError: a ``tfds:`` spec without
      tensorflow-datasets installed.
    """
    if is_tfds_spec(spec):
        return read_tfds(spec, data_dir)
    return records.read_dataset(spec)


def records_fingerprint(spec: str, data_dir: Optional[str] = None) -> dict:
    """What identifies the dataset ``open_records(spec, data_dir)`` reads (JSON-able dict).

    For a records prefix: ``count``, ``meta_sha256`` (of ``<prefix>.meta.json``) and ``shards``
    (``[file name, size bytes, mtime ns]`` per shard): a rebuilt dataset with the same counts
    and shapes (e.g. edited captions) has new shard mtimes, so it no longer matches. For a
    ``tfds:`` spec: ``tfds_fingerprint``.

    Raises:
      FileNotFoundError: the dataset is missing (or, for a prefix, a shard). Others as
      ``open_records``.
    """
    if is_tfds_spec(spec):
        return tfds_fingerprint(spec, data_dir)
    meta = records.read_meta(spec)
    directory = os.path.dirname(os.path.abspath(spec))
    shards = []
    for name in meta["shards"]:
        st = os.stat(os.path.join(directory, name))
        shards.append([name, st.st_size, st.st_mtime_ns])
    return dict(count=int(meta["count"]), meta_sha256=file_sha256(spec + ".meta.json"),
                shards=shards)
