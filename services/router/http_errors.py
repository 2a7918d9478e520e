"""The one mapping from Tandem's errors to HTTP status codes and the OpenAI error envelope.

Every error the router's HTTP side answers has the envelope
``{"error": {"message", "type", "param", "code"}}``: Tandem's errors (``error_response``),
Starlette's own (unknown route, wrong method: ``http_exception_response``), and the refusals
that happen before any route runs (``send_error`` for ASGI middleware, ``raw_error_response``
for the HTTP protocol itself).
"""

from http import HTTPStatus

import orjson
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from tandem.api.errors import (
    CapacityExceeded,
    InvalidRequest,
    KVTransferError,
    ModelNotFound,
    RequestCancelled,
    Unauthenticated,
    UpstreamUnavailable,
)

# (exception, HTTP status, OpenAI-style error type), most specific first.
_MAPPING: list[tuple[type[Exception], int, str]] = [
    (InvalidRequest, 400, "BadRequestError"),
    (Unauthenticated, 401, "AuthenticationError"),
    (ModelNotFound, 404, "NotFoundError"),
    (CapacityExceeded, 429, "RateLimitError"),
    (UpstreamUnavailable, 503, "ServiceUnavailableError"),
    (KVTransferError, 503, "ServiceUnavailableError"),
    (RequestCancelled, 499, "RequestCancelled"),
]


_STATUS_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    403: "PermissionDeniedError",
    404: "NotFoundError",
    405: "MethodNotAllowedError",
    408: "RequestTimeoutError",
    413: "RequestTooLargeError",
    429: "RateLimitError",
    503: "ServiceUnavailableError",
}
"""OpenAI-style error type of a status, for errors that are not Tandem's (as the OpenAI SDK
names its exception classes)."""


def error_type(status: int) -> str:
    if status in _STATUS_TYPES:
        return _STATUS_TYPES[status]
    return "InternalServerError" if status >= 500 else "BadRequestError"


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
    # 429 (every decode pod full) and 503 (none ready, or every one tried failed or was too busy
    # to answer) are both "come back later": both say when.
    headers = {"Retry-After": str(retry_after_s)} if status in (429, 503) else None
    if status == 401:
        headers = {"WWW-Authenticate": "Bearer"}  # RFC 6750: the scheme the client must use
    body = error_body(message, status, err_type, getattr(exc, "param", None))
    return JSONResponse(body, status_code=status, headers=headers)


def http_exception_response(exc: HTTPException) -> JSONResponse:
    """Starlette's HTTP errors (404 unknown route, 405 wrong method with its ``Allow``, 400 body
    that would not parse) in the OpenAI envelope."""
    status = exc.status_code
    message = exc.detail if isinstance(exc.detail, str) else HTTPStatus(status).phrase
    body = error_body(message, status, error_type(status))
    return JSONResponse(body, status_code=status, headers=exc.headers)


def error_json(status: int, message: str, param: str | None = None) -> bytes:
    return orjson.dumps(error_body(message, status, error_type(status), param))


async def send_error(
    send, status: int, message: str, *, close: bool = False, headers=(), param: str | None = None
) -> None:
    """Answer a request from pure ASGI middleware with the OpenAI envelope.

    Args:
        close: end the connection after the answer (``Connection: close``): a body that was not
            read must not be parsed as the connection's next request.
        headers: more (name, value) byte pairs.
        param: the request field at fault.
    """
    body = error_json(status, message, param)
    extra = [(b"connection", b"close")] if close else []
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *extra,
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def raw_error_response(status: int, message: str, headers=()) -> bytes:
    """A whole HTTP/1.1 response in the OpenAI envelope that closes the connection, for the
    HTTP protocol to write itself (before or outside any ASGI request)."""
    body = error_json(status, message)
    lines = [
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}".encode(),
        b"content-type: application/json",
        b"content-length: " + str(len(body)).encode(),
        b"connection: close",
        *(name + b": " + value for name, value in headers),
    ]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body
