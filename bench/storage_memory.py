"""Peak Python memory of storing and reading back one large object: lorajobs' streaming storage against
a baseline that holds the object whole (read it into bytes, one `put_object`, `get_object().read()`).

Starts a throwaway SeaweedFS S3 server (or uses LORAJOBS_TEST_S3_ENDPOINT). Run:
    .venv/bin/python -m bench.storage_memory --mb 200
"""

import argparse
import hashlib
import io
import tempfile
import time
import tracemalloc
import uuid
from pathlib import Path

import boto3

MB = 1 << 20


class LazyStream(io.RawIOBase):
    """`size` bytes made on demand from one repeated megabyte."""

    def __init__(self, size: int):
        self.remaining, self.block = size, bytes(range(256)) * 4096

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        count = min(len(buffer), self.remaining, MB)
        buffer[:count] = self.block[:count]
        self.remaining -= count
        return count


def measured(action) -> tuple[float, float]:
    """Peak traced MB and seconds of `action`."""
    tracemalloc.start()
    started = time.perf_counter()
    try:
        action()
        return tracemalloc.get_traced_memory()[1] / MB, time.perf_counter() - started
    finally:
        tracemalloc.stop()


def streaming_round_trip(storage, size: int) -> None:
    stored = storage.put_stream("bench/object", io.BufferedReader(LazyStream(size), MB))
    digest = hashlib.sha256()
    for chunk in storage.iter_chunks("bench/object"):
        digest.update(chunk)
    assert digest.hexdigest() == stored.sha256


def whole_round_trip(endpoint: str, bucket: str, size: int) -> None:
    client = boto3.session.Session().client("s3", endpoint_url=endpoint, region_name="us-east-1")
    data = io.BufferedReader(LazyStream(size), MB).read()
    client.put_object(Bucket=bucket, Key="baseline/object", Body=data)
    assert client.get_object(Bucket=bucket, Key="baseline/object")["Body"].read() == data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=int, default=200)
    args = parser.parse_args()

    from core.settings import Settings
    from core.storage import get_storage
    from tests.core.s3server import start_seaweedfs

    work = Path(tempfile.mkdtemp(prefix="lorajobs-bench-"))
    endpoint, stop = start_seaweedfs(work)
    try:
        bucket = f"bench-{uuid.uuid4().hex[:8]}"
        s3 = get_storage(Settings(storage_url=f"s3://{bucket}", s3_endpoint_url=endpoint))
        s3.ensure_bucket()
        local = get_storage(Settings(storage_url=f"file://{work / 'objects'}"))
        size = args.mb * MB
        rows = {"S3, whole object in memory (baseline)": measured(lambda: whole_round_trip(endpoint, bucket, size)),
                "S3, lorajobs streaming": measured(lambda: streaming_round_trip(s3, size)),
                "local folder, lorajobs streaming": measured(lambda: streaming_round_trip(local, size))}
    finally:
        stop()
    print(f"store and read back {args.mb} MB; peak memory traced by Python\n")
    print(f"{'':<40} {'peak MB':>8} {'seconds':>8}")
    for name, (peak, seconds) in rows.items():
        print(f"{name:<40} {peak:8.1f} {seconds:8.1f}")
    baseline, ours = rows["S3, whole object in memory (baseline)"], rows["S3, lorajobs streaming"]
    print(f"\nS3 streaming uses {baseline[0] / ours[0]:.1f}x less memory than the baseline "
          f"at {baseline[1] / ours[1]:.2f}x its speed")


if __name__ == "__main__":
    main()
