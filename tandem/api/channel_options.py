"""gRPC channel and server options shared by every Tandem client and server (torch-free).

Keepalive pings detect a dead peer on an idle or blackholed connection in seconds instead of
the OS's TCP timeout; servers must permit them, or they would answer with GOAWAY.
"""

GRPC_MAX_MESSAGE_BYTES = 64 << 20

_MESSAGE_LIMITS = [
    ("grpc.max_send_message_length", GRPC_MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", GRPC_MAX_MESSAGE_BYTES),
]

CLIENT_OPTIONS = _MESSAGE_LIMITS + [
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.max_pings_without_data", 0),
    # A restarted peer should be reconnected to within a second, not after gRPC's default backoff.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]

SMALL_MESSAGE_BYTES = 4 << 20
"""Largest message a prefill pod accepts: its calls carry prompts (a 128k-token context is under
1 MiB of token ids) and no KV pages."""

KVSTORE_MESSAGE_BYTES = 16 << 20
"""Largest message kvstore accepts: a pod's event batch holds up to 200,000 block hashes
(``kv_event_publisher.MAX_PENDING_HASHES``), ~6 MB on the wire at worst (one hash an event)."""

KV_MESSAGE_SLACK_BYTES = 1 << 20
"""What a KV chunk's message holds beside its pages (ids, layer range, token)."""


def server_options(max_receive_bytes: int = GRPC_MAX_MESSAGE_BYTES) -> list[tuple[str, int]]:
    """``SERVER_OPTIONS`` with the largest message this server accepts: a bigger one is refused
    with RESOURCE_EXHAUSTED from its length prefix, before it is read (a caller, credentials or
    not, cannot make the server buffer more)."""
    return [
        ("grpc.max_receive_message_length", max_receive_bytes)
        if name == "grpc.max_receive_message_length"
        else (name, value)
        for name, value in SERVER_OPTIONS
    ]


SERVER_OPTIONS = _MESSAGE_LIMITS + [
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
    ("grpc.http2.max_ping_strikes", 0),
    ("grpc.so_reuseport", 0),
]
