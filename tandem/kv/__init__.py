"""KV-cache concepts shared by the engine, the router and kvstore: block hashing and KV events."""
