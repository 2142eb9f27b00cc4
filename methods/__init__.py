"""Built-in KV policies, one file each; importing this package registers them all."""

from kvbench.methods import asrkf, full, h2o, streamingllm  # noqa: F401
