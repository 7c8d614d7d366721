"""scission: a disaggregated LLM serving cluster (encode / prefill / decode pools)."""

__version__ = "0.1.0"
