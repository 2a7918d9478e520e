"""What every pod process shares around its engine: the engine worker, the pod runtime (gRPC
server with health, identity, metrics, GetStats, main), pod settings and the KV event publisher.

Above the engine and the KV data plane, below the services (which stay thin adapters).
"""
