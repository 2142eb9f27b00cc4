"""Proxy decode ratios (kvbench / transformers, best of 5 interleaved) for every method: python ab.py [methods]"""
import sys, time
sys.path.insert(0, "."); sys.path.insert(0, "benchmarks")
import torch; torch.set_num_threads(1)
import transformers
from test_decode_step import build, _Tokenizer, PROMPT, VOCAB, BUDGET
from kvbench.policy import make_policy, policy_class, available
from kvbench.runtime.engine import Engine
steps = 64
prompt = torch.randint(0, VOCAB, (PROMPT,), generator=torch.Generator().manual_seed(1)).tolist()
engine = Engine(build("sdpa"), _Tokenizer(), prefill_chunk=512)
model = build("sdpa")
def tf():
    with torch.inference_mode():
        cache = transformers.DynamicCache(config=model.config)
        out = model(input_ids=torch.tensor([prompt]), past_key_values=cache, use_cache=True, logits_to_keep=1)
        token = int(out.logits[0, -1].argmax()); t0 = time.perf_counter()
        for i in range(steps):
            out = model(input_ids=torch.tensor([[token]]), past_key_values=cache, position_ids=torch.tensor([[PROMPT + i]]), use_cache=True)
            token = int(out.logits[0, -1].argmax())
        return time.perf_counter() - t0
def kv(method):
    with torch.inference_mode():
        s = engine.session(make_policy(method, BUDGET if policy_class(method).uses_budget else None))
        token = int(s.feed(prompt).argmax())
    t0 = time.perf_counter()
    for _ in range(steps): token, _, _ = s.decode_step(token)
    return time.perf_counter() - t0
methods = sys.argv[1].split(",") if len(sys.argv) > 1 else available()
out = []
for m in methods:
    bt = bk = 1e9
    for r in range(5): bt = min(bt, tf()); bk = min(bk, kv(m))
    out.append(f"{m}={bk/bt:.3f}")
print(" ".join(out), flush=True)
