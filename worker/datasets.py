"""Validation of an uploaded dataset: stream it from storage, write the report, settle the file's status."""

import logging

from core.datasets.report import ValidationReport
from core.datasets.tokens import TokenCount, token_statistics
from core.datasets.validate import iter_examples, validate_jsonl
from core.settings import Settings, get_settings
from core.spec import JobSpec
from core.storage import Storage, get_storage
from db import lifecycle
from db.repositories import files as files_repo
from db.session import transaction

log = logging.getLogger("lorajobs.worker.datasets")

NO_TRUNCATION = 1 << 30


def token_counter(tokenizer, max_seq_length: int):
    """Count an example's tokens the way training tokenizes it, and what truncation would leave trained."""
    from worker.training import tokenize_example

    def count(example) -> TokenCount:
        input_ids, labels = tokenize_example(example, tokenizer, NO_TRUNCATION, False)
        kept = labels[:max_seq_length]
        # The first label never carries loss: nothing predicts the first token.
        trained = sum(1 for label in kept[1:] if label != -100)
        return TokenCount(len(input_ids), trained, len(input_ids) > max_seq_length)

    return count


def _tracking_lines(examples, where: dict):
    for line, example in examples:
        where["line"] = line
        yield line, example


def add_token_stats(report: ValidationReport, settings: Settings, storage: Storage, key: str) -> ValidationReport:
    """Token statistics for every catalogue model, at the job spec's default max_seq_length and chat template.

    Every model of the deployment's catalogue counts, not only those this host has downloaded: a model's tokenizer
    comes without its weights (`tokenizer_models_dir`). Each model counts on its own: one whose tokenizer or
    template cannot format the data gets a warning in the report, and the others still count. A tokenizer that
    cannot be fetched (object storage, disk) is no fault of the data: that model gets no count, and a job's plan
    borrows another model's, with its note.
    """
    from db import catalogue
    from worker.catalogue import tokenizer_models_dir
    from worker.training import load_tokenizer

    max_seq_length = JobSpec.model_fields["max_seq_length"].default
    with transaction(settings.database_url) as session:
        models = catalogue.list_all(session, settings.models_dir)
    for model in models:
        where: dict = {"line": None}
        try:
            models_dir = tokenizer_models_dir(settings, storage, model.id)
        except Exception:  # storage or disk, not the data: no count, and the plan borrows another model's, saying so
            log.warning("the tokenizer of %s could not be fetched for token statistics", model.id, exc_info=True)
            continue
        try:
            tokenizer = load_tokenizer(model.id, models_dir)
            with storage.open(key) as stream:
                stats = token_statistics(_tracking_lines(iter_examples(stream), where), model=model.id,
                                         max_seq_length=max_seq_length, count=token_counter(tokenizer, max_seq_length))
        except Exception as exc:  # this model loses its statistics, with the reason; the file is still usable
            log.warning("token statistics failed for %s", model.id, exc_info=True)
            report = report.with_token_stats_failure(model.id, where["line"], f"{type(exc).__name__}: {exc}"[:300])
            continue
        report = report.with_token_stats(stats)
    return report


def validate_file(file_id: str) -> None:
    """Validate a file once; a file already processed or in error is left as it is."""
    settings = get_settings()
    storage = get_storage(settings)
    with transaction(settings.database_url) as session:
        row = files_repo.get_any(session, file_id)
        if row is None or row.status != "uploaded":
            return
        key = row.storage_key
    try:
        with storage.open(key) as stream:
            report = validate_jsonl(stream)
        if report.ok:
            report = add_token_stats(report, settings, storage, key)
        report_data, ok, summary = report.model_dump(mode="json"), report.ok, report.summary
    except Exception as exc:  # the file gets a clear status; the worker stays up
        log.exception("validation crashed", extra={"file_id": file_id})
        report_data, ok, summary = None, False, f"Validation failed unexpectedly: {type(exc).__name__}"
    with transaction(settings.database_url) as session:
        row = files_repo.get_any(session, file_id)
        if row is None:
            return
        row.report = report_data
        row.status = "processed" if ok else "error"
        row.status_details = None if ok else summary
        lifecycle.promote_waiting_jobs(session, settings, row)
    log.info("file validated", extra={"file_id": file_id, "ok": ok})
