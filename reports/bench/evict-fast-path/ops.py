"""Tensor ops dispatched per decode step on `make bench`'s proxy (30 layers, 64 steps), per method and for
transformers' own forward, for the checkout it runs from; `observer` (floor.py) reads attention and never decides.
Unlike a time, a count does not move with the host's load; where the host decides the step, each op is a launch.
`cd CHECKOUT && python reports/bench/evict-fast-path/ops.py [m1,m2,...]`."""

import sys
from pathlib import Path

sys.path[:0] = [".", "benchmarks", str(Path(__file__).parent)]

import floor  # noqa: E402, F401  (registers `observer`)
import torch  # noqa: E402
from test_decode_step import BUDGET, PROMPT, STEPS, VOCAB, _Tokenizer, build, transformers_prefill  # noqa: E402

from kvbench.policy import make_policy, policy_class  # noqa: E402
from kvbench.runtime.engine import Engine  # noqa: E402
from kvbench.runtime.syncs import DispatchedOps  # noqa: E402


def transformers_ops(model: torch.nn.Module, prompt: list[int]) -> float:
    cache, token = transformers_prefill(model, prompt)
    with DispatchedOps() as ops:
        for i in range(STEPS):
            out = model(input_ids=torch.tensor([[token]]), past_key_values=cache,
                        position_ids=torch.tensor([[PROMPT + i]]), use_cache=True)
            token = int(out.logits[0, -1].argmax())
    return ops.total / STEPS


def kvbench_ops(engine: Engine, prompt: list[int], method: str) -> float:
    session = engine.session(make_policy(method, BUDGET if policy_class(method).uses_budget else None))
    token = int(session.feed(prompt).argmax())
    with DispatchedOps() as ops:
        for _ in range(STEPS):
            token, _, _ = session.decode_step(token)
    return ops.total / STEPS


def main() -> None:
    prompt = torch.randint(0, VOCAB, (PROMPT,), generator=torch.Generator().manual_seed(1)).tolist()
    methods = sys.argv[1].split(",") if len(sys.argv) > 1 else ["full", "observer", "streamingllm", "gist", "h2o",
                                                                "tova", "attentiontop", "lethe", "asrkf"]
    with torch.inference_mode():
        rows = [f"transformers={transformers_ops(build('sdpa'), prompt):.0f}"]
        engine = Engine(build("sdpa"), _Tokenizer(), prefill_chunk=512)
        rows += [f"{m}={kvbench_ops(engine, prompt, m):.0f}" for m in methods]
    print(" ".join(rows), flush=True)


if __name__ == "__main__":
    main()
