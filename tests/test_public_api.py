"""`import kvbench` as a user calls it: the README's example runs as written in a fresh interpreter and gives what the
engine gives through its own modules; the import alone loads nothing heavy."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).parent.parent / "README.md"


def example() -> str:
    section = README.read_text().split("## Use it from Python", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_import_kvbench_is_cheap_and_names_what_it_offers():
    code = ("import sys, kvbench; print('torch' in sys.modules, sorted(set(kvbench.__all__) - set(dir(kvbench))))\n"
            "try:\n    kvbench.Engin\nexcept AttributeError as err:\n    print(err)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.splitlines()
    assert out == ["False []", "module 'kvbench' has no attribute 'Engin'"]


@pytest.mark.model
def test_the_readmes_example_runs_as_written_and_matches_the_engine(engine):
    done = subprocess.run([sys.executable, "-c", example()], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    from kvbench.policy import make_policy
    from kvbench.runtime.chat import encode_chat

    ids = encode_chat(engine.tokenizer, "What is the capital of France?")
    ours = engine.generate(ids, make_policy("snapkv", budget=256), max_new_tokens=16)
    assert done.stdout.strip() == f"{ours.text} {ours.cache.kv_compression} {ours.cache.peak_active_bytes}"
