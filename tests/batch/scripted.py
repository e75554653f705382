"""A scripted model for engine tests: logits are a pure function of the sequence's own
tokens, so every output is known in advance, and the KV bookkeeping is checked strictly."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from meshllm.worker.engine.batch.sampling import Logits
from meshllm.worker.engine.batch.ubatch import count_ubatches

V = 32
EOG = V - 1


def target_rule(prefix: Sequence[int]) -> int:
    """The target model's greedy choice after `prefix` (never EOG)."""
    return (sum(prefix) * 7 + len(prefix) * 3) % (V - 1)


def draft_rule(prefix: Sequence[int]) -> int:
    """A draft model that agrees with the target two times out of three."""
    t = target_rule(prefix)
    return (t + 1) % (V - 1) if len(prefix) % 3 == 0 else t


class ScriptedBackend:
    def __init__(self, rule: Callable[[Sequence[int]], int] = target_rule) -> None:
        self.n_vocab = V
        self.rule = rule
        self.kv: dict[int, dict[int, int]] = {}
        self.decoded = 0
        self.siblings: list[ScriptedBackend] = []

    def decode(self, tokens: Sequence[int], positions: Sequence[int], seqs: Sequence[int],
               outputs: Sequence[bool]) -> list[Logits]:
        rows: list[Logits] = []
        for t, p, s, out in zip(tokens, positions, seqs, outputs, strict=True):
            cells = self.kv.setdefault(s, {})
            assert p not in cells, f"seq {s} position {p} written twice: a stale KV cell"
            assert p == len(cells), f"seq {s}: position {p} leaves a gap after {len(cells)}"
            cells[p] = t
            if out:
                rows.append(self.logits([cells[q] for q in range(p + 1)]))
        self.decoded += len(tokens)
        return rows

    def sibling(self, context: object) -> ScriptedBackend:
        """A second context on the same model (a group's, batch/groups.py): the same rule,
        its own sequences. Kept in `siblings`, so tests see which context decoded what."""
        other = ScriptedBackend(self.rule)
        self.siblings.append(other)
        return other

    def logits(self, prefix: Sequence[int]) -> Logits:
        """Peaked at the rule's choice with a spread, so that sampling has choices too."""
        row = np.zeros(V, dtype=np.float32)
        choice = self.rule(prefix)
        row[choice] = 3.0
        row[(choice + 5) % (V - 1)] = 2.0
        return row

    def seq_rm(self, seq: int, p0: int) -> bool:
        cells = self.kv.setdefault(seq, {})
        for p in [p for p in cells if p >= max(p0, 0)]:
            del cells[p]
        return True

    def piece(self, token: int) -> bytes:
        return bytes([97 + token % 26])

    def is_eog(self, token: int) -> bool:
        return token == EOG

    def tokenize(self, text: str, add_bos: bool = True) -> list[int]:
        return [ord(c) % (V - 1) for c in text]

    def grammar_tokenizer(self) -> Any:
        return scripted_tokenizer()


class _Vocab:
    """The scripted vocabulary as llguidance reads one: token t is the letter 97 + t % 26,
    EOG a special token."""

    eos_token_id = EOG
    bos_token_id = None
    tokens = [bytes([97 + t % 26]) for t in range(V - 1)] + [b"\xff<eog>"]
    special_token_ids = [EOG]

    def __call__(self, text: bytes) -> list[int]:
        return [b - 97 for b in text]


def scripted_tokenizer() -> Any:
    import llguidance

    return llguidance.LLTokenizer(llguidance.TokenizerWrapper(_Vocab()))


def solo_greedy(prompt: Sequence[int], n: int) -> list[int]:
    hist = list(prompt)
    for _ in range(n):
        hist.append(target_rule(hist))
    return hist[len(prompt):]


class ChargedBackend(ScriptedBackend):
    """The scripted model behind a clock charged as a device would charge it, so that the
    draft tuner decides alike on any machine: per decode, a pass and the link's round trip
    for each ubatch llama.cpp would make (ubatch.count_ubatches), and each row. Pass
    `clock` to the engine. Records the ubatches of each decode-only step of several slots,
    and each decode's first position and rows."""

    def __init__(self, pass_s: float = 0.05, row_s: float = 0.002, rtt_s: float = 0.0,
                 rule: Callable[[Sequence[int]], int] = target_rule) -> None:
        super().__init__(rule)
        self.pass_s, self.row_s, self.rtt_s = pass_s, row_s, rtt_s
        self.now = 0.0
        self.ubatches: list[int] = []
        self.decodes: list[tuple[int, int]] = []

    def clock(self) -> float:
        return self.now

    def decode(self, tokens: Sequence[int], positions: Sequence[int], seqs: Sequence[int],
               outputs: Sequence[bool]) -> list[Logits]:
        per_seq = [seqs.count(s) for s in range(max(seqs) + 1)]
        passes = count_ubatches(per_seq)
        self.now += passes * (self.pass_s + self.rtt_s) + len(tokens) * self.row_s
        self.decodes.append((positions[0], len(tokens)))
        if all(outputs) and sum(n > 0 for n in per_seq) > 1:
            self.ubatches.append(passes)
        return super().decode(tokens, positions, seqs, outputs)


class CorruptingDrafter:
    """Proposes the target's continuation with every third token wrong."""

    free = False  # asked only for drafts that are verified: `proposed` counts those

    def __init__(self) -> None:
        self.proposed = 0

    def propose(self, wants: Mapping[int, tuple[Sequence[int], int]]) -> dict[int, list[int]]:
        out: dict[int, list[int]] = {}
        for slot, (hist, k) in wants.items():
            h, d = list(hist), []
            for _ in range(k):
                token = draft_rule(h)
                d.append(token)
                h.append(token)
            out[slot] = d
            self.proposed += len(d)
        return out
