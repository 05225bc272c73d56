"""tools/generate.py's layout defaults: with no layout flags, 4 processes on a TP2 x PP2 checkpoint use
TP2 x PP2 and give the single-process ids; processes beyond TP x PP generate prompts data-parallel and
return every prompt's result, in order, on every rank; the default TP never splits what the model cannot.
Prompts of equal length are generated as one batch and give what each gives alone (greedy and sampled).
"""
from __future__ import annotations

import pytest
from model_toys import load_tool, tiny_config, write_model_checkpoint

from megatron_lite.testing import run_distributed
PROMPTS = ["5,9,2,33,17", "1,2,3", "40,41", "7,7,7,7", "8,1,30", "22,23", "3,3,9"]


def load_generate():
    return load_tool("generate.py")


def make_checkpoint(directory: str, tp: int, pp: int) -> None:
    """A Llama-style GQA model (8 heads, 2 query groups) saved at TP x PP."""
    write_model_checkpoint(directory, tiny_config("llama", init_std=0.3), 5, tp=tp, pp=pp)


def _run_tool(argv: list[str]) -> list[list[int]]:
    return [r["generated_ids"] for r in load_generate().main(argv)]


def test_choose_layout():
    choose = load_generate().choose_layout
    llama = {"num_attention_heads": 8, "num_query_groups": 2, "hidden_size": 32, "ffn_hidden_size": 48, "num_layers": 4}
    assert choose(4, llama, (2, 2)) == (2, 2, 1)          # the checkpoint's own layout
    assert choose(4, llama, (1, 1)) == (2, 1, 2)          # 2 query groups: TP 4 cannot split them -> TP 2, DP 2
    assert choose(3, llama, (1, 1)) == (1, 1, 3)
    assert choose(8, llama, (2, 2), pp=2) == (2, 2, 2)
    assert choose(4, dict(llama, num_query_groups=8), (1, 1)) == (4, 1, 1)
    assert choose(1, llama, (2, 2)) == (1, 1, 1)
    with pytest.raises(SystemExit, match="do not split over 4 ranks; use one of \\[1, 2\\]"):
        choose(4, llama, (1, 1), tp=4)
    with pytest.raises(SystemExit, match="must divide the number of processes"):
        choose(6, llama, (1, 1), tp=2, pp=2)  # 2 x 2 does not divide 6


def test_defaults_with_four_processes(tmp_path):
    directory = str(tmp_path / "tp2pp2")
    make_checkpoint(directory, 2, 2)
    argv = ["--load", directory, "--greedy", "--max-new-tokens", "8"] + [x for p in PROMPTS for x in ("--prompt-ids", p)]
    reference = _run_tool(argv + ["--batch-size", "1"])  # one process, one prompt at a time
    assert len(reference) == len(PROMPTS) and all(len(ids) == 8 for ids in reference)
    assert len({tuple(ids) for ids in reference}) > 1
    from megatron_lite.inference import SamplingParams, generate, inference_config, load_model
    model = load_model(inference_config(directory))
    prompt_ids = [[int(x) for x in p.split(",")] for p in PROMPTS]
    assert reference == [generate(model, ids, 8) for ids in prompt_ids]
    # Batches of equal-length prompts (3 x len 3, 2 x len 2) give each prompt's own result, sampled too.
    assert _run_tool(argv) == reference
    sampling = ["--temperature", "1.0", "--top-k", "20", "--seed", "11"]
    sampled = [generate(model, ids, 8, SamplingParams(greedy=False, top_k=20, seed=11)) for ids in prompt_ids]
    unflagged = [a for a in argv if a != "--greedy"]
    assert _run_tool(unflagged + sampling) == sampled and sampled != reference
    # 4 processes, no layout flags: TP2 x PP2 from the checkpoint.
    for rank_result in run_distributed(_run_tool, 4, argv=argv):
        assert rank_result == reference
    # 4 processes at TP 2: two data-parallel replicas split the prompts; every rank has all results in order.
    for rank_result in run_distributed(_run_tool, 4, argv=argv + ["--tensor-model-parallel-size", "2"]):
        assert rank_result == reference
