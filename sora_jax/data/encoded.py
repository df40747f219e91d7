"""The encoded-latent dataset format: what ``sora-jax encode`` writes and the DiT trains on.

``data_pipelines.encode`` encodes a clip dataset with a trained VAE and the text encoder, split
over processes (process i of n encodes input records i, i + n, ...). For output prefix P::

    P-p{i:05d}-of-{n:05d}-0000k-of-0000K.array_record   shards of process i
    P-p{i:05d}-of-{n:05d}.meta.json                     records meta (``records.read_meta``)
    P-p{i:05d}-of-{n:05d}.done.json                     stamp: settings, VAE step, counts

Record::

    latent   float32 (t, h, w, c)  normalised latents, (z - shift) / scale (``VAECodec.encode``)
    text     float32 (m, 384)      text states of the m kept caption tokens ([CLS] ... [SEP],
                                   truncated at the text max length; no padding rows)
    caption  str    source str    kind str ("video" | "image")
    frames   int    height int    width int     (of the input video: frames, pixels)
    fps      float  start_s float  end_s float  (seconds; 0.0 where the input has none)
    index    int    position of the record in the input dataset

:func:`list_encoded` names the per-process prefixes of a complete set and :func:`read_encoded`
opens them all as one ``grain.MapDataset``.
"""

from __future__ import annotations

import collections
import glob
import json
import logging
import math
import os
import re

import grain

from sora_jax.data import records

__all__ = ["list_encoded", "parse_mix", "process_prefix", "read_encoded", "stamp_path"]

log = logging.getLogger("sora_jax.data.encoded")

_PROCESS_RE = re.compile(r"-p(\d{5})-of-(\d{5})\.done\.json$")


def parse_mix(spec: str) -> list[tuple[str, float]]:
    """``"prefix[:weight],prefix[:weight],..."`` (``dit_train.data``) -> [(prefix, weight)];
    weight 1 where none is given (a ':' not followed by a number belongs to the path, as in
    gs://); an empty spec gives [].

    Raises:
      ValueError: an empty prefix, or a weight that is not a finite positive number.
    """
    out = []
    for item in filter(None, (i.strip() for i in spec.split(","))):
        prefix, _, weight = item.rpartition(":")
        try:
            w = float(weight)
        except ValueError:
            prefix, w = item, 1.0
        if not prefix or not (w > 0 and math.isfinite(w)):
            raise ValueError(f"bad entry {item!r} (expected prefix[:positive weight])")
        out.append((prefix, w))
    return out


def process_prefix(output_prefix: str, process_index: int, process_count: int) -> str:
    """``<output_prefix>-p{i:05d}-of-{n:05d}``: the records prefix of one process's output."""
    return f"{output_prefix}-p{process_index:05d}-of-{process_count:05d}"


def stamp_path(prefix: str) -> str:
    """The ``done.json`` stamp of one process's output (written last: its presence means done)."""
    return prefix + ".done.json"


def list_encoded(output_prefix: str) -> list[str]:
    """Per-process prefixes of a complete encoded set, in process order.

    Complete: a ``done.json`` stamp for every process 0..n-1 of one process count n, all made
    with the same settings. If sets for several counts are complete (a re-encode with another
    split), the most recently finished one is used, with a warning.

    Raises:
      FileNotFoundError: no complete set (the message lists what is missing).
      ValueError: the processes of the chosen set were encoded with different settings.
    """
    output_prefix = os.path.abspath(output_prefix)
    found: dict[int, dict[int, str]] = collections.defaultdict(dict)
    for path in glob.glob(f"{glob.escape(output_prefix)}-p?????-of-?????.done.json"):
        m = _PROCESS_RE.search(path)
        if m and path[: m.start()] == output_prefix:
            i, n = int(m.group(1)), int(m.group(2))
            if i < n:
                found[n][i] = path
    complete = {n: s for n, s in found.items() if len(s) == n}
    if not complete:
        detail = "; ".join(f"{len(s)} of {n} processes done (missing "
                           f"{sorted(set(range(n)) - set(s))[:8]})" for n, s in sorted(found.items()))
        raise FileNotFoundError(f"no complete encoded dataset at {output_prefix}"
                                f"{': ' + detail if detail else ''}; run `sora-jax encode` "
                                "for every process index")
    # The newest set is the one whose last process finished last.
    n = max(complete, key=lambda c: max(os.stat(p).st_mtime_ns for p in complete[c].values()))
    if len(complete) > 1:
        log.warning("several complete encodings at %s (process counts %s); using %d",
                    output_prefix, sorted(complete), n)
    keys = []
    for i in range(n):
        with open(complete[n][i]) as f:
            k = dict(json.load(f)["key"])
        k.pop("process_index", None)
        keys.append(k)
    if any(k != keys[0] for k in keys[1:]):
        raise ValueError(f"the {n} process outputs at {output_prefix} were encoded with different "
                         "settings (checkpoint, data or text length): re-encode them")
    return [process_prefix(output_prefix, i, n) for i in range(n)]


def read_encoded(output_prefix: str):
    """All process outputs of ``output_prefix`` as one ``grain.MapDataset`` of decoded dicts.

    Element order: process 0's records, then process 1's, ... (deterministic); see the module
    docstring for the record keys.

    Raises:
      FileNotFoundError, ValueError: as ``list_encoded``.
    """
    parts = [records.read_dataset(p) for p in list_encoded(output_prefix)]
    return parts[0] if len(parts) == 1 else grain.MapDataset.concatenate(parts)
