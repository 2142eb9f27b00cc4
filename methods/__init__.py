"""Built-in KV policies, one file each; importing this package registers them all."""

from kvbench.methods import asrkf, attentiontop, full, gist, h2o, knorm, lethe, snapkv, streamingllm, tova  # noqa: F401
