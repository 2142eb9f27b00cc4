"""Built-in KV policies, one file each; importing this package registers them all."""

from kvbench.methods import (  # noqa: F401
    asrkf,
    attentiontop,
    full,
    gist,
    h2o,
    knorm,
    kvzip,
    lethe,
    snapkv,
    streamingllm,
    tova,
)
