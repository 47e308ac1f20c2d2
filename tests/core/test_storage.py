"""Object storage against a local folder and a real S3 server (SeaweedFS): streaming, ranges, limits, errors."""

import hashlib
import io
import os
import time
import tracemalloc
import uuid

import boto3
import httpx
import pytest

from core.errors import InvalidRequest, ObjectNotFound, PayloadTooLarge, ServiceUnavailable
from core.settings import Settings
from core.storage import LocalStorage, Storage, StoredObject, get_storage
from tests.core.s3server import free_ports

MB = 1 << 20


class LazyStream(io.RawIOBase):
    """`size` bytes made on demand from one random megabyte, hashing what it hands out."""

    def __init__(self, size: int):
        self.remaining = size
        self.block = os.urandom(MB)
        self.offset = 0
        self.digest = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        count = min(len(buffer), self.remaining, MB - self.offset)
        buffer[:count] = self.block[self.offset:self.offset + count]
        self.digest.update(self.block[self.offset:self.offset + count])
        self.offset = (self.offset + count) % MB
        self.remaining -= count
        return count


def lazy(size: int) -> tuple[io.BufferedReader, LazyStream]:
    source = LazyStream(size)
    return io.BufferedReader(source, 64 * 1024), source


def peak_memory(action):
    """What `action` returns, and the peak of memory Python allocated while it ran."""
    tracemalloc.start()
    try:
        result = action()
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.fixture(scope="module")
def bucket(s3_endpoint) -> str:
    name = f"storage-test-{uuid.uuid4().hex[:8]}"
    get_storage(Settings(storage_url=f"s3://{name}", s3_endpoint_url=s3_endpoint)).ensure_bucket()
    return name


@pytest.fixture
def s3_settings(s3_endpoint, bucket) -> Settings:
    """A prefix of its own for each test, so each sees an empty store."""
    return Settings(storage_url=f"s3://{bucket}/t-{uuid.uuid4().hex[:8]}", s3_endpoint_url=s3_endpoint)


@pytest.fixture(params=["local", "s3"])
def storage(request, tmp_path) -> Storage:
    if request.param == "local":
        return get_storage(Settings(storage_url=f"file://{tmp_path / 'objects'}"))
    return get_storage(request.getfixturevalue("s3_settings"))


def s3_client(endpoint: str):
    return boto3.session.Session().client("s3", endpoint_url=endpoint, region_name="us-east-1")


def test_a_50_mb_object_round_trips_streaming_in_bounded_memory(storage, tmp_path):
    stream, source = lazy(50 * MB)
    stored, put_peak = peak_memory(lambda: storage.put_stream("projects/p/files/big", stream,
                                                              content_type="application/jsonl"))
    assert stored.size == 50 * MB
    assert stored.sha256 == source.digest.hexdigest()

    def read_back() -> str:
        digest = hashlib.sha256()
        for chunk in storage.iter_chunks("projects/p/files/big"):
            digest.update(chunk)
        return digest.hexdigest()

    read_sha, read_peak = peak_memory(read_back)
    assert read_sha == stored.sha256
    assert put_peak < 25 * MB and read_peak < 10 * MB, (put_peak / MB, read_peak / MB)
    assert storage.size("projects/p/files/big") == 50 * MB
    assert storage.sha256("projects/p/files/big") == stored.sha256
    storage.download_to("projects/p/files/big", tmp_path / "copy")
    assert (tmp_path / "copy").stat().st_size == 50 * MB
    with storage.open("projects/p/files/big") as opened:
        assert opened.read(10) == source.block[:10]


def test_small_objects_round_trip_through_bytes_files_and_open(storage, tmp_path):
    lines = b"".join(b'{"text": "line %d"}\n' % i for i in range(1000))
    (tmp_path / "local.jsonl").write_bytes(lines)
    from_file = storage.put_file("projects/p/files/a", tmp_path / "local.jsonl")
    from_bytes = storage.put_bytes("projects/p/files/b", lines)
    empty = storage.put_bytes("projects/p/files/empty", b"")
    assert from_file == StoredObject("projects/p/files/a", len(lines), hashlib.sha256(lines).hexdigest())
    assert from_bytes.sha256 == from_file.sha256
    assert empty.size == 0 and storage.size("projects/p/files/empty") == 0
    with storage.open("projects/p/files/b") as opened:
        assert opened.readline() == b'{"text": "line 0"}\n'
        assert opened.read() == lines[len(b'{"text": "line 0"}\n'):]
    assert storage.exists("projects/p/files/a")
    assert storage.list_keys("projects/p/") == ["projects/p/files/a", "projects/p/files/b", "projects/p/files/empty"]


def test_ranged_reads_give_the_bytes_asked_for(storage):
    data = bytes(range(256)) * 40
    storage.put_bytes("objects/ranged", data)

    def read(**kwargs) -> list[bytes]:
        return list(storage.iter_chunks("objects/ranged", 1000, **kwargs))

    middle = read(start=100, end=5000)
    assert b"".join(middle) == data[100:5000]
    assert max(len(chunk) for chunk in middle) <= 1000
    assert b"".join(read(start=10000)) == data[10000:]
    assert b"".join(read(end=1)) == data[:1]
    assert read(start=20000) == []
    assert read(start=7, end=7) == []
    with pytest.raises(InvalidRequest):
        read(start=10, end=5)


def test_an_upload_over_max_bytes_is_refused_and_leaves_nothing(storage):
    stream, _ = lazy(12 * MB)  # more than two multipart parts
    with pytest.raises(PayloadTooLarge) as caught:
        storage.put_stream("projects/p/files/too-big", stream, max_bytes=10 * MB)
    assert "10,485,760-byte limit" in caught.value.message
    with pytest.raises(PayloadTooLarge):
        storage.put_stream("projects/p/files/small", io.BytesIO(b"x" * 101), max_bytes=100)
    assert storage.list_keys("") == []
    exact = storage.put_stream("projects/p/files/exact", io.BytesIO(b"x" * 100), max_bytes=100)
    assert exact.size == 100


def test_a_refused_upload_leaves_no_partial_file_on_disk(tmp_path):
    storage = LocalStorage(tmp_path / "objects")
    stream, _ = lazy(3 * MB)
    with pytest.raises(PayloadTooLarge):
        storage.put_stream("projects/p/files/too-big", stream, max_bytes=2 * MB)
    assert [files for _, _, files in os.walk(tmp_path / "objects") if files] == []


def test_a_refused_multipart_upload_is_aborted_on_s3(s3_settings, s3_endpoint, bucket):
    storage = get_storage(s3_settings)
    stream, _ = lazy(12 * MB)
    with pytest.raises(PayloadTooLarge):
        storage.put_stream("projects/p/files/too-big", stream, max_bytes=10 * MB)
    uploads = s3_client(s3_endpoint).list_multipart_uploads(Bucket=bucket, Prefix=storage.prefix)
    assert uploads.get("Uploads", []) == []
    assert storage.list_keys("") == []


def test_a_presigned_url_serves_the_object_over_plain_http_until_it_expires(s3_settings):
    storage = get_storage(s3_settings)
    data = b"adapter bytes " * 1000
    storage.put_bytes("projects/p/jobs/j/adapter.tar.gz", data)

    url = storage.presigned_get_url("projects/p/jobs/j/adapter.tar.gz", filename="ftjob-1-adapter.tar.gz")
    response = httpx.get(url)
    assert response.status_code == 200
    assert response.content == data
    assert 'filename="ftjob-1-adapter.tar.gz"' in response.headers["content-disposition"]

    short = storage.presigned_get_url("projects/p/jobs/j/adapter.tar.gz", expires=1)
    time.sleep(2.1)
    assert httpx.get(short).status_code == 403


def test_a_local_folder_has_no_presigned_urls(tmp_path):
    storage = LocalStorage(tmp_path)
    storage.put_bytes("a", b"x")
    assert storage.presigned_get_url("a") is None


def test_a_missing_key_is_a_clear_not_found_error_from_every_read(storage, tmp_path):
    key = "projects/p/files/file-missing"
    reads = {"iter_chunks": lambda: storage.iter_chunks(key), "range": lambda: storage.iter_chunks(key, start=5),
             "open": lambda: storage.open(key), "size": lambda: storage.size(key),
             "sha256": lambda: storage.sha256(key), "download_to": lambda: storage.download_to(key, tmp_path / "out")}
    for name, read in reads.items():
        with pytest.raises(ObjectNotFound) as caught:
            read()
        assert key in caught.value.message, name
        assert caught.value.status_code == 404
    assert not (tmp_path / "out").exists()
    assert storage.exists(key) is False
    storage.delete(key)


def test_delete_and_delete_prefix_remove_only_what_they_name(storage):
    for key in ("jobs/a/1", "jobs/a/2", "jobs/a/deep/3", "jobs/ab/4", "jobs/b/5"):
        storage.put_bytes(key, key.encode())
    assert storage.list_keys("jobs/a") == ["jobs/a/1", "jobs/a/2", "jobs/a/deep/3", "jobs/ab/4"]
    assert storage.delete_prefix("jobs/a/") == 3
    assert storage.list_keys("") == ["jobs/ab/4", "jobs/b/5"]
    storage.delete("jobs/b/5")
    assert storage.list_keys("jobs/") == ["jobs/ab/4"]
    assert storage.delete_prefix("nothing/") == 0


@pytest.mark.parametrize("key", ["../escape", "projects/../../escape", "/etc/passwd", "", "a//b", "a/./b", ".hidden"])
def test_keys_that_could_escape_or_hide_are_rejected(storage, tmp_path, key):
    with pytest.raises(InvalidRequest):
        storage.put_bytes(key, b"x")
    with pytest.raises(InvalidRequest):
        storage.open(key)
    with pytest.raises(InvalidRequest):
        storage.delete(key)
    assert storage.list_keys("") == []
    assert not (tmp_path / "escape").exists()


def test_the_readiness_check_passes_on_a_reachable_store(storage):
    storage.check()


def test_bad_credentials_fail_the_readiness_check(s3_settings, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    with pytest.raises(ServiceUnavailable) as caught:
        get_storage(s3_settings).check()
    assert "credentials were refused" in caught.value.message


def test_a_missing_bucket_or_server_fails_the_readiness_check(s3_endpoint):
    missing_bucket = Settings(storage_url="s3://no-such-bucket-here", s3_endpoint_url=s3_endpoint)
    with pytest.raises(ServiceUnavailable) as caught:
        get_storage(missing_bucket).check()
    assert "no-such-bucket-here" in caught.value.message and "does not exist" in caught.value.message
    (port,) = free_ports(1)
    nobody = Settings(storage_url="s3://bucket", s3_endpoint_url=f"http://127.0.0.1:{port}")
    with pytest.raises(ServiceUnavailable) as caught:
        get_storage(nobody).check()
    assert "unreachable" in caught.value.message


def test_an_object_folder_that_cannot_be_created_fails_the_readiness_check(tmp_path):
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(ServiceUnavailable) as caught:
        LocalStorage(tmp_path / "a-file" / "objects").check()
    assert "a-file" in caught.value.message


def test_the_storage_url_selects_the_backend(tmp_path, s3_endpoint, monkeypatch):
    monkeypatch.delenv("LORAJOBS_STORAGE_URL", raising=False)  # the suite's fixtures export one
    local = get_storage(Settings(data_dir=tmp_path))
    assert isinstance(local, LocalStorage) and local.root == tmp_path / "objects"
    s3 = get_storage(Settings(storage_url="s3://my-bucket/some/prefix", s3_endpoint_url=s3_endpoint))
    assert (s3.bucket, s3.prefix, s3.endpoint_url) == ("my-bucket", "some/prefix/", s3_endpoint)
    for bad in ("s3://", "gs://bucket", "file://"):
        with pytest.raises(ValueError, match="LORAJOBS_STORAGE_URL"):
            get_storage(Settings(storage_url=bad))
