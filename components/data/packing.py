"""Sequence packing (`data.packing`): a micro-batch's samples laid out several to a row, each seeing only itself.

Padding every row to the longest sample wastes compute when short answers sit beside long
conversations. Packing puts the same samples into fewer rows of at most `model.max_length` tokens:

- rows: the layout that computes the fewest tokens (rows x longest row) that two load-balancing heuristics
  find, so the rows end close together and little padding is left at their ends;
- each sample's position ids restart at 0. That is how transformers recognises packed rows: given no 2-D
  attention mask, it builds a block-diagonal causal mask from the position ids (SDPA, eager) or hands
  the sample boundaries to flash-attention's varlen kernel;
- each sample's images move with it (pixel_values follow the samples' order in the rows), and its first
  label is ignored, so the previous sample's last token never predicts across the seam (unpacked, a
  sample's first label is never predicted either);
- `sample_index` says which sample each token belongs to (-1 for padding), so the loss stays the mean over
  samples of each sample's token-mean cross-entropy (`components.train.loop.per_sample_loss`).

A micro-batch holds the same samples packed or not: a step covers the same global records, its sample
count is still the global batch, and resume skips the same micro-batches. Packing changes the rows, never
which samples a step sees.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence

import numpy as np
import torch

from components.data.conversation import IGNORE_INDEX


def _first_fit_decreasing(order: Sequence[int], lengths: Sequence[int], capacity: int, rows: int) -> list[list[int]] | None:
    """Samples (longest first) each into the first of `rows` rows with room under `capacity`; None if one has none."""
    loads = [0] * rows
    placed: list[list[int]] = [[] for _ in range(rows)]
    for i in order:
        for row in range(rows):
            if loads[row] + lengths[i] <= capacity:
                loads[row] += lengths[i]
                placed[row].append(i)
                break
        else:
            return None
    return placed


def _longest_first_into_emptiest(order: Sequence[int], lengths: Sequence[int], capacity: int,
                                 rows: int) -> list[list[int]] | None:
    """LPT: samples (longest first) each into the least-filled row; None if that row has no room."""
    loads = [(0, row) for row in range(rows)]  # a heap whose top is the emptiest row
    placed: list[list[int]] = [[] for _ in range(rows)]
    for i in order:
        load, row = heapq.heappop(loads)
        if load + lengths[i] > capacity:
            return None
        placed[row].append(i)
        heapq.heappush(loads, (load + lengths[i], row))
    return placed


def _rebalance(rows: list[list[int]], lengths: Sequence[int], capacity: int, rounds: int = 64) -> list[list[int]]:
    """Lower the longest row by moving one of its samples to another row, or swapping one with another row's
    shorter sample, while that makes the longest of the two rows shorter; at most `rounds` moves."""
    rows = [list(row) for row in rows]
    loads = [sum(lengths[i] for i in row) for row in rows]
    for _ in range(rounds):
        top = max(range(len(rows)), key=loads.__getitem__)
        best: tuple[int, int, int | None, int] | None = None  # (new max of the pair, other row, item, swap)
        for other in range(len(rows)):
            if other == top:
                continue
            for a in rows[top]:
                for b in [None, *rows[other]]:
                    moved = lengths[a] - (lengths[b] if b is not None else 0)
                    if moved <= 0 or loads[other] + moved > capacity:
                        continue
                    pair_max = max(loads[top] - moved, loads[other] + moved)
                    if pair_max < loads[top] and (best is None or pair_max < best[0]):
                        best = (pair_max, other, b, a)
        if best is None:
            break
        _, other, b, a = best
        rows[top].remove(a)
        rows[other].append(a)
        moved = lengths[a]
        if b is not None:
            rows[other].remove(b)
            rows[top].append(b)
            moved -= lengths[b]
        loads[top] -= moved
        loads[other] += moved
    return rows


def plan_rows(lengths: Sequence[int], max_length: int) -> list[list[int]]:
    """Sample indices per row: the layout of rows (at most `max_length` tokens each) that computes the fewest
    tokens, rows x longest row.

    For each row count from ceil(total / max_length) to one row per sample: LPT (longest first into the
    emptiest row) and MULTIFIT (first-fit-decreasing under the smallest row length, found by bisection,
    that still fits the samples in that many rows), a classic pair for balancing loads, each then
    rebalanced by moves and swaps out of the longest row; the cheapest layout wins. One sample per row is the padded layout, so packing never computes more than padding.
    Within a row the samples keep their batch order.
    """
    if not lengths:
        raise ValueError("cannot pack an empty micro-batch")
    too_long = [(i, n) for i, n in enumerate(lengths) if n > max_length]
    if too_long:
        i, n = too_long[0]
        raise ValueError(
            f"sample {i} of the micro-batch has {n} tokens, more than model.max_length={max_length}; "
            "samples are truncated to model.max_length when tokenised, so this batch was not built by duet's "
            "preprocessing"
        )
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    total, longest = sum(lengths), max(lengths)
    best: list[list[int]] = [[i] for i in range(len(lengths))]
    best_cost = len(lengths) * longest
    for count in range(max(1, math.ceil(total / max_length)), len(lengths)):
        if count * max(longest, math.ceil(total / count)) >= best_cost:
            continue  # even a perfect balance of this many rows would not be cheaper
        candidates = [_longest_first_into_emptiest(order, lengths, max_length, count)]
        low, high = max(longest, math.ceil(total / count)), max_length
        fitted = _first_fit_decreasing(order, lengths, high, count)
        while fitted is not None and low < high:  # MULTIFIT: the smallest capacity FFD fits in `count` rows
            middle = (low + high) // 2
            trial = _first_fit_decreasing(order, lengths, middle, count)
            if trial is None:
                low = middle + 1
            else:
                fitted, high = trial, middle
        candidates.append(fitted)
        for rows in candidates:
            if rows is None:
                continue
            rows = [row for row in _rebalance(rows, lengths, max_length) if row]
            cost = len(rows) * max(sum(lengths[i] for i in row) for row in rows)
            if cost < best_cost:
                best, best_cost = [sorted(row) for row in rows], cost
    return best


def pack(batch: dict[str, np.ndarray], pad_token_id: int, max_length: int) -> dict[str, torch.Tensor]:
    """A micro-batch of rows from `TextPreprocessor`/`ImagePreprocessor` -> packed model inputs.

    Returns input_ids (pad_token_id), labels (-100), position_ids and sample_index (-1 on padding) of
    shape (rows, longest row), and pixel_values (all images, 3, H, W) in the order their samples sit in the
    rows. No attention_mask: the position ids say where each sample starts.
    """
    ids = [np.asarray(x, dtype=np.int64) for x in batch["input_ids"]]
    labels = [np.asarray(x, dtype=np.int64) for x in batch["labels"]]
    pixels = [np.asarray(p, dtype=np.float32) for p in batch["pixel_values"]]
    rows = plan_rows([len(x) for x in ids], max_length)
    width = max(sum(len(ids[i]) for i in row) for row in rows)
    shape = (len(rows), width)
    input_ids = np.full(shape, pad_token_id, dtype=np.int64)
    label_out = np.full(shape, IGNORE_INDEX, dtype=np.int64)
    positions = np.zeros(shape, dtype=np.int64)
    sample_index = np.full(shape, -1, dtype=np.int64)
    image_order: list[np.ndarray] = []
    for r, row in enumerate(rows):
        start = 0
        for i in row:
            end = start + len(ids[i])
            input_ids[r, start:end] = ids[i]
            label_out[r, start:end] = labels[i]
            label_out[r, start] = IGNORE_INDEX
            positions[r, start:end] = np.arange(end - start)
            sample_index[r, start:end] = i
            image_order.append(pixels[i])
            start = end
        positions[r, start:] = np.arange(width - start)  # padding: a segment of its own, seen by no sample
    pixel_values = np.concatenate(image_order, axis=0)
    return {
        "input_ids": torch.from_numpy(input_ids),
        "labels": torch.from_numpy(label_out),
        "position_ids": torch.from_numpy(positions),
        "sample_index": torch.from_numpy(sample_index),
        "pixel_values": torch.from_numpy(np.ascontiguousarray(pixel_values)),
    }


def row_layout(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | bool]:
    """The language model's arguments that say where each sample is: the padding mask, or for packed rows
    the per-sample position ids and no mask. Never a KV cache: transformers detects packed rows only
    without one (a training forward would otherwise build one and let packed samples see each other)."""
    if "position_ids" in batch:
        return {"position_ids": batch["position_ids"], "use_cache": False}
    return {"attention_mask": batch["attention_mask"], "use_cache": False}


def real_tokens(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """1 on every sample token, 0 on padding, packed (`sample_index`) or padded (`attention_mask`)."""
    if "sample_index" in batch:
        return (batch["sample_index"] >= 0).long()
    return batch["attention_mask"]


def sample_lengths(batch: dict[str, torch.Tensor]) -> list[int]:
    """Token count of each sample of a micro-batch, packed or padded."""
    if "sample_index" in batch:
        index = batch["sample_index"]
        return torch.bincount(index[index >= 0]).tolist()
    return batch["attention_mask"].sum(dim=1).tolist()


def padding_efficiency(batch: dict[str, torch.Tensor]) -> float:
    """Real tokens / computed tokens (rows x row length) of one micro-batch."""
    return float(real_tokens(batch).sum()) / max(batch["input_ids"].numel(), 1)
