"""The KV store: a layer's token rows (`rows`), their off-device frozen copies (`store`), the cache that applies a
policy's decisions (`cache`), what it holds and moves (`accounting`) and key re-rotation for the position modes
(`rope`)."""
