"""The KV store: a layer's token rows (`rows`), their off-device frozen copies (`store`), the cache that applies a
policy's decisions and accounts for bytes (`cache`) and key re-rotation for the position modes (`rope`)."""
