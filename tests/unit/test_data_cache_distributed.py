"""Index cache with torch.distributed: rank 0 builds, the other ranks wait and load.

(Lives with the other data tests; spawns 2 gloo ranks through megatron_lite.testing.)
"""

import numpy as np

from megatron_lite.testing import run_distributed


def _build_on_rank(cache_path):
    from megatron_lite.data.builder import build_gpt_datasets

    train, valid, _ = build_gpt_datasets(None, "90,10,0", 16, (40, 8, 0), 9, cache_path, True, 200, 199)
    return {
        "built": [train.build_seconds > 0, valid.build_seconds > 0],
        "shuffle": np.asarray(train.shuffle_index).tolist(),
        "first": train[0]["tokens"].tolist(),
    }


def test_rank0_builds_others_load(tmp_path):
    results = run_distributed(_build_on_rank, 2, cache_path=str(tmp_path / "cache"))
    assert results[0]["built"] == [True, True]
    assert results[1]["built"] == [False, False]  # waited at the barrier, then loaded rank 0's files
    assert results[0]["shuffle"] == results[1]["shuffle"] and results[0]["first"] == results[1]["first"]
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 6
