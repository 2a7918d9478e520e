"""Decode pods: admit (reserve KV blocks), receive KV pages, stream tokens."""
