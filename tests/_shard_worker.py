"""Child process of tests/test_navit.py: joins a 2-process JAX job on localhost and writes the
record ids its DiT data shard holds and the ids in its first packed batches."""

import json
import sys

import jax


def main(port: str, process_id: str, out: str):
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=int(process_id))
    sys.path.insert(0, sys.argv[4])
    import grain
    import numpy as np
    from test_navit import PATCH, _cfg, _records

    from sora_jax.data.pipeline import mixed_source, packed_dataset

    ds = grain.MapDataset.source(_records(n=50))
    shard = mixed_source([ds], process_index=jax.process_index(), process_count=jax.process_count())
    ids = sorted(int(shard[i]["text"][0, 0]) for i in range(len(shard)))
    it = iter(packed_dataset(shard, _cfg(), PATCH, seed=0))
    seen = set()
    for _ in range(4):
        b = next(it)
        seen |= {int(v) for v in np.unique(b["text"][b["text_segment_ids"] > 0][:, 0])}
    with open(out, "w") as f:
        json.dump({"process": jax.process_index(), "count": jax.process_count(), "ids": ids,
                   "batch_ids": sorted(seen)}, f)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:4])
