"""Writes a synthetic store slowly, resuming whatever is already there; the crash tests SIGKILL it.

usage: python crash_writer.py URL SEED SLEEP_S S3_UPLOAD [PART_INDEX/PART_COUNT]
With a part, the store must exist and only that part is written (the multi-host pattern).
Prints "wrote K" after each batch and "finalized" at the end (flushed, for the parent to follow).
"""

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for _support
from _support import stores as synth  # noqa: E402

import mup.store as store  # noqa: E402


def main() -> None:
    url, seed, sleep_s, mode = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
    meta, acts = synth.make_job(**synth.CRASH_JOB, seed=seed)
    if len(sys.argv) > 5:
        part = tuple(int(x) for x in sys.argv[5].split("/"))
        writer = store.open_writer(url, part=part, s3_upload=mode)
    else:
        try:
            writer = store.open_writer(url, s3_upload=mode)
        except store.StoreNotFoundError:
            writer = store.create(url, **meta, **synth.CRASH_STORE, s3_upload=mode)
    print(f"resumed with {int(writer.done_rows().sum())} done", flush=True)
    todo = writer.pending_rows()
    rng = np.random.default_rng(seed + 1000 + todo.size)
    offsets = meta["offsets"]
    # The extractor's pattern: windows of rows in order, any order of batches inside a window.
    for window in np.array_split(todo, max(1, todo.size // 16)):
        for batch in np.array_split(rng.permutation(window), 3):
            writer.write(batch, synth.batch_acts(acts, offsets, batch))
            print(f"wrote {batch.size}", flush=True)
            time.sleep(sleep_s)
    writer.finalize()
    print("finalized", flush=True)


if __name__ == "__main__":
    main()
