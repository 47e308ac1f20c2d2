"""Domain errors: each carries its HTTP status and OpenAI error `type`/`code`; the API renders them."""


class LorajobsError(Exception):
    status_code = 400
    error_type = "invalid_request_error"
    code: str | None = None
    retryable = True  # sets `x-should-retry: false` when False
    retry_after: int | None = None  # seconds, sent as `Retry-After` (the `openai` SDK honours it)

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.extra: dict = {}  # more fields of the error object, e.g. the plan of a job that fits nowhere
        if code is not None:
            self.code = code


class InvalidRequest(LorajobsError):
    status_code = 400
    code = "invalid_request"


class AuthenticationError(LorajobsError):
    status_code = 401
    error_type = "authentication_error"
    code = "invalid_api_key"


class PermissionDenied(LorajobsError):
    status_code = 403
    error_type = "permission_error"
    code = "permission_denied"


class NotFound(LorajobsError):
    status_code = 404
    code = "not_found"


class Conflict(LorajobsError):
    status_code = 409
    code = "conflict"
    retryable = False


class PayloadTooLarge(LorajobsError):
    status_code = 413
    code = "file_too_large"


class ServiceUnavailable(LorajobsError):
    status_code = 503
    error_type = "server_error"
    code = "service_unavailable"


class DatabaseBusy(ServiceUnavailable):
    """No database connection to be had in time: the service is at capacity or its database briefly away."""

    retry_after = 1


class StorageError(LorajobsError):
    status_code = 500
    error_type = "server_error"
    code = "storage_error"


class ObjectNotFound(StorageError):
    """A key that is not in object storage."""

    status_code = 404
    error_type = "invalid_request_error"
    code = "object_not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"


class RateLimited(LorajobsError):
    """A per-key request rate over its window: retry after `Retry-After` seconds (the `openai` SDK does)."""

    status_code = 429
    error_type = "requests"
    code = "rate_limit_exceeded"

    def __init__(self, message: str, *, retry_after: int, param: str | None = None):
        super().__init__(message, param=param)
        self.retry_after = max(1, retry_after)


class QuotaExceeded(RateLimited):
    """A project quota: waiting alone rarely frees it (jobs must finish, files be deleted), so no automatic retry."""

    error_type = "quota"
    retryable = False
