"""Decode step and its policy share (the after-attention time the ledger counts: deciding and moving rows) per
method on the proxy of `make bench`, best of 5 sessions of 64 steps: what deciding across layers at once could save
at most. From the checkout's root: `OMP_NUM_THREADS=1 python reports/bench/evict-fast-path/policy_share.py m1,m2`."""

import sys
import time

sys.path[:0] = [".", "benchmarks"]  # the checkout's kvbench and the benchmark's proxy model

import torch  # noqa: E402
from test_decode_step import BUDGET, PROMPT, VOCAB, _Tokenizer, build  # noqa: E402

from kvbench.policy import make_policy, policy_class  # noqa: E402
from kvbench.runtime.engine import Engine  # noqa: E402

STEPS, ROUNDS = 64, 5


def main(methods: list[str]) -> None:
    torch.set_num_threads(1)
    prompt = torch.randint(0, VOCAB, (PROMPT,), generator=torch.Generator().manual_seed(1)).tolist()
    engine = Engine(build("sdpa"), _Tokenizer(), prefill_chunk=512)
    for method in methods:
        best = (float("inf"), 0.0)
        for _ in range(ROUNDS):
            with torch.inference_mode():
                session = engine.session(make_policy(method, BUDGET if policy_class(method).uses_budget else None))
                token = int(session.feed(prompt).argmax())
            start = time.perf_counter()
            for _ in range(STEPS):
                token, _, _ = session.decode_step(token)
            step = (time.perf_counter() - start) / STEPS * 1e3
            policy = session.cache.ledger.figures()["policy_seconds"].get("decode", 0.0) / STEPS * 1e3
            best = min(best, (step, policy))
        print(f"{method}: step {best[0]:.2f} ms, policy {best[1]:.2f} ms/step", flush=True)


if __name__ == "__main__":
    main(sys.argv[1].split(","))
