"""The files API through the `openai` SDK, with validation run by a real worker over Redis."""

import io
import json
import time

import httpx
import openai
import pytest

from tests.conftest import make_project_key


def chat_lines(n: int, start: int = 0) -> bytes:
    rows = [{"messages": [{"role": "user", "content": f"What is the price of item {i}?"},
                          {"role": "assistant", "content": f"Item {i} costs {i + 10} euros."}]}
            for i in range(start, start + n)]
    return "\n".join(json.dumps(row) for row in rows).encode() + b"\n"


def upload(client: openai.OpenAI, data: bytes, name: str = "train.jsonl"):
    return client.files.create(file=(name, io.BytesIO(data)), purpose="fine-tune")


def wait_processed(client: openai.OpenAI, file_id: str, timeout: float = 30):
    return client.files.wait_for_processing(file_id, poll_interval=0.2, max_wait_seconds=timeout)


def test_upload_validate_list_page_retrieve_download_delete(openai_client, settings):
    data = chat_lines(12)
    uploaded = upload(openai_client, data)
    assert uploaded.id.startswith("file-") and uploaded.object == "file"
    assert uploaded.bytes == len(data) and uploaded.purpose == "fine-tune" and uploaded.filename == "train.jsonl"
    assert uploaded.status == "uploaded"

    # The validation task went through Redis to the cpu worker, which wrote its verdict to the database.
    processed = wait_processed(openai_client, uploaded.id)
    assert processed.status == "processed"
    report = openai_client.get(f"/files/{uploaded.id}/report", cast_to=object)
    assert report["report"]["format"] == "chat" and report["report"]["examples"] == 12

    assert openai_client.files.content(uploaded.id).read() == data

    second = upload(openai_client, chat_lines(11, 100), "second.jsonl")
    first_page = openai_client.files.list(limit=1)
    assert [f.id for f in first_page.data] == [second.id] and first_page.has_more
    second_page = openai_client.files.list(limit=1, after=second.id)
    assert [f.id for f in second_page.data] == [uploaded.id]
    assert [f.id for f in openai_client.files.list(purpose="fine-tune")] == [second.id, uploaded.id]

    deleted = openai_client.files.delete(uploaded.id)
    assert deleted.deleted and deleted.id == uploaded.id
    with pytest.raises(openai.NotFoundError):
        openai_client.files.retrieve(uploaded.id)


def test_a_file_with_errors_ends_in_error_with_a_summary(openai_client):
    data = chat_lines(12) + b'{"messages": [{"role": "robot", "content": "hi"}]}\n' + b"{not json\n"
    result = wait_processed(openai_client, upload(openai_client, data).id)
    assert result.status == "error"
    assert "line 13" in result.status_details and "unrecognized_role" in result.status_details
    report = openai_client.get(f"/files/{result.id}/report", cast_to=object)["report"]
    problems = {(p["line"], p["code"]) for p in report["errors"]}
    assert {(13, "unrecognized_role"), (14, "invalid_json")} <= problems


def test_too_few_examples_is_an_error(openai_client):
    result = wait_processed(openai_client, upload(openai_client, chat_lines(9)).id)
    assert result.status == "error" and "too_few_examples" in result.status_details


def test_an_empty_file_is_refused(openai_client):
    with pytest.raises(openai.BadRequestError) as caught:
        upload(openai_client, b"")
    assert caught.value.code == "empty_file"


def test_an_unknown_purpose_is_refused(openai_client):
    with pytest.raises(openai.BadRequestError) as caught:
        openai_client.files.create(file=("x.jsonl", io.BytesIO(chat_lines(10))), purpose="batch")
    assert caught.value.param == "purpose"


def test_a_file_over_the_limit_is_413_and_leaves_nothing(stack, settings, project_key, http):
    from core.storage import get_storage

    storage = get_storage(settings)
    before = set(storage.list_keys("projects/"))
    too_big = settings.max_upload_bytes + 1
    stream = io.BytesIO(b"x" * too_big)
    response = http.post("files", data={"purpose": "fine-tune"}, files={"file": ("big.jsonl", stream)})
    assert response.status_code == 413, response.text
    assert response.json()["error"]["code"] == "file_too_large"
    assert http.get("files").json()["data"] == []
    assert set(storage.list_keys("projects/")) == before


def test_another_projects_file_answers_404_like_a_missing_one(stack, settings, openai_client):
    mine = upload(openai_client, chat_lines(10))
    other = make_project_key(settings)
    with httpx.Client(base_url=stack.v1 + "/", headers={"Authorization": f"Bearer {other.key}"}) as theirs:
        for method, path in (("GET", f"files/{mine.id}"), ("GET", f"files/{mine.id}/content"),
                             ("GET", f"files/{mine.id}/report"), ("DELETE", f"files/{mine.id}")):
            response = theirs.request(method, path)
            missing = theirs.request(method, path.replace(mine.id, "file-doesnotexist"))
            assert response.status_code == missing.status_code == 404
            assert response.json()["error"]["code"] == missing.json()["error"]["code"] == "not_found"
        assert theirs.get("files").json()["data"] == []
    assert openai_client.files.retrieve(mine.id).id == mine.id


def test_the_worker_survives_hostile_files(openai_client):
    hostile = {
        "zip.jsonl": b"PK\x03\x04" + bytes(range(256)) * 40,
        "nested.jsonl": b"[" * 200_000 + b"]" * 200_000 + b"\n",
        "array.jsonl": b"[" + b",".join(chat_lines(1).strip() for _ in range(20)) + b"]",
        "bad_utf8.jsonl": chat_lines(5) + b'{"text": "caf\xe9"}\n' + chat_lines(6),
    }
    ids = {name: upload(openai_client, data, name).id for name, data in hostile.items()}
    deadline = time.time() + 60
    results = {}
    while len(results) < len(ids) and time.time() < deadline:
        for name, file_id in ids.items():
            current = openai_client.files.retrieve(file_id)
            if current.status != "uploaded":
                results[name] = current
        time.sleep(0.2)
    assert {name: r.status for name, r in results.items()} == {name: "error" for name in hostile}
    # The worker is still up: a good file is processed after them.
    assert wait_processed(openai_client, upload(openai_client, chat_lines(10)).id).status == "processed"


def test_every_malformed_input_of_the_table_gets_its_code_and_line_through_the_api(openai_client, settings):
    from tests.core.test_validation import MALFORMED

    uploadable = [(name, content, code, line) for name, content, code, line in MALFORMED
                  if isinstance(content, bytes) and 0 < len(content) <= settings.max_upload_bytes]
    assert len(uploadable) >= 25
    ids = {name: upload(openai_client, content, f"case-{i}.jsonl").id
           for i, (name, content, _, _) in enumerate(uploadable)}
    expected = {name: (code, line) for name, _, code, line in uploadable}
    found = {}
    deadline = time.time() + 120
    while len(found) < len(ids) and time.time() < deadline:
        for name, file_id in ids.items():
            if name not in found and openai_client.files.retrieve(file_id).status != "uploaded":
                report = openai_client.get(f"/files/{file_id}/report", cast_to=object)
                found[name] = report
        time.sleep(0.2)
    for name, (code, line) in expected.items():
        report = found[name]
        assert report["status"] == "error", name
        problems = {(p["line"], p["code"]) for p in report["report"]["errors"]}
        assert (line, code) in problems, (name, problems)


def test_any_file_name_is_kept_and_served_safely(openai_client, http):
    name = "données Q3 数据.jsonl"
    uploaded = upload(openai_client, chat_lines(10), "../../etc/" + name)
    assert uploaded.filename == name
    response = http.get(f"files/{uploaded.id}/content")
    assert response.status_code == 200 and response.content == chat_lines(10)
    disposition = response.headers["content-disposition"]
    assert disposition.startswith('attachment; filename="donn_es Q3 __.jsonl"')
    assert "filename*=UTF-8''donn%C3%A9es%20Q3%20%E6%95%B0%E6%8D%AE.jsonl" in disposition
