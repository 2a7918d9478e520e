"""Prefill pods: compute prompts' KV and stream the pages to decode pods."""
