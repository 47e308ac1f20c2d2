"""Validation of a JSONL dataset in one streaming pass, in bounded memory, whatever the bytes are.

Every line is read, decoded, depth-checked, parsed and checked against the file's format (the
first recognised record sets it: one file, one format). Problems are reported with 1-based line
numbers and stable codes (docs/datasets.md). Binary content and a JSON array stop the pass early:
nothing after them can be a JSONL example.
"""

import hashlib
import json
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

from core.datasets.formats import FORMATS, ROLES, Example, Format, detect_format, to_example
from core.datasets.lines import RawLine, read_lines
from core.datasets.report import LISTED_PROBLEMS, Duplicates, Problem, ValidationReport

MAX_LINE_BYTES = 8 * 1024 * 1024
MAX_DEPTH = 64  # a chat record needs 3 levels; json's C parser recurses, so depth is bounded first
MIN_EXAMPLES = 10  # OpenAI's minimum
LISTED_DUPLICATE_PAIRS = 10
MESSAGE_KEYS = frozenset({"role", "content", "weight", "name"})
BOM = b"\xef\xbb\xbf"

# Signatures at the start of a file that is clearly not JSONL text (UTF-16 BOMs included).
SIGNATURES = (
    (b"PK\x03\x04", "a ZIP archive (or a .docx/.xlsx file)", "upload the .jsonl file itself"),
    (b"PK\x05\x06", "an empty ZIP archive", "upload the .jsonl file itself"),
    (b"\x1f\x8b", "a gzip-compressed file", "decompress it first"),
    (b"\xfd7zXZ\x00", "an xz-compressed file", "decompress it first"),
    (b"\x28\xb5\x2f\xfd", "a zstd-compressed file", "decompress it first"),
    (b"7z\xbc\xaf\x27\x1c", "a 7-Zip archive", "upload the .jsonl file itself"),
    (b"PAR1", "a Parquet file", "convert it to JSONL"),
    (b"%PDF-", "a PDF document", "convert it to JSONL"),
    (b"\xff\xfe", "UTF-16 text", "save it as UTF-8"),
    (b"\xfe\xff", "UTF-16 text", "save it as UTF-8"),
)

# The keys each format requires, with the code for a missing one. All but `messages` hold non-empty
# text; the instruction format's optional `input` may be empty or absent.
REQUIRED_FIELDS: dict[Format, tuple[tuple[str, str], ...]] = {
    "chat": (("messages", "missing_messages"),),
    "prompt_completion": (("prompt", "missing_prompt"), ("completion", "missing_completion")),
    "instruction": (("instruction", "missing_instruction"), ("output", "missing_output")),
    "text": (("text", "missing_text"),),
}
FORMAT_SHAPES = {
    "chat": '{"messages": [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}]}',
    "prompt_completion": '{"prompt": ..., "completion": ...}',
    "instruction": '{"instruction": ..., "input": ... (optional), "output": ...}',
    "text": '{"text": ...}',
}

_STRUCTURE = re.compile(r'[\[\]{}"\\]')
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


class _Stop(Exception):
    """Raised for content after which no line can be an example; carries the one problem."""

    def __init__(self, line: int, code: str, message: str):
        self.problem = Problem(line=line, code=code, message=message)


@dataclass
class _LineOutcome:
    line: int
    example: Example | None  # None when the line has errors
    errors: list[Problem]


@dataclass
class _Problems:
    """The errors of one line, at most one per code (the first says enough to fix the rest)."""

    line: int
    found: list[Problem] = field(default_factory=list)

    def add(self, code: str, message: str) -> None:
        if all(problem.code != code for problem in self.found):
            self.found.append(Problem(line=self.line, code=code, message=message))


@dataclass
class _Scanner:
    """Turns raw lines into outcomes, remembering the format the file started with."""

    max_line_bytes: int
    format: Format | None = None
    format_line: int | None = None
    seen_record: bool = False
    stopped: Problem | None = None

    def outcomes(self, stream: BinaryIO) -> Iterator[_LineOutcome]:
        """One outcome per non-blank line, until the end or until content that stops the pass."""
        for raw in read_lines(stream, self.max_line_bytes):
            try:
                outcome = self._check(raw)
            except _Stop as stop:
                self.stopped = stop.problem
                return
            if outcome is not None:
                yield outcome

    def _check(self, raw: RawLine) -> _LineOutcome | None:
        _check_binary(raw)
        data, head = raw.data, raw.head.removeprefix(BOM)
        if data is not None:
            # A BOM can start any line of files concatenated with `cat`, not only the first.
            data = data.removeprefix(BOM)
            if not data.strip(b" \t"):
                return None
        if not self.seen_record:
            self.seen_record = True
            if (data if data is not None else head).lstrip(b" \t")[:1] == b"[":
                raise _Stop(
                    raw.number,
                    "json_array",
                    "this file is a JSON array: upload JSONL, one JSON object per line, not a JSON array",
                )
        problems = _Problems(raw.number)
        if data is None:
            problems.add(
                "line_too_long",
                f"the line is {raw.size:,} bytes, over the limit of {self.max_line_bytes:,}: "
                "put one example per line and keep each under the limit",
            )
        elif (record := _parse(data, problems)) is not None:
            self._check_record(record, problems)
        if problems.found:
            return _LineOutcome(raw.number, None, problems.found)
        return _LineOutcome(raw.number, to_example(record, self.format), [])

    def _check_record(self, record: dict, problems: _Problems) -> None:
        line_format = detect_format(record)
        if self.format is None and line_format is not None:
            self.format, self.format_line = line_format, problems.line
        if self.format is None:
            keys = ", ".join(_show(key) for key in list(record)[:5]) or "none"
            problems.add("unknown_format", f"the keys ({keys}) fit no format: use one of {_format_list()}")
        elif line_format is not None and line_format != self.format:
            problems.add(
                "format_mismatch",
                f"this line is {line_format} but the file started as {self.format} on line {self.format_line}: "
                "one file, one format",
            )
        else:
            _check_fields(record, self.format, problems)


def _check_binary(raw: RawLine) -> None:
    if raw.number == 1:
        for signature, kind, advice in SIGNATURES:
            if raw.head.startswith(signature):
                raise _Stop(1, "binary_content", f"this looks like {kind}, not JSONL text: {advice}")
    if raw.has_nul:
        raise _Stop(raw.number, "binary_content", "NUL bytes: this looks like a binary file, not JSONL text")


def _parse(data: bytes, problems: _Problems) -> dict | None:
    """The line's JSON object, or None with the reason added to `problems`."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        byte = data[error.start : error.start + 1].hex()
        problems.add("invalid_utf8", f"byte {error.start + 1} (0x{byte}) is not valid UTF-8: save the file as UTF-8")
        return None
    if _too_deep(text):
        problems.add("nesting_too_deep", f"the JSON is nested deeper than {MAX_DEPTH} levels")
        return None
    try:
        record = _DECODER.decode(text)
    except json.JSONDecodeError as error:
        problems.add("invalid_json", _json_error_message(text, error))
        return None
    except ValueError as error:  # NaN or Infinity, or an integer of more than 4,300 digits
        problems.add("invalid_json", str(error))
        return None
    if not isinstance(record, dict):
        problems.add("not_an_object", f"the line is {_json_type(record)}, not an object: one example object per line")
        return None
    if _SURROGATE_ESCAPE.search(text) and not _is_valid_unicode(record):
        problems.add("invalid_json", "a \\uD800-\\uDFFF escape without its pair: the text is not valid Unicode")
        return None
    return record


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON: use null or a number")


_DECODER = json.JSONDecoder(parse_constant=_reject_constant)


def _too_deep(text: str) -> bool:
    """Whether brackets outside strings nest deeper than MAX_DEPTH: one linear scan, no recursion."""
    if text.count("{") + text.count("[") <= MAX_DEPTH:
        return False
    depth, in_string, escaped_until = 0, False, -1
    for match in _STRUCTURE.finditer(text):
        position, char = match.start(), match.group()
        if position < escaped_until:
            continue
        if in_string:
            if char == "\\":
                escaped_until = position + 2
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            if depth > MAX_DEPTH:
                return True
        elif char in "]}":
            depth -= 1
    return False


def _json_error_message(text: str, error: json.JSONDecodeError) -> str:
    message = f"{error.msg} at column {error.colno}"
    stripped = text.strip()
    if stripped in ("{", "}", "},", "[", "]"):
        message += ": this looks like pretty-printed JSON; put each example on one line"
    elif stripped.endswith("},"):
        message += ": remove the trailing comma; JSONL lines are not separated by commas"
    return message


def _is_valid_unicode(record: dict) -> bool:
    try:
        json.dumps(record, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _check_fields(record: dict, fmt: Format, problems: _Problems) -> None:
    for key, code in REQUIRED_FIELDS[fmt]:
        if key not in record:
            problems.add(code, f'no "{key}" key: a {fmt} example looks like {FORMAT_SHAPES[fmt]}')
    if fmt == "chat":
        if "messages" in record:
            _check_messages(record["messages"], problems)
        return
    for key, _ in REQUIRED_FIELDS[fmt]:
        if key in record:
            _check_text(f'"{key}"', record[key], problems)
    if fmt == "instruction" and record.get("input") is not None and not isinstance(record["input"], str):
        problems.add("content_not_a_string", f'"input" is {_json_type(record["input"])}, not a string')


def _check_text(where: str, value: object, problems: _Problems) -> None:
    if not isinstance(value, str):
        problems.add("content_not_a_string", f"{where} is {_json_type(value)}, not a string")
    elif not value.strip():
        problems.add("empty_content", f"{where} is empty: give it text or remove the example")


def _check_messages(messages: object, problems: _Problems) -> None:
    if not isinstance(messages, list):
        problems.add("messages_not_a_list", f'"messages" is {_json_type(messages)}, not a list of messages')
        return
    assistant = trained = False
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            message_type = _json_type(message)
            problems.add("message_not_an_object", f"{where} is {message_type}, not an object with role and content")
            continue
        _check_message(where, message, problems)
        if message.get("role") == "assistant":
            assistant = True
            # Only an explicit 0 turns training off; any other weight is reported as invalid_weight.
            trained = trained or message.get("weight", 1) != 0
    if not assistant:
        problems.add("no_assistant_message", "no assistant message: the model learns from assistant messages")
    elif not trained:
        problems.add("no_assistant_message", "every assistant message has weight 0: nothing would be learned")


def _check_message(where: str, message: dict, problems: _Problems) -> None:
    role = message.get("role")
    if "role" not in message:
        problems.add("unrecognized_role", f"{where} has no role: use system, user or assistant")
    elif role not in ROLES:
        problems.add("unrecognized_role", f"{where} has role {_show(role)}: use system, user or assistant")
    if "content" not in message:
        problems.add("missing_content", f'{where} has no "content"')
    elif role != "system" or not isinstance(message["content"], str):
        # An empty system message is harmless; an empty user or assistant one breaks the example.
        _check_text(f"{where}.content", message["content"], problems)
    for key in message:
        if key not in MESSAGE_KEYS:
            allowed = "a message holds role, content, weight and name"
            problems.add("unrecognized_key", f"{where} has key {_show(key)}: {allowed}")
    if "weight" in message:
        _check_weight(where, role, message["weight"], problems)


def _check_weight(where: str, role: object, weight: object, problems: _Problems) -> None:
    if role != "assistant":
        problems.add("invalid_weight", f"{where} is {_show(role)} with a weight: only assistant messages take one")
    elif isinstance(weight, bool) or weight not in (0, 1):
        problems.add("invalid_weight", f"{where} has weight {_show(weight)}: use 0 (not trained) or 1 (trained)")


def _json_type(value: object) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")


def _show(value: object) -> str:
    """A value quoted for a message, cut short: a message must never echo a huge line."""
    shown = json.dumps(value, ensure_ascii=False)
    return shown if len(shown) <= 40 else shown[:39] + "…"


def _format_list() -> str:
    return "; ".join(FORMAT_SHAPES[fmt] for fmt in FORMATS)


@dataclass
class _Tally:
    """Adds outcomes up into a report, keeping the first problems and counting all."""

    lines: int = 0
    examples: int = 0
    errors: list[Problem] = field(default_factory=list)
    warnings: list[Problem] = field(default_factory=list)
    error_counts: Counter = field(default_factory=Counter)
    warning_counts: Counter = field(default_factory=Counter)
    duplicates: Duplicates = field(default_factory=Duplicates)
    # 8-byte fingerprints: about 100 bytes an example in a dict, 100 MB for a million examples.
    first_line_of: dict[int, int] = field(default_factory=dict)

    def add(self, outcome: _LineOutcome) -> None:
        self.lines += 1
        for problem in outcome.errors:
            self._error(problem)
        if outcome.example is not None:
            self.examples += 1
            self._check_duplicate(outcome.line, outcome.example)

    def report(self, scanner: _Scanner) -> ValidationReport:
        if scanner.stopped is not None:
            self.lines += 1
            self._error(scanner.stopped)
        elif self.lines == 0:
            message = "the file holds no examples, only blank lines or nothing"
            self._error(Problem(line=None, code="empty_file", message=message))
        elif self.lines < MIN_EXAMPLES:
            self._error(
                Problem(
                    line=None,
                    code="too_few_examples",
                    message=f"the file has {self.lines} examples; fine-tuning needs at least {MIN_EXAMPLES}",
                )
            )
        return ValidationReport(
            format=scanner.format,
            examples=self.examples,
            lines=self.lines,
            errors=self.errors,
            warnings=self.warnings,
            error_counts=dict(self.error_counts),
            warning_counts=dict(self.warning_counts),
            duplicates=self.duplicates,
        )

    def _error(self, problem: Problem) -> None:
        self.error_counts[problem.code] += 1
        if len(self.errors) < LISTED_PROBLEMS:
            self.errors.append(problem)

    def _check_duplicate(self, line: int, example: Example) -> None:
        first = self.first_line_of.setdefault(_fingerprint(example), line)
        if first == line:
            return
        self.duplicates.count += 1
        if len(self.duplicates.pairs) < LISTED_DUPLICATE_PAIRS:
            self.duplicates.pairs.append((first, line))
        self.warning_counts["duplicate_example"] += 1
        if len(self.warnings) < LISTED_PROBLEMS:
            message = f"repeats line {first}: a duplicate weighs the same example twice"
            self.warnings.append(Problem(line=line, code="duplicate_example", message=message))


def _fingerprint(example: Example) -> int:
    """Equal for examples that normalise the same, whatever their JSON spacing or key order."""
    turns = [[turn.role, turn.content, turn.trained] for turn in example.turns]
    canonical = json.dumps([example.kind, example.text, turns]).encode("ascii")
    return int.from_bytes(hashlib.blake2b(canonical, digest_size=8).digest())


def validate_jsonl(stream: BinaryIO, *, max_line_bytes: int = MAX_LINE_BYTES) -> ValidationReport:
    """Validate a JSONL dataset read from a binary stream, in one pass and bounded memory."""
    scanner = _Scanner(max_line_bytes)
    tally = _Tally()
    for outcome in scanner.outcomes(stream):
        tally.add(outcome)
    return tally.report(scanner)


def iter_examples(stream: BinaryIO, *, max_line_bytes: int = MAX_LINE_BYTES) -> Iterator[tuple[int, Example]]:
    """The normalised examples of a validated file with their line numbers; lines with errors are skipped."""
    for outcome in _Scanner(max_line_bytes).outcomes(stream):
        if outcome.example is not None:
            yield outcome.line, outcome.example
