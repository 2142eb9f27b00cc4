"""kvbench: compare LLM KV-cache compression policies with real eviction, honestly measured."""

__version__ = "0.1.0"
