"""Garbage collection on the real S3 server and database: orphans go, whatever a row or a live attempt needs stays."""

import io
import os
import time
import uuid

import pytest

from core.storage import LocalStorage, get_storage
from db.lifecycle import file_key
from db.models import Checkpoint
from db.repositories import jobs as jobs_repo
from db.session import transaction
from tests.faults.rows import make_file, make_job, make_project
from worker.gc import collect

GRACE = 2.0


@pytest.fixture
def gc_settings(settings, tmp_path):
    """Storage under a prefix of its own, so the collection sees only this test's objects; a work folder of its own."""
    bucket = settings.storage_url.removeprefix("s3://").split("/")[0]
    return settings.model_copy(update={"storage_url": f"s3://{bucket}/gc-{uuid.uuid4().hex[:8]}",
                                       "gc_grace_seconds": GRACE, "work_dir": tmp_path / "work"})


def put(storage, key: str) -> str:
    storage.put_bytes(key, b"x")
    return key


def start_multipart(storage, key: str) -> str:
    """An upload begun and never completed, as an API killed mid-upload leaves it."""
    client, full = storage._client, storage.prefix + key
    upload = client.create_multipart_upload(Bucket=storage.bucket, Key=full)
    client.upload_part(Bucket=storage.bucket, Key=full, UploadId=upload["UploadId"], PartNumber=1,
                       Body=io.BytesIO(b"p" * 1024))
    return upload["UploadId"]


def open_uploads(storage) -> set[str]:
    answer = storage._client.list_multipart_uploads(Bucket=storage.bucket, Prefix=storage.prefix)
    return {upload["UploadId"] for upload in answer.get("Uploads", [])}


def work_folder(settings, name: str, touched: float):
    path = settings.work_dir / name
    (path / "out").mkdir(parents=True)
    os.utime(path, (touched, touched))
    return path


def test_gc_removes_orphans_and_keeps_live_objects_and_folders(gc_settings):
    settings, storage = gc_settings, get_storage(gc_settings)
    project = make_project(settings)
    kept_file = make_file(settings, project)
    deleted_file = make_file(settings, project, deleted_at=time.time())
    prefix = f"projects/{project}/jobs"
    running = make_job(settings, status="running", attempts=2, lease_owner="alive", lease_expires_at=time.time() + 60,
                       started_at=time.time() - 100)
    finished = make_job(settings, status="succeeded", attempts=1,
                        artifacts={"tar.gz": {"key": f"{prefix}/done/adapter.tar.gz", "sha256": "0", "bytes": 1}})
    finished_archive = f"{prefix}/{finished}/attempt-1/adapter.tar.gz"
    with transaction(settings.database_url) as session:
        jobs_repo.get_any(session, finished).artifacts = {"tar.gz": {"key": finished_archive, "sha256": "0",
                                                                     "bytes": 1}}
        session.add(Checkpoint(id=f"ftckpt-{uuid.uuid4().hex[:12]}", job_id=running, step=2, metrics={},
                               storage_key=f"{prefix}/{running}/attempt-1/checkpoints/step-2/state.tar.gz",
                               sha256="0", bytes=1, created_at=time.time()))
    live = [put(storage, file_key(project, kept_file)), put(storage, finished_archive),
            put(storage, f"{prefix}/{running}/attempt-1/checkpoints/step-2/state.tar.gz"),
            put(storage, f"{prefix}/{running}/attempt-2/checkpoints/step-4/state.tar.gz")]
    orphans = [put(storage, file_key(project, "file-neverrecorded")), put(storage, file_key(project, deleted_file)),
               put(storage, f"{prefix}/{running}/attempt-1/checkpoints/step-4/state.tar.gz"),
               put(storage, f"{prefix}/{finished}/attempt-1/checkpoints/step-9/state.tar.gz")]
    stale_upload = start_multipart(storage, file_key(project, "file-killedmidupload"))
    now = time.time()
    folders = {"alive": work_folder(settings, f"lorajobs-{running}-live", now - 3 * GRACE),
               "earlier attempt": work_folder(settings, f"lorajobs-{running}-old", now - 200),
               "finished": work_folder(settings, f"lorajobs-{finished}-dead", now - 3 * GRACE),
               "young": work_folder(settings, f"lorajobs-{finished}-young", now + 60)}
    time.sleep(GRACE + 1)
    young = put(storage, file_key(project, "file-beinguploaded"))
    fresh_upload = start_multipart(storage, file_key(project, "file-uploadingnow"))

    counts = collect(settings, storage)

    keys = set(storage.list_keys("projects/"))
    assert set(live) | {young} <= keys
    assert not keys & set(orphans)
    assert counts["orphan_objects"] == len(orphans)
    uploads = open_uploads(storage)
    assert stale_upload not in uploads and fresh_upload in uploads and counts["incomplete_uploads"] == 1
    assert {name for name, path in folders.items() if path.exists()} == {"alive", "young"}
    assert counts["work_folders"] == 2


def test_gc_removes_a_local_folder_s_partial_files_but_not_one_being_written(gc_settings, tmp_path):
    storage = LocalStorage(tmp_path / "objects")
    put(storage, "projects/p/files/file-a")
    folder = tmp_path / "objects" / "projects" / "p" / "files"
    stale, writing = folder / ".file-b.x1.partial", folder / ".file-c.x2.partial"
    stale.write_bytes(b"half")
    writing.write_bytes(b"half")
    old = time.time() - 10 * GRACE
    os.utime(stale, (old, old))
    assert storage.abort_incomplete_uploads(time.time() - GRACE) == 1
    assert not stale.exists() and writing.exists() and storage.list_keys("projects/") == ["projects/p/files/file-a"]
