"""What a checkpoint's content identity costs: the first hash of a large weight file, and the
cached re-check that every later run pays.

    python benchmarks/content_hash.py [GIB [SHARDS]]   # default 3 GiB in 1 file; deleted afterwards

The file is written in a temporary directory (`TMPDIR`), so the first hash reads it from the page
cache: it measures hashing, not the disk. A cold read is bounded by the disk as well.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

from glmdeploy.loading import content_hash
from glmdeploy.loading.content_hash import cached_digest, file_digests


def main() -> None:
    gib = float(sys.argv[1]) if len(sys.argv) > 1 else 3.0
    shards = int(sys.argv[2]) if len(sys.argv) > 2 else 1
    size = int(gib * 2**30) // shards
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "hashes"
        paths = [
            Path(tmp) / f"model-{i + 1:05d}-of-{shards:05d}.safetensors" for i in range(shards)
        ]
        block = os.urandom(64 * 2**20)
        for path in paths:
            with path.open("wb") as f:
                for offset in range(0, size, len(block)):
                    f.write(block[: min(len(block), size - offset)])
        content_hash.RACY_SECONDS = -1.0  # the files were written a moment ago: cache them anyway
        start = time.perf_counter()
        first = file_digests(paths, cache_dir=cache)
        hashed = time.perf_counter() - start
        start = time.perf_counter()
        again = [cached_digest(path, cache) for path in paths]
        recheck = time.perf_counter() - start
        assert again == first
        total = size * shards
        print(f"| weights | files | first hash ({content_hash.ALGORITHM}) | throughput | "
              "cached re-check (all files) |")  # fmt: skip
        print("|---|---|---|---|---|")
        print(
            f"| {total / 1e9:.2f} GB | {shards} | {hashed:.2f} s | "
            f"{total / hashed / 1e9:.2f} GB/s | {recheck * 1e3:.2f} ms |"
        )


if __name__ == "__main__":
    main()
