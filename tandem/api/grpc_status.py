"""The one mapping between Tandem's errors and gRPC status codes, both directions.

Servers abort with ``abort_with`` (the offending field travels in trailing metadata); clients
turn an ``RpcError`` back into the same exception class with ``error_from_rpc``.
"""

import grpc

from tandem.api.errors import (
    CapacityExceeded,
    DeadlineExceeded,
    InvalidRequest,
    KVFingerprintMismatch,
    KVTransferError,
    KVTransferForbidden,
    ModelNotFound,
    RequestCancelled,
    RequestTooLarge,
    TandemError,
    Unauthenticated,
    UpstreamCancelled,
    UpstreamUnavailable,
)

PARAM_KEY = "tandem-error-param"

# Most specific first.
_TO_CODE: list[tuple[type[Exception], grpc.StatusCode]] = [
    (RequestTooLarge, grpc.StatusCode.OUT_OF_RANGE),
    (InvalidRequest, grpc.StatusCode.INVALID_ARGUMENT),
    (ModelNotFound, grpc.StatusCode.NOT_FOUND),
    (Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (CapacityExceeded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (UpstreamUnavailable, grpc.StatusCode.UNAVAILABLE),
    (KVFingerprintMismatch, grpc.StatusCode.FAILED_PRECONDITION),
    (KVTransferForbidden, grpc.StatusCode.PERMISSION_DENIED),
    (KVTransferError, grpc.StatusCode.DATA_LOSS),
    (RequestCancelled, grpc.StatusCode.CANCELLED),
    (DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED),
]
_FROM_CODE: dict[grpc.StatusCode, type[TandemError]] = {
    grpc.StatusCode.OUT_OF_RANGE: RequestTooLarge,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidRequest,
    grpc.StatusCode.NOT_FOUND: ModelNotFound,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.RESOURCE_EXHAUSTED: CapacityExceeded,
    grpc.StatusCode.UNAVAILABLE: UpstreamUnavailable,
    grpc.StatusCode.FAILED_PRECONDITION: KVFingerprintMismatch,
    grpc.StatusCode.DATA_LOSS: KVTransferError,
    grpc.StatusCode.PERMISSION_DENIED: KVTransferForbidden,
    # A CANCELLED status received is the peer's doing (our own cancel raises CancelledError
    # instead): an overloaded or stopping server, never "the client went away" (HTTP 499).
    grpc.StatusCode.CANCELLED: UpstreamCancelled,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
}


def grpc_code_for(exc: BaseException) -> grpc.StatusCode:
    for cls, code in _TO_CODE:
        if isinstance(exc, cls):
            return code
    return grpc.StatusCode.INTERNAL


async def abort_with(context: grpc.aio.ServicerContext, exc: BaseException) -> None:
    """End the call with the status matching ``exc`` (raises, as ``context.abort`` does)."""
    param = getattr(exc, "param", None)
    if param:
        context.set_trailing_metadata(((PARAM_KEY, param),))
    await context.abort(grpc_code_for(exc), str(exc))


def error_from_rpc(err: grpc.RpcError) -> TandemError:
    """The Tandem exception for a failed call (``UpstreamUnavailable`` for unknown codes)."""
    code = err.code()
    details = err.details() or code.name
    cls = _FROM_CODE.get(code)
    if cls is None:
        return UpstreamUnavailable(f"{code.name}: {details}")
    if issubclass(cls, InvalidRequest):
        param = None
        for key, value in err.trailing_metadata() or ():
            if key == PARAM_KEY:
                param = value
        return cls(details, param=param)
    if cls is UpstreamCancelled:
        return cls(f"the server cancelled the call ({details}); it may be overloaded")
    return cls(details)
