"""The words every Tandem process shares, torch-free: the floor of the package layers.

Sampling parameters and their translation from requests (``sampling_params``,
``sampling_request``), request and output types (``requests``, ``outputs``, ``stats``), errors
and their gRPC status codes (``errors``, ``grpc_status``), ids (``ids``), prefix-block hashing,
KV events and the model fingerprint (``hashing``, ``kv_events``, ``fingerprint``), gRPC channel
options (``channel_options``) and the one protobuf <-> dataclass translator (``proto_convert``).

It imports nothing of Tandem's but the generated ``tandem.proto`` stubs, and never torch: the
router, kvstore and the SDK import it without loading the engine.
"""
