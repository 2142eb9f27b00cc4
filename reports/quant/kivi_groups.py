"""KIVI's key-group tables: KV bytes at the end of a prompt (README.md's text, in the model's tokens) and 32 decode
steps, with the groups no row refers to dropped (`KeyGroups.compact`) and with every group kept (compact patched
out), for full and StreamingLLM at a quarter, int4 beside them. From the checkout's root:
`OMP_NUM_THREADS=1 python reports/quant/kivi_groups.py MODEL TOKENS`."""

import sys
from pathlib import Path

sys.path[:0] = ["."]  # the checkout's kvbench

import torch  # noqa: E402

from kvbench.kv.quant import KeyGroups  # noqa: E402
from kvbench.policy import make_policy  # noqa: E402
from kvbench.runtime import models  # noqa: E402
from kvbench.runtime.engine import Engine  # noqa: E402


def main(model_name: str, tokens: int) -> None:
    torch.set_num_threads(1)
    model, tok = models.load(model_name)
    engine = Engine(model, tok, prefill_chunk=512)
    ids = tok(Path("README.md").read_text() * 3)["input_ids"][:tokens]
    compact = KeyGroups.compact
    runs = [("int4", True), ("kivi4", False), ("kivi4", True)]
    for method, budget in (("full", None), ("streamingllm", "0.25")):
        for scheme, dropped in runs:
            KeyGroups.compact = compact if dropped else (lambda self, used: None)
            result = engine.generate(ids, make_policy(method, budget), 32, ignore_eos=True, kv_quant=scheme)
            cache = result.cache
            print(f"{method} {budget or ''} {scheme} unused groups dropped={dropped}: "
                  f"active {cache.active_bytes / 2**20:.2f} MiB of {cache.full_bytes / 2**20:.2f}, "
                  f"compression {1 - cache.active_bytes / cache.full_bytes:.3f}, first tokens {result.tokens[:6]}",
                  flush=True)
    KeyGroups.compact = compact


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
