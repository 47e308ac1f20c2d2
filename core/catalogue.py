"""The model catalogue's local half: Hugging Face model folders under `models_dir`, keyed by their relative path.

`models_dir/HuggingFaceTB/SmolLM2-135M-Instruct/config.json` is the model
`HuggingFaceTB/SmolLM2-135M-Instruct`. Torch-free: the API lists and checks models with it. The deployment's
catalogue (db/catalogue.py) keeps models in the database and object storage instead, and workers download them
into their `models_dir` (worker/catalogue.py); both describe a model as a CatalogueModel.
"""

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from core.errors import InvalidRequest, ModelNotFound

PROVENANCE_FILE = "lorajobs-provenance.json"  # {"provenance": "..."}: where the weights came from, when not the hub's
MODEL_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


@dataclass(frozen=True)
class CatalogueModel:
    id: str
    path: Path | None  # None for a model of the deployment's catalogue: its files are in object storage
    architecture: str | None
    created: int
    provenance: str | None = None
    config: dict | None = None  # config.json as stored in the deployment's catalogue


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _describe(model_id: str, folder: Path) -> CatalogueModel:
    config_file = folder / "config.json"
    architectures = _read_json(config_file).get("architectures") or [None]
    return CatalogueModel(model_id, folder, architectures[0], int(config_file.stat().st_mtime),
                          _read_json(folder / PROVENANCE_FILE).get("provenance"))


def model_config(model: CatalogueModel) -> dict:
    """The model's `config.json` as a dict (read, nothing loaded); empty when unreadable."""
    if model.config is not None:
        return model.config
    return _read_json(model.path / "config.json")


def list_models(models_dir: Path) -> list[CatalogueModel]:
    """Every model folder (one with a `config.json`) one or two levels below `models_dir`."""
    if not models_dir.is_dir():
        return []
    found = []
    for config in sorted(list(models_dir.glob("*/config.json")) + list(models_dir.glob("*/*/config.json"))):
        model_id = config.parent.relative_to(models_dir).as_posix()
        if not model_id.startswith("."):  # `.staging/…`: a download or conversion not finished yet
            found.append(_describe(model_id, config.parent))
    return found


def resolve_model(models_dir: Path, model_id: str, *, param: str = "model") -> CatalogueModel:
    """The catalogue entry for `model_id`, or a 404 naming the models that exist."""
    if MODEL_ID_RE.match(model_id or "") and (models_dir / model_id / "config.json").is_file():
        return _describe(model_id, models_dir / model_id)
    known = ", ".join(m.id for m in list_models(models_dir)) or "none installed"
    raise ModelNotFound(f"The model '{model_id}' is not in the catalogue (available: {known}).", param=param)


def check_model_folder(model_id: str, source: Path) -> None:
    """Refuse an id that is not ORG/NAME or NAME, and a folder that is not a Hugging Face model folder."""
    if not MODEL_ID_RE.match(model_id):
        raise InvalidRequest(f"'{model_id}' is not a valid model id (ORG/NAME or NAME).", param="model")
    if not (source / "config.json").is_file():
        raise InvalidRequest(f"{source} is not a Hugging Face model folder (no config.json).", param="path")


def add_model(models_dir: Path, model_id: str, source: Path, *, link: bool = False) -> CatalogueModel:
    """Register a local Hugging Face model folder under `model_id` (copied, or symlinked with `link`)."""
    check_model_folder(model_id, source)
    target = models_dir / model_id
    if target.exists() or target.is_symlink():
        raise InvalidRequest(f"The model '{model_id}' is already in the catalogue.", param="model")
    target.parent.mkdir(parents=True, exist_ok=True)
    if link:
        os.symlink(source.resolve(), target, target_is_directory=True)
    else:
        shutil.copytree(source, target)
    return _describe(model_id, target)
