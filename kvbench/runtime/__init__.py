"""Running a model on the KV store: loading and refusing models (`models`, `architectures`), the attention function
that reads the store (`attention`), the inference loop (`engine`) and decoding several sequences together (`batch`)."""
