"""Tandem: disaggregated prefill/decode LLM serving.

The shared library imported by every service. Heavy modules (torch, transformers) are imported
by the subpackages that need them, never here.
"""

__version__ = "0.1.0"
