"""Generation with TP 2 or PP 2 (gloo ranks) gives the same ids as one process: greedy and sampled, for a
tied GPT-2 style model (PP 2 feeds the last stage's tied output copy from the embedding) and an untied
Llama style GQA model. The checkpoint is written once (TP 1) and resharded on load to each layout.
"""
from __future__ import annotations

import pytest

from model_toys import tiny_config, write_model_checkpoint

from megatron_lite import parallel_state as ps
from megatron_lite.testing import run_distributed

PROMPT = [5, 9, 2, 33, 17]
NEW_TOKENS = 10


def _generate_all(directories: dict, tp: int, pp: int) -> dict:
    from megatron_lite.inference import SamplingParams, generate, inference_config, load_model
    if tp * pp > 1:
        ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    try:
        out = {}
        for style, directory in directories.items():
            model = load_model(inference_config(directory, tp=tp, pp=pp))
            out[style] = (generate(model, PROMPT, NEW_TOKENS),
                          generate(model, PROMPT, NEW_TOKENS, SamplingParams(greedy=False, temperature=1.0, top_k=20,
                                                                             top_p=0.95, seed=11)))
        return out
    finally:
        if tp * pp > 1:
            ps.destroy_model_parallel()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    base = tmp_path_factory.mktemp("gen_parallel")
    directories = {style: str(base / style) for style in ("gpt2", "llama")}
    for style, directory in directories.items():
        # large initial weights: varied greedy continuations
        write_model_checkpoint(directory, tiny_config(style, init_std=0.3), 10)
    reference = _generate_all(directories, 1, 1)
    for greedy, sampled in reference.values():
        assert len(greedy) == NEW_TOKENS and len(set(greedy)) > 2 and greedy != sampled
    return directories, reference


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)])
def test_parallel_generation_matches_single_process(checkpoints, tp, pp):
    directories, reference = checkpoints
    for rank_result in run_distributed(_generate_all, tp * pp, directories=directories, tp=tp, pp=pp):
        assert rank_result == reference
