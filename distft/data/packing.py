"""Packing: several short examples in one row of up to max_length tokens.

Rows are filled best-fit-decreasing (each example goes to the row whose free space it fits
most tightly), so little room is left over. Each example keeps its own positions
(`position_ids` restart at 0), and its first token is not a target: in a packed row that
position would be predicted from the previous example's last token. transformers reads
the restarts in `position_ids` (with no attention_mask) as separate sequences: a
block-diagonal causal mask for SDPA/eager, varlen kernels for flash-attention, so no
attention crosses from one example to the next. Written here rather than taken from TRL,
whose packing lives inside its own trainer and dataset utilities.
"""
from __future__ import annotations

import bisect
import random
from typing import Dict, List

from distft.tasks.base import IGNORE


def pack(examples: List[Dict], max_length: int, seed: int) -> List[Dict]:
    """Rows of packed examples; the rows' order is shuffled with `seed`."""
    order = sorted(range(len(examples)), key=lambda i: (-len(examples[i]["input_ids"]), i))
    rows: List[List[int]] = []
    free: List[tuple] = []  # sorted (free tokens, row index)
    for i in order:
        n = len(examples[i]["input_ids"])
        at = bisect.bisect_left(free, (n, -1))
        if at < len(free):
            space, row = free.pop(at)
            rows[row].append(i)
            space -= n
        else:
            rows.append([i])
            row, space = len(rows) - 1, max_length - n
        if space > 0:
            bisect.insort(free, (space, row))
    random.Random(seed).shuffle(rows)
    out = []
    for members in rows:
        ids, labels, pos = [], [], []
        for i in sorted(members):  # the examples' own order within a row
            ex = examples[i]
            ids += ex["input_ids"]
            labels += [IGNORE] + list(ex["labels"][1:])
            pos += list(range(len(ex["input_ids"])))
        out.append({"input_ids": ids, "labels": labels, "position_ids": pos})
    return out


def packing_stats(examples: List[Dict], packed: List[Dict], max_length: int) -> Dict:
    tokens = sum(len(e["input_ids"]) for e in examples)
    return {"examples": len(examples), "rows": len(packed), "tokens": tokens,
            "fill": round(tokens / max(1, len(packed) * max_length), 4)}
