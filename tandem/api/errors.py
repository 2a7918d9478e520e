"""The one error hierarchy of Tandem.

Every layer raises these; the HTTP and gRPC front doors each map them to a status in exactly one
place. `InvalidRequest` subclasses `ValueError` so library users can catch either.
"""


class TandemError(Exception):
    """Base class of every error Tandem raises on purpose."""


class InvalidRequest(TandemError, ValueError):
    """The request itself is wrong (HTTP 400, gRPC INVALID_ARGUMENT).

    Attributes:
        param: the request field at fault, in the API's own spelling (e.g. ``"top_p"``), or None.
    """

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class RequestTooLarge(InvalidRequest):
    """The request can never be served by this deployment (longer than the model or the KV pool)."""


class Unauthenticated(TandemError):
    """The call carries no valid credentials: API key or cluster secret (HTTP 401, gRPC
    UNAUTHENTICATED)."""


class ModelNotFound(TandemError):
    """The requested model is not served here (HTTP 404, gRPC NOT_FOUND)."""


class ModelLoadError(TandemError):
    """A model directory is missing a file, or holds an unsupported architecture or dtype."""


class CapacityExceeded(TandemError):
    """A pod cannot take the request now; retry later or elsewhere (HTTP 429,
    RESOURCE_EXHAUSTED)."""


class UpstreamUnavailable(TandemError):
    """No backend is ready to serve (HTTP 503, gRPC UNAVAILABLE)."""


class UpstreamCancelled(UpstreamUnavailable):
    """The server side cancelled the call: not the caller's doing (the caller's own cancel never
    surfaces as an error). A gRPC server cancels a call it could not take in time, e.g. one left
    unaccepted in its queue past ``grpc.server_max_unrequested_time_in_server`` under a burst:
    an overloaded peer, not a dead one (HTTP 503 with Retry-After)."""


class ShuttingDown(UpstreamUnavailable):
    """This pod is draining before it exits and takes no new requests (gRPC UNAVAILABLE: retry
    elsewhere)."""


class KVTransferError(TandemError):
    """A KV page stream was short, corrupt or for another model (gRPC DATA_LOSS /
    FAILED_PRECONDITION)."""


class KVPoolUnmappable(KVTransferError):
    """A prefill pod could not map a decode pod's KV pool for the memory transport its front
    chose (gRPC DATA_LOSS). The front then uses gRPC for that decode pod incarnation (a
    counted, logged fallback; refused under ``--kv-transport-strict``)."""


class KVFingerprintMismatch(KVTransferError):
    """KV pages were computed by another model, dtype or layout (gRPC FAILED_PRECONDITION)."""


class KVTransferForbidden(KVTransferError):
    """A KV write or notice without the reservation's transfer token, or for a lease that is
    no longer live (gRPC PERMISSION_DENIED). The reservation's own transfer is not harmed."""


class KVTargetForbidden(KVTransferForbidden):
    """A Prefill request named a decode target the prefill pod does not know from discovery: it
    pushes KV to no arbitrary address (gRPC PERMISSION_DENIED)."""


class RequestCancelled(TandemError):
    """The request was cancelled (client gone, deadline passed); nothing to report to anyone."""


class DeadlineExceeded(TandemError, TimeoutError):
    """The call's deadline passed before it completed (gRPC DEADLINE_EXCEEDED)."""
