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

SERVER_OPTIONS = _MESSAGE_LIMITS + [
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
    ("grpc.http2.max_ping_strikes", 0),
    ("grpc.so_reuseport", 0),
]
