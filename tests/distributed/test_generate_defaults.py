"""tools/generate.py's layout defaults: with no layout flags, 4 processes on a TP2 x PP2 checkpoint use
TP2 x PP2 and give the single-process ids; processes beyond TP x PP generate prompts data-parallel and
return every prompt's result, in order, on every rank; the default TP never splits what the model cannot.
Prompts of equal length are generated as one batch and give what each gives alone (greedy and sampled).
"""
from __future__ import annotations

import importlib.util
import os
import sys

import pytest

from megatron_lite.checkpoint_io import param_meta_from_model, write_checkpoint_from_full_tensors
from megatron_lite.config import Config
from megatron_lite.tensor_parallel.shard_spec import shard_spec_of
from megatron_lite.testing import run_distributed

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
PROMPTS = ["5,9,2,33,17", "1,2,3", "40,41", "7,7,7,7", "8,1,30", "22,23", "3,3,9"]


def load_generate():
    spec = importlib.util.spec_from_file_location("tool_generate", os.path.join(ROOT, "tools", "generate.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def make_checkpoint(directory: str, tp: int, pp: int) -> None:
    """A Llama-style GQA model (8 heads, 2 query groups) saved at TP x PP."""
    cfg = Config()
    m = cfg.model
    m.num_layers, m.hidden_size, m.seq_length, m.vocab_size, m.make_vocab_size_divisible_by = 4, 32, 32, 60, 8
    m.init_method_std = 0.3
    m.num_attention_heads, m.group_query_attention, m.num_query_groups = 8, True, 2
    m.position_embedding_type, m.swiglu, m.normalization = "rope", True, "RMSNorm"
    m.add_bias_linear, m.untie_embeddings_and_output_weights, m.ffn_hidden_size = False, True, 48
    cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size = tp, pp
    cfg.world_size = tp * pp
    cfg.validate()
    from megatron_lite.models.gpt.model import GPTModel
    single = Config.from_dict(cfg.to_dict())
    single.parallel.tensor_model_parallel_size = single.parallel.pipeline_model_parallel_size = 1
    single.world_size = 1
    model = GPTModel(single.validate())
    tensors = {n: p.detach()[:m.vocab_size] if shard_spec_of(p).unpadded_size else p.detach()
               for n, p in model.named_parameters()}
    write_checkpoint_from_full_tensors(directory, 5, cfg, tensors, param_meta_from_model([model]), tp=tp, pp=pp)


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
