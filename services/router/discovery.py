"""Discovery for the router: the implementations live in ``tandem.serving.discovery`` (prefill
pods use them too, to know which decode pods they may push KV to)."""

from tandem.serving.discovery import (
    ROLES,
    Discovery,
    DnsDiscovery,
    KubernetesDiscovery,
    StaticDiscovery,
    join_host_port,
    wait_for,
)

__all__ = [
    "ROLES",
    "Discovery",
    "DnsDiscovery",
    "KubernetesDiscovery",
    "StaticDiscovery",
    "join_host_port",
    "wait_for",
]
