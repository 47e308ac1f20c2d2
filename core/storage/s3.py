"""Objects in an S3 bucket (AWS, SeaweedFS, MinIO, Ceph...) through boto3, streamed both ways."""

import io
from collections.abc import Iterator
from contextlib import contextmanager
from typing import BinaryIO

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from core.errors import ObjectNotFound, ServiceUnavailable, StorageError
from core.storage.base import (CHUNK_SIZE, HashingReader, attachment, Storage, StoredObject, check_key, check_prefix,
                               check_range, not_found, stream_chunks)

MISSING_CODES = {"404", "NoSuchKey", "NotFound"}
DELETE_BATCH = 1000  # the most keys one DeleteObjects request takes
PART_SIZE = 5 << 20  # the smallest part S3 accepts; objects up to 50 GB (10,000 parts)
# Parts are read from the (unseekable) stream into memory; an upload holds this many plus the one being read.
PARTS_IN_MEMORY = 2
TRANSFER = TransferConfig(multipart_threshold=PART_SIZE, multipart_chunksize=PART_SIZE,
                          max_concurrency=PARTS_IN_MEMORY, preferred_transfer_client="classic")
TRANSFER.max_in_memory_upload_chunks = PARTS_IN_MEMORY  # s3transfer's setting; boto3's constructor omits it


def client_config(*, endpoint_url: str | None, attempts: int, connect_timeout: float, read_timeout: float) -> Config:
    return Config(
        signature_version="s3v4",
        retries={"mode": "standard", "max_attempts": attempts},
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        # Non-AWS servers are addressed by path: bucket names need no DNS entries of their own.
        s3={"addressing_style": "path"} if endpoint_url else {},
        # Checksums only where S3 requires them: many S3-compatible servers reject the newer default trailers.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        max_pool_connections=16,
    )


def error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", "unknown"))


class S3Storage(Storage):
    """Keys live under `prefix` in `bucket`; credentials come from boto3's default chain (AWS_* variables...)."""

    def __init__(self, bucket: str, prefix: str = "", *, endpoint_url: str | None = None,
                 region: str = "us-east-1", public_endpoint_url: str | None = None, presign_seconds: int = 600):
        self.bucket = bucket
        self.presign_seconds = presign_seconds
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.endpoint_url = endpoint_url
        self.region = region
        # A session of our own reads the credentials now; boto3's default session caches the first ones it saw.
        self._session = boto3.session.Session()
        self._client = self._new_client(attempts=5, connect_timeout=5, read_timeout=60)
        # One quick attempt: a readiness probe should answer in seconds, not after a round of retries.
        self._probe_client = self._new_client(attempts=1, connect_timeout=2, read_timeout=5)
        # Presigned URLs are followed by clients outside the deployment's network: sign them for its public address.
        self._signing_client = self._new_client(attempts=1, connect_timeout=2, read_timeout=5,
                                                endpoint_url=public_endpoint_url or endpoint_url)

    def _new_client(self, *, endpoint_url: str | None = None, **timeouts):
        endpoint_url = endpoint_url or self.endpoint_url
        return self._session.client("s3", endpoint_url=endpoint_url, region_name=self.region,
                                    config=client_config(endpoint_url=endpoint_url, **timeouts))

    @property
    def location(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" + (f" at {self.endpoint_url}" if self.endpoint_url else "")

    def _full_key(self, key: str) -> str:
        return self.prefix + check_key(key)

    @contextmanager
    def _errors(self, action: str, key: str):
        """A missing key becomes ObjectNotFound; any other S3 failure a StorageError saying what failed."""
        try:
            yield
        except ClientError as exc:
            if error_code(exc) in MISSING_CODES:
                raise not_found(key) from None
            raise StorageError(f"Object storage ({self.location}) refused to {action} '{key}': "
                               f"{error_code(exc)}.") from exc
        except BotoCoreError as exc:
            raise StorageError(f"Object storage ({self.location}) failed to {action} '{key}': {exc}") from exc

    def put_stream(self, key: str, stream: BinaryIO, *, max_bytes: int | None = None,
                   content_type: str | None = None) -> StoredObject:
        """One PUT for small objects, multipart above PART_SIZE; a failed multipart upload is aborted."""
        full_key = self._full_key(key)
        reader = HashingReader(stream, max_bytes)
        extra = {"ContentType": content_type} if content_type else None
        with self._errors("store", key):
            self._client.upload_fileobj(reader, self.bucket, full_key, ExtraArgs=extra, Config=TRANSFER)
        return StoredObject(key, reader.size, reader.sha256)

    def _get(self, key: str) -> dict:
        with self._errors("read", key):
            return self._client.get_object(Bucket=self.bucket, Key=self._full_key(key))

    def iter_chunks(self, key: str, chunk_size: int = CHUNK_SIZE, *, start: int = 0,
                    end: int | None = None) -> Iterator[bytes]:
        check_range(start, end)
        if end == start:
            self.size(key)  # an empty range of a missing object is still an error
            return iter(())
        if start == 0 and end is None:
            return stream_chunks(self._get(key)["Body"], chunk_size)
        last = "" if end is None else str(end - 1)  # HTTP ranges include their last byte
        with self._errors("read", key):
            try:
                answer = self._client.get_object(Bucket=self.bucket, Key=self._full_key(key),
                                                 Range=f"bytes={start}-{last}")
            except ClientError as exc:
                if error_code(exc) != "InvalidRange":
                    raise
                return iter(())  # the range starts past the end of the object
        return stream_chunks(answer["Body"], chunk_size)

    def open(self, key: str) -> BinaryIO:
        return io.BufferedReader(self._get(key)["Body"], CHUNK_SIZE)

    def _head(self, key: str) -> dict:
        with self._errors("read", key):
            return self._client.head_object(Bucket=self.bucket, Key=self._full_key(key))

    def size(self, key: str) -> int:
        return self._head(key)["ContentLength"]

    def exists(self, key: str) -> bool:
        try:
            self._head(key)
        except ObjectNotFound:
            return False
        return True

    def delete(self, key: str) -> None:
        with self._errors("delete", key):
            self._client.delete_object(Bucket=self.bucket, Key=self._full_key(key))

    def _list_full_keys(self, prefix: str) -> list[str]:
        pages = self._client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket,
                                                                        Prefix=self.prefix + check_prefix(prefix))
        with self._errors("list", prefix):
            return [item["Key"] for page in pages for item in page.get("Contents", [])]

    def list_keys(self, prefix: str) -> list[str]:
        return sorted(key.removeprefix(self.prefix) for key in self._list_full_keys(prefix))

    def list_objects(self, prefix: str) -> list[tuple[str, float]]:
        pages = self._client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket,
                                                                        Prefix=self.prefix + check_prefix(prefix))
        with self._errors("list", prefix):
            return sorted((item["Key"].removeprefix(self.prefix), item["LastModified"].timestamp())
                          for page in pages for item in page.get("Contents", []))

    def abort_incomplete_uploads(self, started_before: float) -> int:
        """Multipart uploads under the prefix initiated before `started_before`: their parts are stored (and billed)
        until aborted, and an API or worker killed mid-upload never aborts them."""
        pages = self._client.get_paginator("list_multipart_uploads").paginate(Bucket=self.bucket, Prefix=self.prefix)
        aborted = 0
        with self._errors("list uploads under", self.prefix or "/"):
            stale = [(upload["Key"], upload["UploadId"]) for page in pages for upload in page.get("Uploads", [])
                     if upload["Initiated"].timestamp() < started_before]
        for key, upload_id in stale:
            with self._errors("abort the upload of", key):
                self._client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
            aborted += 1
        return aborted

    def delete_prefix(self, prefix: str) -> int:
        keys = self._list_full_keys(prefix)
        for first in range(0, len(keys), DELETE_BATCH):
            batch = [{"Key": key} for key in keys[first:first + DELETE_BATCH]]
            with self._errors("delete", prefix):
                answer = self._client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})
            if answer.get("Errors"):
                failed = answer["Errors"][0]
                raise StorageError(f"Object storage ({self.location}) did not delete '{failed.get('Key')}': "
                                   f"{failed.get('Code')} ({len(answer['Errors'])} keys failed).")
        return len(keys)

    def presigned_get_url(self, key: str, *, expires: int | None = None, filename: str | None = None) -> str | None:
        params = {"Bucket": self.bucket, "Key": self._full_key(key)}
        if filename:
            params["ResponseContentDisposition"] = attachment(filename)
        return self._signing_client.generate_presigned_url("get_object", Params=params,
                                                           ExpiresIn=expires or self.presign_seconds)

    def check(self) -> None:
        try:
            self._probe_client.head_bucket(Bucket=self.bucket)
        except ClientError as exc:
            reasons = {"403": "the credentials were refused (403)", "404": "the bucket does not exist (404)"}
            reason = reasons.get(error_code(exc), f"{error_code(exc)} error")
            raise ServiceUnavailable(f"Object storage {self.location}: {reason}.") from None
        except BotoCoreError as exc:
            raise ServiceUnavailable(f"Object storage {self.location} is unreachable: {exc}") from None

    def ensure_bucket(self) -> None:
        """Create the bucket if it is missing (tests and `lorajobs up`; production uses an existing bucket)."""
        try:
            self._client.head_bucket(Bucket=self.bucket)
            return
        except ClientError as exc:
            if error_code(exc) not in MISSING_CODES:
                raise StorageError(f"Object storage {self.location}: cannot reach the bucket: "
                                   f"{error_code(exc)}.") from exc
        location = {} if self.region == "us-east-1" else {
            "CreateBucketConfiguration": {"LocationConstraint": self.region}}
        try:
            self._client.create_bucket(Bucket=self.bucket, **location)
        except ClientError as exc:
            if error_code(exc) not in {"BucketAlreadyOwnedByYou", "BucketAlreadyExists"}:
                raise StorageError(f"Object storage {self.location}: cannot create the bucket: "
                                   f"{error_code(exc)}.") from exc
