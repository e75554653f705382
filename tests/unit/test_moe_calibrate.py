"""The calibration's bookkeeping without llama.cpp: counting router choices by block, the
check that every token was counted, the ranking cache, the CLI's summary (the runs on real
llama.cpp are in tests/batch/test_moe_calibrate.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from meshllm.cli.calibrate_cmd import summary
from meshllm.common.errors import ModelSourceError
from meshllm.common.moe import ExpertRanking, MoeLayout
from meshllm.worker.moe_calibrate import (
    _check_counted,
    _Counter,
    load_ranking,
    ranking_path,
    save_ranking,
)

LAYOUT = MoeLayout("llama", 4, 2, 2, 10_000, 1_000, 10, 0)
DIGEST = "cd" * 32
RANKING = ExpertRanking(DIGEST, ((3, 1, 0, 4), (0, 8, 0, 0)), 4, 0.25)


def test_counter_maps_blocks_to_moe_layers() -> None:
    counter = _Counter(LAYOUT, blocks=(1, 3))  # blocks 0 and 2 dense
    counter(1, np.array([[0, 3], [3, 2]], dtype=np.int32))
    counter(3, np.array([[1, 0]], dtype=np.int32))
    counter(2, np.array([[1, 1]], dtype=np.int32))  # no MoE layer: ignored
    assert counter.counts.tolist() == [[1, 0, 1, 2], [1, 1, 0, 0]]


@pytest.mark.parametrize(("counts", "expected", "ok"), [
    ([[2, 2], [1, 3]], 4, True),
    ([[2, 2], [1, 2]], 4, False),   # a layer missed a token
    ([[0, 0], [0, 0]], 4, False),   # nothing read at all
])
def test_every_token_must_be_counted(counts: list[list[int]], expected: int,
                                     ok: bool) -> None:
    if ok:
        _check_counted(np.array(counts), expected, Path("m.gguf"))
    else:
        with pytest.raises(ModelSourceError, match="ffn_moe_topk"):
            _check_counted(np.array(counts), expected, Path("m.gguf"))


def test_cache_round_trip_and_prompts(tmp_path: Path) -> None:
    assert load_ranking(tmp_path, DIGEST, ["a"]) is None
    path = save_ranking(tmp_path, RANKING, ["a", "b"])
    assert path == ranking_path(tmp_path, DIGEST) == tmp_path / "rankings" / f"{DIGEST}.json"
    assert load_ranking(tmp_path, DIGEST, ["a", "b"]) == RANKING
    assert load_ranking(tmp_path, DIGEST, ["a"]) is None  # counted over other prompts
    path.write_text("{not json")
    assert load_ranking(tmp_path, DIGEST, ["a", "b"]) is None


def test_summary_names_the_most_chosen() -> None:
    text = summary(RANKING, cached=False)
    assert "4 tokens, 2 MoE layers x 4 experts (counted in 0.2 s)" in text
    assert "layer 0: most chosen (share of the choices) 3 50%, 0 38%, 1 12%, 2 0%" in text
    assert "layer 1: most chosen (share of the choices) 1 100%" in text
    assert "(cached)" in summary(RANKING, cached=True)
