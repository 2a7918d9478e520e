"""The KV data plane: how a prompt's KV pages move from a prefill pod to a decode pod.

Above the engine (it reads and writes the engine's KV pool) and below the services. Today one
transport, gRPC: ``sender`` (prefill side: what to send, per layer group), ``push_streams`` (one
request's PushKV streams), ``codec`` and ``wire`` (the chunk format and its checks),
``receiver`` (decode side: validated writes into reserved blocks), ``staging`` (pinned buffers).
"""
