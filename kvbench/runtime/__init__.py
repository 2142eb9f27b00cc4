"""Running a model on the KV store: loading and refusing models (`models`, `architectures`), the attention function
that reads the store (`attention`), the inference loop (`engine`), the model's chat format and multi-turn
conversations (`chat`), and decoding several sequences together (`batch`, with its CPU kernel in `few_rows`)."""
