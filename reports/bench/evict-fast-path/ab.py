"""Proxy decode ratios (kvbench / transformers, best of 5 rounds interleaved) per method, with the policy's share of
kvbench's step, for the checkout it runs from:
`cd CHECKOUT && OMP_NUM_THREADS=1 python reports/bench/evict-fast-path/ab.py [m1,m2,...]`."""

import sys
import time

sys.path[:0] = [".", "benchmarks"]  # the checkout's kvbench and the benchmark's proxy model

import torch  # noqa: E402
import transformers  # noqa: E402
from test_decode_step import BUDGET, PROMPT, VOCAB, _Tokenizer, build  # noqa: E402

from kvbench.policy import available, make_policy, policy_class  # noqa: E402
from kvbench.runtime.engine import Engine  # noqa: E402

STEPS, ROUNDS = 64, 5


def transformers_seconds(model: torch.nn.Module, prompt: list[int]) -> float:
    with torch.inference_mode():
        cache = transformers.DynamicCache(config=model.config)
        out = model(input_ids=torch.tensor([prompt]), past_key_values=cache, use_cache=True, logits_to_keep=1)
        token = int(out.logits[0, -1].argmax())
        start = time.perf_counter()
        for i in range(STEPS):
            out = model(input_ids=torch.tensor([[token]]), past_key_values=cache,
                        position_ids=torch.tensor([[PROMPT + i]]), use_cache=True)
            token = int(out.logits[0, -1].argmax())
        return time.perf_counter() - start


def kvbench_seconds(engine: Engine, prompt: list[int], method: str) -> tuple[float, float]:
    """The decode steps' seconds and the part the ledger counts as the policy's (after attention: the view, `step`,
    applying its decision)."""
    with torch.inference_mode():
        session = engine.session(make_policy(method, BUDGET if policy_class(method).uses_budget else None))
        token = int(session.feed(prompt).argmax())
    start = time.perf_counter()
    for _ in range(STEPS):
        token, _, _ = session.decode_step(token)
    return time.perf_counter() - start, session.cache.ledger.figures()["policy_seconds"].get("decode", 0.0)


def main() -> None:
    torch.set_num_threads(1)
    prompt = torch.randint(0, VOCAB, (PROMPT,), generator=torch.Generator().manual_seed(1)).tolist()
    engine, model = Engine(build("sdpa"), _Tokenizer(), prefill_chunk=512), build("sdpa")
    ratios = []
    for method in sys.argv[1].split(",") if len(sys.argv) > 1 else available():
        theirs, ours = float("inf"), (float("inf"), 0.0)
        for _ in range(ROUNDS):
            theirs = min(theirs, transformers_seconds(model, prompt))
            ours = min(ours, kvbench_seconds(engine, prompt, method))
        ratios.append(f"{method}={ours[0] / theirs:.3f} (policy {100 * ours[1] / ours[0]:.0f}%)")
    print(" ".join(ratios), flush=True)


if __name__ == "__main__":
    main()
