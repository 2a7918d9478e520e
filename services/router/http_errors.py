"""The one mapping from Tandem's errors to HTTP status codes and the OpenAI error envelope."""

from fastapi.responses import JSONResponse

from tandem.api.errors import (
    CapacityExceeded,
    InvalidRequest,
    KVTransferError,
    ModelNotFound,
    RequestCancelled,
    UpstreamUnavailable,
)

# (exception, HTTP status, OpenAI-style error type), most specific first.
_MAPPING: list[tuple[type[Exception], int, str]] = [
    (InvalidRequest, 400, "BadRequestError"),
    (ModelNotFound, 404, "NotFoundError"),
    (CapacityExceeded, 429, "RateLimitError"),
    (UpstreamUnavailable, 503, "ServiceUnavailableError"),
    (KVTransferError, 503, "ServiceUnavailableError"),
    (RequestCancelled, 499, "RequestCancelled"),
]


def error_body(message: str, status: int, err_type: str, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": err_type, "param": param, "code": status}}


def status_for(exc: BaseException) -> tuple[int, str]:
    for cls, status, err_type in _MAPPING:
        if isinstance(exc, cls):
            return status, err_type
    return 500, "InternalServerError"


def error_response(exc: BaseException, *, retry_after_s: int = 1) -> JSONResponse:
    status, err_type = status_for(exc)
    message = str(exc) if status != 500 else f"internal error: {type(exc).__name__}"
    headers = {"Retry-After": str(retry_after_s)} if status == 429 else None
    body = error_body(message, status, err_type, getattr(exc, "param", None))
    return JSONResponse(body, status_code=status, headers=headers)
