"""Object storage: one interface, a local folder (embedded default) or an S3 bucket, chosen by settings."""

from pathlib import Path

from core.settings import Settings
from core.storage.base import Storage, StoredObject
from core.storage.local import LocalStorage

__all__ = ["LocalStorage", "Storage", "StoredObject", "get_storage"]


def get_storage(settings: Settings) -> Storage:
    """`file://PATH` selects a local folder, `s3://BUCKET[/prefix]` an S3 bucket."""
    url = settings.storage_url
    if url.startswith("file://") and url != "file://":
        return LocalStorage(Path(url.removeprefix("file://")))
    bucket, _, prefix = url.removeprefix("s3://").partition("/")
    if url.startswith("s3://") and bucket:
        # boto3 takes a while to import: only deployments on S3 pay for it.
        from core.storage.s3 import S3Storage

        return S3Storage(bucket, prefix, endpoint_url=settings.s3_endpoint_url, region=settings.s3_region,
                         public_endpoint_url=settings.s3_public_endpoint_url,
                         presign_seconds=settings.presign_expiry_seconds)
    raise ValueError(f"LORAJOBS_STORAGE_URL must be file://PATH or s3://BUCKET[/prefix], not {url!r}")
