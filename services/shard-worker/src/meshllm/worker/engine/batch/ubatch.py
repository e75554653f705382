"""Which idle slots get placeholder tokens so that a step's decodes form one llama.cpp ubatch.

With one KV stream per slot (kv_unified off, as deterministic generation needs) llama.cpp
splits a batch into ubatches of *consecutive* sequence ids with the same number of tokens
each (llama_batch_allocr::split_equal, sequential). Streams in slots 0, 1, 6 and 7 decode
as two ubatches: two passes over the weights and, on a split model, two round trips to
every stage, where slots 0-7 together take one. Measured on gemma3-270m split in two
(bench/split_profile.py): 4 scattered streams took 61-69 ms a step, 8 contiguous ones 56-58.

A placeholder token in each idle slot between two decoding ones joins the runs; it costs
one row of compute and is removed from the slot's cache after the step, so no output
changes. Worth it while the placeholders are fewer than the rows they join (a row costs a
sixth of a pass here; a second ubatch costs a pass plus the round trips).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from meshllm.worker.engine.batch.draft_tuning import expected_tokens


def gap_fillers(rows: Mapping[int, int], idle: Sequence[int], max_rows: int) -> dict[int, int]:
    """Placeholder rows per idle slot (slot -> rows) that make the decoding slots one run.

    `rows`: decoding slot -> its tokens this step; `idle`: slots holding no request;
    `max_rows`: most placeholder rows worth adding. Empty when the decodes already form
    one ubatch, when their token counts differ (they split anyway), when a slot in a gap
    is not idle (it prefills: its chunk is a ubatch of its own), or past `max_rows`.
    """
    if len(rows) < 2 or len(set(rows.values())) != 1:
        return {}
    per_slot = next(iter(rows.values()))
    low, high = min(rows), max(rows)
    gaps = [s for s in range(low, high + 1) if s not in rows]
    if not gaps or any(s not in idle for s in gaps) or len(gaps) * per_slot > max_rows:
        return {}
    return dict.fromkeys(gaps, per_slot)


def count_ubatches(rows: Sequence[int]) -> int:
    """Ubatches llama.cpp makes of decoding slots with these token counts, in slot order,
    gaps between them filled (split_equal: each ubatch takes the same number of tokens
    from a run of consecutive sequences that still have some)."""
    left = list(rows)
    count = 0
    while any(left):
        first = next(i for i, n in enumerate(left) if n)
        end = first
        while end < len(left) and left[end]:
            end += 1
        take = min(left[first:end])
        left[first:end] = [n - take for n in left[first:end]]
        count += 1
    return count


def padded_drafts(lengths: Mapping[int, int], caps: Mapping[int, int], row_s: float,
                  ubatch_s: float) -> dict[int, int]:
    """Draft lengths per decoding slot, padded towards the longest when the rows that costs
    are cheaper than the ubatches it saves; else `lengths` unchanged. With
    BatchConfig.pad_drafts (off by default: it did not pay in bench/split_latency.py) the
    step runner appends the padding to the drafts themselves (step.py), so that the batch
    it builds, the rows it verifies and the cache it trims all see one list.

    Drafts of different lengths split a step into several ubatches, each a pass over the
    weights and a round trip to every stage. `caps`: the most drafts each slot may verify
    (absent: it may not be padded, e.g. a sampled request: padding was proven on greedy);
    `row_s`: the cost of a row; `ubatch_s`: the cost of a ubatch (a pass plus the round
    trips)."""
    target = max(lengths.values(), default=0)
    padded = {s: max(n, min(target, caps.get(s, n))) for s, n in lengths.items()}
    extra = sum(padded.values()) - sum(lengths.values())
    order = sorted(lengths)
    saved = (count_ubatches([1 + lengths[s] for s in order])
             - count_ubatches([1 + padded[s] for s in order]))
    return padded if extra and extra * row_s < saved * ubatch_s else dict(lengths)


def cut_drafts(lengths: Mapping[int, int], acceptance: Mapping[int, float], row_s: float,
               ubatch_s: float) -> dict[int, int]:
    """Draft lengths per decoding slot, each cut to at most a common length t, for the t
    that gives the most expected tokens per second; the counterpart of padding that cannot
    change any output (a shorter draft is still a draft).

    Drafts of different lengths split a step into several ubatches (count_ubatches), and on
    a split model each is a round trip to every stage: two streams drafting 3 among six
    drafting none make three passes where one would do. `acceptance`: per slot, the chance
    that a drafted token is kept, given the ones before it were; `row_s`, `ubatch_s`: as
    in padded_drafts."""
    order = sorted(lengths)
    best, best_rate = dict(lengths), -1.0
    for t in sorted({0, *lengths.values()}):
        cut = {s: min(lengths[s], t) for s in order}
        rows = sum(1 + n for n in cut.values())
        cost = count_ubatches([1 + cut[s] for s in order]) * ubatch_s + rows * row_s
        tokens = sum(expected_tokens(n, acceptance.get(s, 0.0)) for s, n in cut.items())
        if tokens / max(cost, 1e-9) > best_rate * (1 + 1e-9):  # ties: the shorter cut
            best, best_rate = cut, tokens / max(cost, 1e-9)
    return best

