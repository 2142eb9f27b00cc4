"""The prose every task, probe and benchmark fills its contexts with: real English shipped with Python (CPython's
pydoc topics), so no data set is fetched and every machine has the same text."""

from __future__ import annotations

from pydoc_data.topics import topics


def passages(words_per_passage: int) -> list[str]:
    """Plain-prose chunks of the pydoc topics, in a fixed order."""
    words = [w for key in sorted(topics) for w in topics[key].split() if not any(c in w for c in "{}<>|`*=+-")]
    starts = range(0, len(words) - words_per_passage, words_per_passage)
    return [" ".join(words[i : i + words_per_passage]) for i in starts]
