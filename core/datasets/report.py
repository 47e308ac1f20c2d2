"""The validation report of a dataset file: what `GET /v1/files/{id}/report` returns."""

from pydantic import BaseModel, Field, computed_field

from core.datasets.formats import Format

LISTED_PROBLEMS = 100  # problems listed per kind; the counts go on
SUMMARY_MESSAGE_CHARS = 200


class Problem(BaseModel):
    line: int | None = Field(description="1-based line number; null for a problem of the whole file")
    code: str = Field(description="A stable code, documented in docs/datasets.md")
    message: str = Field(description="What is wrong and how to fix it")
    model: str | None = Field(None, description="The base model a problem of one model's tokenizer or chat template "
                                                "is about (`truncation`, `model_cannot_format`); null for the others")


class Duplicates(BaseModel):
    count: int = Field(0, description="Examples that repeat an earlier one")
    pairs: list[tuple[int, int]] = Field(
        default_factory=list, description="The first few (earlier line, repeating line) pairs"
    )


class TokenStats(BaseModel):
    model: str = Field(description="Catalogue id of the base model whose tokenizer counted")
    max_seq_length: int = Field(description="The length examples are truncated to")
    count: int = Field(description="Examples counted")
    total: int = Field(description="Tokens in all examples, before truncation")
    min: int
    mean: float
    p95: int
    max: int
    truncated: int = Field(description="Examples longer than max_seq_length")
    no_trainable_after_truncation: int = Field(
        description="Examples whose trained tokens all fall beyond max_seq_length"
    )
    truncated_lines: list[int] = Field(default_factory=list, description="The first few truncated lines")


class ValidationReport(BaseModel):
    format: Format | None = Field(description="The format the file's first recognised record announced")
    examples: int = Field(description="Valid examples")
    lines: int = Field(description="Non-blank lines read")
    errors: list[Problem] = Field(default_factory=list, description="The first 100 errors")
    warnings: list[Problem] = Field(default_factory=list, description="The first 100 warnings")
    error_counts: dict[str, int] = Field(default_factory=dict, description="Errors per code, all of them")
    warning_counts: dict[str, int] = Field(default_factory=dict, description="Warnings per code, all of them")
    duplicates: Duplicates = Field(default_factory=Duplicates)
    token_stats: dict[str, TokenStats] = Field(default_factory=dict, description="Per base model id")

    @computed_field(description="True when the file has no error: it can be trained on")
    @property
    def ok(self) -> bool:
        return not self.error_counts

    @computed_field(description="One line for the file's status_details")
    @property
    def summary(self) -> str:
        if self.ok:
            return _ok_summary(self)
        return _error_summary(self)

    def with_token_stats(self, stats: TokenStats) -> "ValidationReport":
        """A copy with one model's token statistics, warning about truncation when there is any."""
        report = self.model_copy(deep=True)
        report.token_stats[stats.model] = stats
        if stats.truncated:
            report.warning_counts["truncation"] = report.warning_counts.get("truncation", 0) + 1
            if len(report.warnings) < LISTED_PROBLEMS:
                report.warnings.append(_truncation_warning(stats))
        return report


    def with_token_stats_failure(self, model: str, line: int | None, message: str) -> "ValidationReport":
        """A copy that says one catalogue model cannot count this file (its template refuses it); the file stays usable."""
        report = self.model_copy(deep=True)
        report.warning_counts["model_cannot_format"] = report.warning_counts.get("model_cannot_format", 0) + 1
        if len(report.warnings) < LISTED_PROBLEMS:
            report.warnings.append(Problem(
                line=line, code="model_cannot_format", model=model,
                message=f"{model}: {message}; jobs on this model need another chat_template (see docs/job-spec.md)"))
        return report


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def _ok_summary(report: ValidationReport) -> str:
    summary = f"{_plural(report.examples, 'example')} in {report.format} format"
    if report.warning_counts:
        counts = ", ".join(f"{code} ×{n}" for code, n in report.warning_counts.items())
        summary += f"; {_plural(sum(report.warning_counts.values()), 'warning')}: {counts}"
    return summary


def _error_summary(report: ValidationReport) -> str:
    """The first error in full, then how many of every other code: enough to start fixing."""
    first = report.errors[0]
    message = first.message
    if len(message) > SUMMARY_MESSAGE_CHARS:
        message = message[: SUMMARY_MESSAGE_CHARS - 1] + "…"
    where = f"line {first.line}: " if first.line is not None else ""
    summary = f"{_plural(sum(report.error_counts.values()), 'error')}: {where}{first.code} — {message}"
    others = {code: n for code, n in report.error_counts.items() if code != first.code}
    if report.error_counts[first.code] > 1:
        others = {first.code: report.error_counts[first.code] - 1, **others}
    if others:
        summary += "; also " + ", ".join(f"{code} ×{n}" for code, n in others.items())
    return summary


def _truncation_warning(stats: TokenStats) -> Problem:
    message = (
        f"{stats.model}: {stats.truncated} of {stats.count} examples are longer than "
        f"{stats.max_seq_length} tokens (longest {stats.max}) and will be truncated"
    )
    if stats.no_trainable_after_truncation:
        message += f"; {stats.no_trainable_after_truncation} would keep no trained token and teach nothing"
    message += ": shorten them or raise max_seq_length"
    first_line = stats.truncated_lines[0] if stats.truncated_lines else None
    return Problem(line=first_line, code="truncation", message=message, model=stats.model)
