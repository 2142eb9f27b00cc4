"""Contiguous gist (arXiv 2511.04686): a contiguous initial block of `sinks` tokens (the gist of the
conversation's start) plus the most recent window; nothing in between survives. StreamingLLM's rule
with a long initial block instead of 4 attention sinks.

No reference implementation in reach (not in kvpress); built from the paper's text.
"""

from dataclasses import dataclass

from kvbench.methods.streamingllm import StreamingLLM
from kvbench.policy import param, register


@register("gist")
@dataclass
class Gist(StreamingLLM):
    sinks: int = param(64, low=0)
