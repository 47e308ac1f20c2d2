"""Token statistics of an upload: each catalogue model counts on its own, and one that cannot format fails alone."""

import json
import shutil

from core.datasets.validate import validate_jsonl
from core.settings import Settings
from core.storage import get_storage
from tests.helpers.tiny_model import retail_chat_records
from tests.worker.conftest import TINY
from worker.datasets import add_token_stats

REFUSING = "tiny/refuses-chats"


def test_a_model_whose_template_refuses_the_data_is_reported_and_the_others_still_count(models_dir, tmp_path):
    catalogue = tmp_path / "models"
    shutil.copytree(models_dir / TINY, catalogue / TINY)
    refusing = shutil.copytree(models_dir / TINY, catalogue / REFUSING)
    config_file = refusing / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config.pop("chat_template", None)
    config_file.write_text(json.dumps(config))
    (refusing / "chat_template.jinja").write_text("{{ raise_exception('this template takes no chats') }}")
    settings = Settings(models_dir=catalogue, data_dir=tmp_path / "var")
    storage = get_storage(settings)
    data = "".join(json.dumps(r) + "\n" for r in retail_chat_records(12)).encode()
    storage.put_bytes("train.jsonl", data)
    with storage.open("train.jsonl") as stream:
        report = validate_jsonl(stream)

    report = add_token_stats(report, settings, storage, "train.jsonl")

    assert report.ok and report.token_stats[TINY].count == 12 and REFUSING not in report.token_stats
    [warning] = [w for w in report.warnings if w.code == "model_cannot_format"]
    assert warning.line == 1 and warning.message.startswith(f"{REFUSING}: ")
    assert "this template takes no chats" in warning.message and "chat_template" in warning.message
    assert report.warning_counts["model_cannot_format"] == 1
