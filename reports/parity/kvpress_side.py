"""The kvpress half of the parity report: run in a venv with kvpress 0.5.5 (it pins transformers < 5.3, so it is
never a kvbench dependency). Reads the prompts and presses that `parity.py` wrote, compresses each context once
with the press (kvpress's own forward hooks, one prefill forward), then answers the question greedily on the
compressed cache. Writes, per press and prompt, the kept positions of every layer and KV head and the answer.

    /path/to/kvpress-venv/bin/python reports/parity/kvpress_side.py job.json out.json
"""

from __future__ import annotations

import contextlib
import json
import sys
from importlib.metadata import version
from pathlib import Path

import torch
from kvpress import KnormPress, PyramidKVPress, ScorerPress, SnapKVPress, StreamingLLMPress, TOVAPress
from transformers import AutoModelForCausalLM, DynamicCache

PRESSES = {"streamingllm": StreamingLLMPress, "knorm": KnormPress, "tova": TOVAPress, "snapkv": SnapKVPress,
           "pyramidkv": PyramidKVPress}
KEPT: dict[int, list[list[int]]] = {}


def recording(compress):
    """ScorerPress.compress, also recording the kept indices (its own top-k of its own scores) per layer."""

    def wrapped(self, module, hidden_states, keys, values, attentions, kwargs):
        scores = self.score(module, hidden_states, keys, values, attentions, kwargs)
        keys_out, values_out = compress(self, module, hidden_states, keys, values, attentions, kwargs)
        n_kept = keys_out.shape[2]
        KEPT[module.layer_idx] = sorted_heads(scores.topk(n_kept, dim=-1).indices[0])
        return keys_out, values_out

    return wrapped


def sorted_heads(indices: torch.Tensor) -> list[list[int]]:
    return [sorted(h.tolist()) for h in indices]


def step(model, cache: DynamicCache, token: int, position: int) -> torch.Tensor:
    """One token through the model on the compressed cache (no longer prefilling: kvpress does not compress)."""
    return model(input_ids=torch.tensor([[token]]), past_key_values=cache,
                 position_ids=torch.tensor([[position]])).logits[0, -1]


def main(job_path: str, out_path: str) -> None:
    job = json.loads(Path(job_path).read_text())
    model = AutoModelForCausalLM.from_pretrained(job["model_dir"], gguf_file=job["gguf_file"], dtype=torch.float32)
    model.eval()
    for cls in {ScorerPress, PyramidKVPress}:
        cls.compress = recording(cls.compress)
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    out = {"versions": {p: version(p) for p in ("kvpress", "transformers", "torch")}, "runs": []}
    for press_spec in job["presses"]:
        full = press_spec["name"] == "full"  # no press: the reference answers
        press = None if full else PRESSES[press_spec["name"]](compression_ratio=press_spec["ratio"],
                                                              **press_spec.get("args", {}))
        for prompt in job["prompts"]:
            KEPT.clear()
            cache = DynamicCache()
            with torch.inference_mode(), contextlib.nullcontext() if full else press(model):
                model(input_ids=torch.tensor([prompt["context"]]), past_key_values=cache)
            everything = [list(range(len(prompt["context"])))] * model.config.num_key_value_heads
            kept = [KEPT.get(i, everything) for i in range(model.config.num_hidden_layers)]
            answer, logprobs = [], []
            position = len(prompt["context"])  # positions continue from the uncompressed context, as kvpress's
            with torch.inference_mode():  # pipeline has it; one token per forward, so that no causal mask is
                for token in prompt["question"]:  # built from layer 0's length (PyramidKV's layers differ)
                    logits = step(model, cache, token, position)
                    position += 1
                for _ in range(job["max_new_tokens"]):
                    lp = torch.log_softmax(logits.float(), -1)
                    token = int(lp.argmax())
                    answer.append(token)
                    logprobs.append(float(lp[token]))
                    if token in eos:
                        break
                    logits = step(model, cache, token, position)
                    position += 1
            out["runs"].append({"press": press_spec["label"], "prompt": prompt["id"], "kept": kept,
                                "answer": answer, "logprobs": logprobs})
            print(press_spec["label"], prompt["id"], flush=True)
    Path(out_path).write_text(json.dumps(out))


if __name__ == "__main__":
    main(*sys.argv[1:])
