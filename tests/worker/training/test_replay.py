"""General replay: the base's own answers to built-in general prompts train beside the team's chats."""

import json
import math

import pytest
import torch

from core.general import GENERAL_QUESTIONS, REPLAY_PROMPTS
from tests.helpers.tiny_model import retail_chat_records
from tests.worker.conftest import tiny_spec, write_jsonl
from worker.catalogue import SMOLLM2_ID
from worker.training import TrainingHooks, load_tokenizer, train
from worker.training.answers import HeldOutPrompt, generate_answers
from worker.training.data import IGNORE_INDEX, tokenize_example
from worker.training.model import load_base_model
from worker.training.replay import REPLAY_FILE, REPLAY_MAX_NEW_TOKENS, replay_examples


def run(spec, records, root, models_dir):
    events = []
    root.mkdir(parents=True, exist_ok=True)
    train_file = write_jsonl(root / "train.jsonl", records)
    result = train(spec, train_file, None, root / "out", TrainingHooks(on_event=lambda level, m: events.append(m)),
                   models_dir=models_dir)
    return result, events


def test_replayed_answers_train_beside_the_data_and_the_job_says_how_many(models_dir, tokenizer, tmp_path):
    spec = tiny_spec(general_replay=8, validation_fraction=0.0)
    # What the base answers on its own, before any training: the finished answers are what is replayed.
    expected = replay_examples(load_base_model(spec, models_dir, "cpu"), tokenizer, 8)
    result, events = run(spec, retail_chat_records(20), tmp_path, models_dir)
    kept = len(expected.examples)
    assert result.status == "succeeded" and result.n_train_examples == 20  # the team's examples, counted apart
    assert result.hyperparameters["general_replay"] == 8
    assert result.total_steps == math.ceil((20 + kept) / 4)  # batch 4, one epoch over both
    [line] = [m for m in events if m.startswith("General replay:")]
    assert line.startswith("General replay: the base answered 8 built-in general prompts in ")
    assert f"; {kept} of its answers train beside the data" in line
    if kept < 8:
        assert line.endswith(f"{8 - kept} unfinished within {REPLAY_MAX_NEW_TOKENS} tokens left out.")
    assert any(m.startswith(f"Training 20 examples and {kept} replayed general answers on cpu") for m in events)


def test_no_replay_by_default_below_64_examples_nor_for_text_data(models_dir, tmp_path):
    small, events = run(tiny_spec(validation_fraction=0.0), retail_chat_records(20), tmp_path / "small", models_dir)
    assert small.hyperparameters["general_replay"] == 0 and small.total_steps == 5
    assert not any("replay" in m for m in events)
    texts = [{"text": f"Shipping note {i}: parcels leave the depot at {i % 12 + 1} o'clock."} for i in range(64)]
    text, events = run(tiny_spec(validation_fraction=0.0), texts, tmp_path / "text", models_dir)
    assert text.hyperparameters["general_replay"] == 0 and text.total_steps == 16  # 64 examples, batch 4
    assert "General replay is off: it replays chats, and this training data is text." in events


def test_a_4bit_job_on_the_cpu_replays_answers_of_the_full_precision_base_and_still_trains(models_dir, tmp_path):
    """No inference may run on a 4-bit model before it trains on the CPU (DESIGN.md): the replay asks the
    full-precision base, and the 4-bit layout check at train start passes."""
    result, events = run(tiny_spec(quantization="nf4", general_replay=4, validation_fraction=0.0),
                         retail_chat_records(20), tmp_path, models_dir)
    assert result.status == "succeeded" and result.hyperparameters["general_replay"] == 4
    assert any(m.startswith("General replay: the base answered 4 built-in general prompts") for m in events)


def test_a_resumed_job_trains_on_the_replay_stored_with_its_checkpoint(models_dir, tokenizer, tmp_path):
    """Another attempt, maybe on another GPU class, must not answer anew: the rows its epochs count on stay."""
    spec = tiny_spec(general_replay=8, validation_fraction=0.0, n_epochs=2)
    expected = replay_examples(load_base_model(spec, models_dir, "cpu"), tokenizer, 8)
    kept = len(expected.examples)
    assert kept >= 1  # the tiny model finishes one of its 8 answers: the stored chats are compared, not an empty list
    train_file = write_jsonl(tmp_path / "train.jsonl", retail_chat_records(20))
    stored, checks = {}, []

    def stored_with(step, path, metrics):  # read when the checkpoint is announced: what a worker archives
        stored[step] = json.loads((path / REPLAY_FILE).read_text())

    def stop_at_step_4():
        checks.append(1)
        return len(checks) >= 4

    cut = train(spec, train_file, None, tmp_path / "cut", TrainingHooks(on_checkpoint=stored_with,
                                                                         should_stop=stop_at_step_4),
                models_dir=models_dir)
    assert cut.status == "cancelled" and list(stored) == [4] and stored[4]["asked"] == 8
    assert [[m["content"] for m in chat["messages"]] for chat in stored[4]["chats"]] == [
        [turn.content for turn in example.turns] for example in expected.examples]

    events = []
    resumed = train(spec, train_file, None, tmp_path / "resumed", TrainingHooks(on_event=lambda l, m: events.append(m)),
                    models_dir=models_dir, resume_from=tmp_path / "cut" / "checkpoints" / "checkpoint-4")
    assert resumed.status == "succeeded" and resumed.total_steps == cut.total_steps == 2 * math.ceil((20 + kept) / 4)
    assert (f"General replay: the {kept} answers the base gave to 8 built-in general prompts, stored with the "
            f"checkpoint resumed from, train beside the data again.") in events
    assert not any(m.startswith("General replay: the base answered") for m in events)  # nothing generated anew
    assert any(m.startswith(f"Training 20 examples and {kept} replayed general answers") for m in events)

    # A stored replay damaged on its way (a truncated copy) is not a failed job: the base answers anew, the same.
    checkpoint = tmp_path / "cut" / "checkpoints" / "checkpoint-4"
    (checkpoint / REPLAY_FILE).write_text('{"asked": 8, "seconds": 1.5, "chats": [{"messa')
    events = []
    again = train(spec, train_file, None, tmp_path / "again", TrainingHooks(on_event=lambda l, m: events.append((l, m))),
                  models_dir=models_dir, resume_from=checkpoint)
    assert again.status == "succeeded" and again.total_steps == cut.total_steps
    [warning] = [m for level, m in events if level == "warn"]
    assert warning.startswith(f"General replay: the replay stored with the checkpoint ({REPLAY_FILE}) cannot be "
                              f"read: JSONDecodeError: ")
    assert warning.endswith("; the base answers its prompts anew.")
    assert any(m.startswith("General replay: the base answered 8 built-in general prompts") for _, m in events)


def test_a_replay_that_fails_to_generate_is_a_warning_and_the_job_trains_on_its_data(models_dir, tmp_path,
                                                                                     monkeypatch):
    """Generation can fail where training does not (an architecture's `generate`, memory for the cache): the job
    warns and trains without replay, as it does for the held-out answers."""
    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr("worker.training.replay.generate_finished", out_of_memory)
    warnings = []
    train_file = write_jsonl(tmp_path / "train.jsonl", retail_chat_records(20))
    result = train(tiny_spec(general_replay=8, validation_fraction=0.0), train_file, None, tmp_path / "out",
                   TrainingHooks(on_event=lambda level, m: warnings.append(m) if level == "warn" else None),
                   models_dir=models_dir)
    assert result.status == "succeeded" and result.n_train_examples == 20 and result.total_steps == 5
    assert warnings == ["General replay was skipped, the job trains on its data alone: OutOfMemoryError: CUDA out "
                        "of memory. Tried to allocate 2.00 GiB"]


def test_a_job_resumed_after_its_replay_was_skipped_trains_on_its_data_alone(models_dir, tmp_path, monkeypatch):
    """Resumed on a card where generating would succeed, the job keeps the rows its epochs began with: answering
    anew would grow the data mid-job and move its epochs and steps."""
    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory.")

    monkeypatch.setattr("worker.training.replay.generate_finished", out_of_memory)
    spec = tiny_spec(general_replay=8, validation_fraction=0.0, n_epochs=2, save_steps=2)
    train_file = write_jsonl(tmp_path / "train.jsonl", retail_chat_records(20))
    checks = []
    cut = train(spec, train_file, None, tmp_path / "cut",
                TrainingHooks(should_stop=lambda: checks.append(1) or len(checks) >= 3), models_dir=models_dir)
    checkpoint = tmp_path / "cut" / "checkpoints" / "checkpoint-2"
    assert cut.status == "cancelled" and json.loads((checkpoint / REPLAY_FILE).read_text())["skipped"] == (
        "OutOfMemoryError: CUDA out of memory.")

    monkeypatch.undo()  # generating works where the job resumes
    events = []
    resumed = train(spec, train_file, None, tmp_path / "resumed",
                    TrainingHooks(on_event=lambda level, m: events.append((level, m))), models_dir=models_dir,
                    resume_from=checkpoint)
    assert resumed.status == "succeeded" and resumed.total_steps == cut.total_steps == 2 * 5
    assert ("warn", "General replay was skipped in the attempt this job resumes from (OutOfMemoryError: CUDA out of "
                    "memory.); it goes on training on its data alone, the rows its epochs began with.") in events
    assert not any(m.startswith("General replay: the base answered") for _, m in events)
    assert any(m.startswith("Training 20 examples on cpu") for _, m in events)


@pytest.mark.slow
def test_a_real_model_replays_its_own_finished_answers_trained_to_their_end_of_turn(smollm2_models_dir):
    from worker.training.model import load_full_precision_base

    tokenizer = load_tokenizer(SMOLLM2_ID, smollm2_models_dir)
    base = load_full_precision_base(SMOLLM2_ID, smollm2_models_dir, dtype="float32")
    replay = replay_examples(base, tokenizer, 4)
    assert replay.asked == 4 and len(replay.examples) >= 3  # SmolLM2 answers short questions within 128 tokens
    prompts = [example.turns[0].content for example in replay.examples]
    assert set(prompts) <= set(REPLAY_PROMPTS[:4]) and not set(prompts) & {q for q, _ in GENERAL_QUESTIONS}
    again = generate_answers(base, tokenizer, [HeldOutPrompt([{"role": "user", "content": p}], "") for p in prompts],
                             REPLAY_MAX_NEW_TOKENS)
    assert [example.turns[1].content for example in replay.examples] == again  # the base's own greedy answers
    for example in replay.examples:
        input_ids, labels = tokenize_example(example, tokenizer, 1024, train_on_inputs=False)
        trained = [token for token in labels if token != IGNORE_INDEX]
        # the answer and its end of turn carry loss, the question none
        assert trained[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>")
        assert example.turns[0].content not in tokenizer.decode(trained)
        assert tokenizer.decode(trained[:-1]).strip() == example.turns[1].content
