"""The cluster secret: what every Tandem gRPC call between pods, kvstore and the router carries.

Every Tandem gRPC server (prefill, decode, kvstore) refuses a call whose metadata lacks the
cluster's shared secret with UNAUTHENTICATED (``tandem.serving.grpc_server``), except the
standard ``grpc.health.v1`` service that Kubernetes probes call without credentials. Every
channel Tandem opens to one of them adds the secret through the client interceptors here
(``aio_channel`` / ``channel``), so the calls themselves never mention it.

Where the secret comes from, first found wins: ``--cluster-secret-file`` (a mounted Kubernetes
Secret), the ``TANDEM_CLUSTER_SECRET`` environment variable. A service without one refuses to
start unless ``--allow-unauthenticated`` says so explicitly. ``install`` makes a service's
resolved secret the process default (channels opened without an explicit ``ClusterAuth`` use it)
and exports it to the processes it spawns (the engine core's KV sender) through the same
environment variable, never on a command line.

Torch-free, imported by every process.
"""

import hmac
import os
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import grpc
from pydantic import BaseModel, ConfigDict

from tandem.api.errors import TandemError

METADATA_KEY = "x-tandem-cluster-secret"
"""gRPC metadata key of the cluster secret (lower case, as gRPC requires)."""
SECRET_ENV = "TANDEM_CLUSTER_SECRET"
"""Environment variable holding the cluster secret (services and the processes they spawn)."""
MIN_SECRET_CHARS = 16
"""A shorter secret is refused at start: it could be guessed."""


class ClusterSecretMissing(TandemError):
    """A service was started without a cluster secret and without ``--allow-unauthenticated``."""


class ClusterAuthOptions(BaseModel):
    """The settings fields every service shares (mixed into each service's settings)."""

    model_config = ConfigDict(frozen=True, use_attribute_docstrings=True)

    cluster_secret_file: Path | None = None
    """File holding the cluster secret (one line) that every gRPC call between Tandem's
    services must carry (default: the TANDEM_CLUSTER_SECRET environment variable)."""
    allow_unauthenticated: bool = False
    """Serve and call other services without a cluster secret: anyone who reaches a port can
    Generate, PushKV, Prefill, Lookup or publish events. Only for a trusted, fenced network."""

    def cluster_auth(self, environ: Mapping[str, str] | None = None) -> "ClusterAuth":
        """The resolved secret (see the module docstring).

        Raises:
            ClusterSecretMissing: none found and ``allow_unauthenticated`` is off, or too short.
        """
        return resolve(self.cluster_secret_file, self.allow_unauthenticated, environ)


@dataclass(frozen=True, slots=True)
class ClusterAuth:
    """A resolved cluster secret; ``secret`` None means unauthenticated (explicit opt-out)."""

    secret: str | None

    def __repr__(self) -> str:  # never print the secret
        return f"ClusterAuth({'set' if self.secret else 'none'})"

    @property
    def enabled(self) -> bool:
        return self.secret is not None

    def check(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> bool:
        """Whether ``metadata`` carries this secret (constant-time compare); always true when
        unauthenticated."""
        if self.secret is None:
            return True
        return metadata_has_secret(metadata, METADATA_KEY, [self.secret])

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """The metadata pair to send (none when unauthenticated)."""
        return () if self.secret is None else ((METADATA_KEY, self.secret),)

    def aio_interceptors(self) -> list[grpc.aio.ClientInterceptor]:
        return [] if self.secret is None else list(_aio_interceptors(self.metadata()))


def metadata_has_secret(
    metadata: Iterable[tuple[str, str | bytes]] | None, key: str, accepted: Iterable[str]
) -> bool:
    """Whether ``metadata``'s value under ``key`` equals one of ``accepted``, each compared in
    constant time (every candidate is compared: the time does not tell which one matched)."""
    value = next((v for k, v in metadata or () if k == key), None)
    if value is None:
        return False
    given = value if isinstance(value, bytes) else value.encode()
    matched = False
    for candidate in accepted:
        matched |= hmac.compare_digest(given, candidate.encode())
    return matched


def resolve(
    secret_file: Path | None,
    allow_unauthenticated: bool,
    environ: Mapping[str, str] | None = None,
) -> ClusterAuth:
    """The secret from ``secret_file`` or ``TANDEM_CLUSTER_SECRET`` (see ``ClusterAuthOptions``)."""
    environ = os.environ if environ is None else environ
    if secret_file is not None:
        try:
            secret = Path(secret_file).read_text().strip()
        except OSError as exc:
            raise ClusterSecretMissing(
                f"cannot read --cluster-secret-file {secret_file}: {exc.strerror}"
            ) from None
    else:
        secret = environ.get(SECRET_ENV, "").strip()
    if not secret:
        if allow_unauthenticated:
            return ClusterAuth(None)
        raise ClusterSecretMissing(
            f"no cluster secret: set {SECRET_ENV} or --cluster-secret-file (every service of "
            "the deployment needs the same one), or pass --allow-unauthenticated to run without "
            "authentication on a trusted network"
        )
    if len(secret) < MIN_SECRET_CHARS:
        raise ClusterSecretMissing(
            f"the cluster secret is shorter than {MIN_SECRET_CHARS} characters"
        )
    return ClusterAuth(secret)


def generate_secret() -> str:
    """A fresh random secret (``tandem up`` makes one per run)."""
    return secrets.token_urlsafe(32)


_installed: ClusterAuth | None = None


def install(auth: ClusterAuth) -> None:
    """Make ``auth`` this process's default and hand it to the processes it spawns."""
    global _installed
    _installed = auth
    if auth.secret is None:
        os.environ.pop(SECRET_ENV, None)
    else:
        os.environ[SECRET_ENV] = auth.secret


def process_auth() -> ClusterAuth:
    """The installed secret, else ``TANDEM_CLUSTER_SECRET`` (the engine core, tests, tools), else
    none (the servers then refuse the calls)."""
    if _installed is not None:
        return _installed
    secret = os.environ.get(SECRET_ENV, "").strip()
    return ClusterAuth(secret or None)


def aio_channel(address: str, options: list, auth: ClusterAuth | None = None) -> grpc.aio.Channel:
    """An asyncio channel to a Tandem service whose every call carries the cluster secret."""
    auth = auth or process_auth()
    return grpc.aio.insecure_channel(
        address, options=options, interceptors=auth.aio_interceptors() or None
    )


def channel(address: str, options: list, auth: ClusterAuth | None = None) -> grpc.Channel:
    """A blocking channel to a Tandem service whose every call carries the cluster secret."""
    auth = auth or process_auth()
    plain = grpc.insecure_channel(address, options=options)
    if auth.secret is None:
        return plain
    return grpc.intercept_channel(plain, _SyncInterceptor(auth.metadata()))


# ---- client interceptors ------------------------------------------------------------------------


def _merged(metadata, extra: tuple[tuple[str, str], ...]) -> list[tuple[str, str]]:
    return [*(metadata or ()), *extra]


def _aio_interceptors(extra: tuple[tuple[str, str], ...]):
    def details_with(details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        return grpc.aio.ClientCallDetails(
            details.method,
            details.timeout,
            grpc.aio.Metadata(*_merged(details.metadata, extra)),
            details.credentials,
            details.wait_for_ready,
        )

    class UnaryUnary(grpc.aio.UnaryUnaryClientInterceptor):
        async def intercept_unary_unary(self, continuation, details, request):
            return await continuation(details_with(details), request)

    class UnaryStream(grpc.aio.UnaryStreamClientInterceptor):
        async def intercept_unary_stream(self, continuation, details, request):
            return await continuation(details_with(details), request)

    class StreamUnary(grpc.aio.StreamUnaryClientInterceptor):
        async def intercept_stream_unary(self, continuation, details, request_iterator):
            return await continuation(details_with(details), request_iterator)

    class StreamStream(grpc.aio.StreamStreamClientInterceptor):
        async def intercept_stream_stream(self, continuation, details, request_iterator):
            return await continuation(details_with(details), request_iterator)

    return UnaryUnary(), UnaryStream(), StreamUnary(), StreamStream()


class _CallDetails(NamedTuple):
    method: str
    timeout: float | None
    metadata: list | None
    credentials: grpc.CallCredentials | None
    wait_for_ready: bool | None
    compression: grpc.Compression | None


class _SyncInterceptor(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    def __init__(self, extra: tuple[tuple[str, str], ...]) -> None:
        self._extra = extra

    def _details(self, d) -> _CallDetails:
        return _CallDetails(
            d.method,
            d.timeout,
            _merged(d.metadata, self._extra),
            d.credentials,
            getattr(d, "wait_for_ready", None),
            getattr(d, "compression", None),
        )

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)

    def intercept_stream_stream(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)
