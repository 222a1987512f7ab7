"""What a checkpoint's content identity costs: the first hash of a large weight file, and the
cached re-check that every later run pays.

    python benchmarks/content_hash.py [GIB]    # default 3 GiB; the file is deleted afterwards

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
    size = int(gib * 2**30)
    with tempfile.TemporaryDirectory() as tmp:
        path, cache = Path(tmp) / "model-00001-of-00001.safetensors", Path(tmp) / "hashes"
        block = os.urandom(64 * 2**20)
        with path.open("wb") as f:
            for offset in range(0, size, len(block)):
                f.write(block[: min(len(block), size - offset)])
        content_hash.RACY_SECONDS = -1.0  # the file was written a moment ago: cache it anyway
        start = time.perf_counter()
        (first,) = file_digests([path], cache_dir=cache)
        hashed = time.perf_counter() - start
        start = time.perf_counter()
        again = cached_digest(path, cache)
        recheck = time.perf_counter() - start
        assert again == first
        print(f"| file | first hash ({content_hash.ALGORITHM}) | throughput | cached re-check |")
        print("|---|---|---|---|")
        print(
            f"| {size / 1e9:.2f} GB | {hashed:.2f} s | {size / hashed / 1e9:.2f} GB/s | "
            f"{recheck * 1e3:.2f} ms |"
        )


if __name__ == "__main__":
    main()
