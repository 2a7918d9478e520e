"""kvstore: the prefix-cache index (which prefill pod holds which prefix blocks), over Redis."""
