"""Token statistics of an upload: each catalogue model counts on its own, and one that cannot format fails alone."""

import json
import shutil

import pytest

from core.datasets.validate import validate_jsonl
from core.settings import Settings
from core.storage import get_storage
from db import catalogue
from db.lifecycle import cannot_format, plan
from db.migrate import upgrade
from db.models import File
from db.session import transaction
from tests.helpers.tiny_model import retail_chat_records
from tests.worker.conftest import TINY, tiny_spec
from worker.catalogue import TOKENIZERS_FOLDER
from worker.datasets import add_token_stats

REFUSING = "tiny/refuses-chats"


@pytest.fixture
def counted(models_dir, tmp_path):
    """A catalogue of the tiny model and a copy whose chat template refuses every chat; a file's report from it."""
    catalogue = tmp_path / "models"
    shutil.copytree(models_dir / TINY, catalogue / TINY)
    refusing = shutil.copytree(models_dir / TINY, catalogue / REFUSING)
    config_file = refusing / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config.pop("chat_template", None)
    config_file.write_text(json.dumps(config))
    (refusing / "chat_template.jinja").write_text("{{ raise_exception('this template takes no chats') }}")
    settings = Settings(models_dir=catalogue, data_dir=tmp_path / "var",
                        database_url=f"sqlite:///{tmp_path / 'lorajobs.db'}")  # the deployment's catalogue: empty
    upgrade(settings.database_url)
    storage = get_storage(settings)
    data = "".join(json.dumps(r) + "\n" for r in retail_chat_records(12)).encode()
    storage.put_bytes("train.jsonl", data)
    with storage.open("train.jsonl") as stream:
        report = validate_jsonl(stream)

    return add_token_stats(report, settings, storage, "train.jsonl"), settings


def test_a_model_whose_template_refuses_the_data_is_reported_and_the_others_still_count(counted):
    report, _ = counted
    assert report.ok and report.token_stats[TINY].count == 12 and REFUSING not in report.token_stats
    [warning] = [w for w in report.warnings if w.code == "model_cannot_format"]
    assert warning.line == 1 and warning.model == REFUSING and warning.message.startswith(f"{REFUSING}: ")
    assert "this template takes no chats" in warning.message and "chat_template" in warning.message
    assert report.warning_counts["model_cannot_format"] == 1


def test_a_model_whose_template_refused_the_file_is_not_planned_from_another_models_count(counted):
    report, settings = counted
    training = File(id="file-counted", status="processed", bytes=1, report=report.model_dump(mode="json"))
    config = json.loads((settings.models_dir / REFUSING / "config.json").read_text())
    made = plan(settings, tiny_spec(model=REFUSING, max_seq_length=128), training, separate_validation=False,
                config=config)
    # Not the tiny model's count "a quarter longer" with a note blaming a late-added model: full-length rows, and why.
    assert made.longest_example == 128
    assert not any("were not counted with" in note for note in made.notes)
    assert any(note.startswith("The training file's tokens could not be counted: tiny/refuses-chats: ")
               and "this template takes no chats" in note for note in made.notes)
    # A report stored before warnings named their model is still read by its message.
    stored = report.model_dump(mode="json")
    for warning in stored["warnings"]:
        warning.pop("model")
    assert cannot_format(stored, REFUSING).startswith(f"{REFUSING}: ") and cannot_format(stored, TINY) is None


def test_a_catalogue_tokenizer_that_cannot_be_fetched_leaves_its_model_uncounted_not_refused(models_dir, tmp_path):
    """Object storage lost a tokenizer file of a model added with `lorajobs models add`: no fault of the data, so no
    `model_cannot_format` warning; the file counts for the other models, and a job's plan borrows their count."""
    settings = Settings(models_dir=tmp_path / "models", data_dir=tmp_path / "var", work_dir=tmp_path / "work",
                        database_url=f"sqlite:///{tmp_path / 'lorajobs.db'}")
    upgrade(settings.database_url)
    storage = get_storage(settings)
    shutil.copytree(models_dir / TINY, settings.models_dir / TINY)  # a local folder, counted as before
    with transaction(settings.database_url) as session:
        entry, _ = catalogue.publish(session, storage, "team/lost", models_dir / TINY, source="test")
        lost = next(f for f in entry.files if f["path"] == "tokenizer.json")
    storage.delete(catalogue.blob_key(lost["sha256"]))
    storage.put_bytes("train.jsonl", "".join(json.dumps(r) + "\n" for r in retail_chat_records(12)).encode())
    with storage.open("train.jsonl") as stream:
        report = add_token_stats(validate_jsonl(stream), settings, storage, "train.jsonl")

    assert report.ok and report.token_stats[TINY].count == 12 and "team/lost" not in report.token_stats
    assert not report.warnings
    assert not (settings.work_dir / TOKENIZERS_FOLDER / "team/lost").exists()  # no half-fetched folder left
    training = File(id="file-lost", status="processed", bytes=1, report=report.model_dump(mode="json"))
    config = json.loads((models_dir / TINY / "config.json").read_text())
    made = plan(settings, tiny_spec(model="team/lost"), training, separate_validation=False, config=config)
    assert any(note.startswith("The training file's tokens were not counted with team/lost's tokenizer (the model "
                               "was added after the file was validated, or its tokenizer could not be fetched then)")
               for note in made.notes)
