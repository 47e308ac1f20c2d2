"""The deployment's model catalogue: entries in the database, files in object storage, so that every host sees the
same models without a shared filesystem. Local folders (core/catalogue.py) still serve a single host; an id in
both is the database's.

Each file is stored once under its content's sha256 (`catalogue/blobs/<sha256>`): adding a model again, or a
revision that shares its tokenizer, uploads only what is new. Workers download and verify (worker/catalogue.py).
"""

import json
import time
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from core.archives import sha256_file
from core.catalogue import CatalogueModel, PROVENANCE_FILE, check_model_folder, list_models, resolve_model
from core.errors import InvalidRequest, ModelNotFound
from core.storage import Storage
from db.models import CatalogueEntry

BLOB_PREFIX = "catalogue/blobs/"


def blob_key(sha256: str) -> str:
    return BLOB_PREFIX + sha256


def describe(entry: CatalogueEntry) -> CatalogueModel:
    return CatalogueModel(entry.id, None, entry.architecture, int(entry.created_at), entry.provenance, entry.config)


def get(session: Session, model_id: str) -> CatalogueEntry | None:
    return session.scalar(select(CatalogueEntry).where(CatalogueEntry.id == model_id))


def list_all(session: Session, models_dir: Path) -> list[CatalogueModel]:
    """The database's models, then the local folders' models the database does not have."""
    stored = [describe(entry) for entry in session.scalars(select(CatalogueEntry).order_by(CatalogueEntry.id))]
    ids = {model.id for model in stored}
    return stored + [model for model in list_models(models_dir) if model.id not in ids]


def resolve(session: Session, models_dir: Path, model_id: str, *, param: str = "model") -> CatalogueModel:
    """The catalogue entry for `model_id`, from the database or else a local folder; a 404 names what exists."""
    entry = get(session, model_id)
    if entry is not None:
        return describe(entry)
    try:
        return resolve_model(models_dir, model_id, param=param)
    except ModelNotFound:
        known = ", ".join(m.id for m in list_all(session, models_dir)) or "none installed"
        raise ModelNotFound(f"The model '{model_id}' is not in the catalogue (available: {known}).",
                            param=param) from None


def folder_files(folder: Path) -> list[Path]:
    """The files of a model folder that make the model: hidden files and folders (a hub's `.cache`) left out."""
    return sorted(path for path in folder.rglob("*") if path.is_file()
                  and not any(part.startswith(".") for part in path.relative_to(folder).parts))


def publish(session: Session, storage: Storage, model_id: str, folder: Path, *, source: str,
            provenance: str | None = None) -> tuple[CatalogueEntry, int]:
    """Add a Hugging Face model folder to the catalogue: each file hashed, uploaded unless stored already, and the
    entry written. Returns the entry and the bytes uploaded. An id already there is refused, unless its files are
    exactly these (adding the same folder twice is harmless)."""
    check_model_folder(model_id, folder)
    files = []
    for path in folder_files(folder):
        files.append({"path": path.relative_to(folder).as_posix(), "sha256": sha256_file(path),
                      "bytes": path.stat().st_size})
    existing = get(session, model_id)
    if existing is not None:
        if sorted(existing.files, key=lambda f: f["path"]) == files:
            return existing, 0
        raise InvalidRequest(f"The model '{model_id}' is already in the catalogue with other files; add this one "
                             "under another id.", param="model", code="model_exists")
    uploaded = 0
    for entry, path in zip(files, folder_files(folder)):
        if not storage.exists(blob_key(entry["sha256"])):
            stored = storage.put_file(blob_key(entry["sha256"]), path)
            if stored.sha256 != entry["sha256"]:  # the file changed while it was being added
                storage.delete(stored.key)
                raise InvalidRequest(f"{path} changed while it was uploaded; add the model again.", param="path")
            uploaded += entry["bytes"]
    config = json.loads((folder / "config.json").read_text())
    if provenance is None and (folder / PROVENANCE_FILE).is_file():
        provenance = json.loads((folder / PROVENANCE_FILE).read_text()).get("provenance")
    row = CatalogueEntry(id=model_id, architecture=(config.get("architectures") or [None])[0], config=config,
                         provenance=provenance, source=source, files=files,
                         bytes=sum(entry["bytes"] for entry in files), created_at=time.time())
    session.add(row)
    session.flush()
    return row, uploaded
