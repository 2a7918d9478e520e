"""Tandem's services: thin adapters from gRPC/HTTP to the engine and the KV path."""
