"""Small megatron-core GPT models on CPU under gloo, saved as Megatron-LM saves them: the reference side of
tests/functional/test_convert_megatron_lm.py. Every function here runs inside a run_distributed rank.

megatron-core is CUDA-first; on a CPU machine with gloo its GPTModel (local layer spec,
use_cpu_initialization, dropout 0) runs once these CUDA-only pieces are replaced in the rank process:
torch.cuda.current_device (the global memory buffer, RoPE's inv_freq move), Tensor.cuda (the tied
embedding's first/last-stage sync), torch.cuda.synchronize (dist_checkpointing's preload) and the CUDA
RNG tracker's fork. dist_checkpointing also starts writer processes, which a daemonic rank may not,
and a Manager process for its results queue, which is replaced by an in-process queue.
"""
from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import queue

import torch
import torch.distributed as dist

VOCAB, NULL_VOCAB, SEQ, DIVISIBLE_BY = 60, 59, 32, 16  # NullTokenizer --vocab-size 59: 60 ids (eod = 59)
PROMPT = [5, 9, 2, 33, 17, 40]
NEW_TOKENS = 8


def patch_for_cpu() -> None:
    import megatron.core.utils as mutils
    from megatron.core.tensor_parallel import random as mrandom
    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda *args, **kwargs: None
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    mutils.GlobalMemoryBuffer.get_tensor = lambda self, shape, dtype, name, mem_alloc_context=None: torch.empty(shape, dtype=dtype)
    mrandom.CudaRNGStatesTracker.fork = lambda self, name="model-parallel-rng": contextlib.nullcontext()


def style_kwargs(style: str) -> dict:
    """TransformerConfig fields and the matching Megatron-LM args of each style."""
    if style == "gpt2":  # tied, learned positions, LayerNorm, biases, GeLU (bias-GeLU fusion: tanh)
        return dict(config=dict(num_attention_heads=4, ffn_hidden_size=64, add_bias_linear=True, bias_activation_fusion=True,
                                activation_func=torch.nn.functional.gelu),
                    args=dict(num_attention_heads=4, ffn_hidden_size=64, kv_channels=8, group_query_attention=False,
                              num_query_groups=1, position_embedding_type="learned_absolute", normalization="LayerNorm",
                              swiglu=False, add_bias_linear=True, untie_embeddings_and_output_weights=False),
                    model=dict(share_embeddings_and_output_weights=True, position_embedding_type="learned_absolute"))
    return dict(config=dict(num_attention_heads=8, num_query_groups=2, ffn_hidden_size=48, normalization="RMSNorm",
                            gated_linear_unit=True, add_bias_linear=False, activation_func=torch.nn.functional.silu,
                            bias_activation_fusion=False, qk_layernorm=True),
                args=dict(num_attention_heads=8, ffn_hidden_size=48, kv_channels=4, group_query_attention=True,
                          num_query_groups=2, position_embedding_type="rope", rotary_base=10000, rotary_percent=1.0,
                          normalization="RMSNorm", swiglu=True, add_bias_linear=False, qk_layernorm=True,
                          untie_embeddings_and_output_weights=True),
                model=dict(share_embeddings_and_output_weights=False, position_embedding_type="rope", rotary_base=10000))


def padded_vocab(tp: int) -> int:
    return -(-VOCAB // (DIVISIBLE_BY * tp)) * DIVISIBLE_BY * tp


def megatron_args(style: str, tp: int, pp: int) -> argparse.Namespace:
    """The args Namespace Megatron-LM's training loop would save for this model (the fields its
    checkpoint tools read, plus an enum from megatron-core as real args hold)."""
    from megatron.core.transformer.enums import AttnBackend
    padded = padded_vocab(tp)
    return argparse.Namespace(
        num_layers=4, hidden_size=32, seq_length=SEQ, max_position_embeddings=SEQ, norm_epsilon=1e-5,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, virtual_pipeline_model_parallel_size=None,
        tokenizer_type="NullTokenizer", vocab_size=NULL_VOCAB, padded_vocab_size=padded,
        make_vocab_size_divisible_by=DIVISIBLE_BY, init_method_std=0.3, hidden_dropout=0.0, attention_dropout=0.0,
        bias_gelu_fusion=True, openai_gelu=False, add_qkv_bias=False, params_dtype=torch.float32, fp16=False, bf16=False,
        attention_backend=AttnBackend.auto, ckpt_format="torch", seed=1234, **style_kwargs(style)["args"])


def build(style: str, tp: int, pp: int, seed: int = 0):
    """This rank's megatron-core GPTModel chunk (parallel state initialised here)."""
    from megatron.core import parallel_state as mps
    patch_for_cpu()
    if not mps.model_parallel_is_initialized():
        mps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig
    kwargs = style_kwargs(style)
    torch.manual_seed(seed)
    config = TransformerConfig(num_layers=4, hidden_size=32, use_cpu_initialization=True, hidden_dropout=0.0,
                               attention_dropout=0.0, init_method_std=0.3, tensor_model_parallel_size=tp,
                               pipeline_model_parallel_size=pp, pipeline_dtype=torch.float32, **kwargs["config"])
    padded = megatron_args(style, tp, pp).padded_vocab_size
    spec = get_gpt_layer_local_spec(normalization=kwargs["config"].get("normalization", "LayerNorm"),
                                    qk_layernorm=kwargs["config"].get("qk_layernorm", False))
    model = GPTModel(config, spec,
                     vocab_size=padded, max_sequence_length=SEQ, pre_process=mps.is_pipeline_first_stage(),
                     post_process=mps.is_pipeline_last_stage(), **kwargs["model"])
    return model.eval()


@torch.no_grad()
def logits(model, tokens: list[int]) -> torch.Tensor:
    """Full-vocabulary logits [s, padded vocab] of one sequence, on every rank (manual pipeline forward)."""
    from megatron.core import parallel_state as mps
    ids = torch.tensor([tokens])
    seq = ids.shape[1]
    positions = torch.arange(seq)[None]
    mask = torch.ones(1, 1, seq, seq, dtype=torch.bool).triu(1)
    if not mps.is_pipeline_first_stage():
        hidden = torch.empty(seq, 1, model.config.hidden_size)
        dist.recv(hidden, mps.get_pipeline_model_parallel_prev_rank())
        model.set_input_tensor(hidden)
    out = model(ids if mps.is_pipeline_first_stage() else None, positions, mask)
    tp = mps.get_tensor_model_parallel_world_size()
    result = torch.empty(seq, padded_vocab(tp))
    if not mps.is_pipeline_last_stage():
        dist.send(out.contiguous(), mps.get_pipeline_model_parallel_next_rank())
    else:
        parts = [torch.empty_like(out[0]) for _ in range(tp)]
        dist.all_gather(parts, out[0].contiguous(), group=mps.get_tensor_model_parallel_group())
        result = torch.cat(parts, dim=-1)
    dist.broadcast(result, mps.get_pipeline_model_parallel_last_rank(), group=mps.get_pipeline_model_parallel_group())
    return result


def greedy(model, prompt: list[int], new_tokens: int) -> list[int]:
    """Greedy continuation over the real vocabulary (full recompute each step)."""
    tokens = list(prompt)
    for _ in range(new_tokens):
        tokens.append(int(torch.argmax(logits(model, tokens)[-1, :VOCAB])))
    return tokens[len(prompt):]


def rank_file(directory: str, iteration: int, tp: int, pp: int) -> str:
    from megatron.core import parallel_state as mps
    tp_rank, pp_rank = mps.get_tensor_model_parallel_rank(), mps.get_pipeline_model_parallel_rank()
    name = f"mp_rank_{tp_rank:02d}" if pp == 1 else f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"
    return os.path.join(directory, f"iter_{iteration:07d}", name, "model_optim_rng.pt")


def save_reference(style: str, tp: int, pp: int, torch_dir: str, dist_dir: str) -> dict:
    """Build, save in both Megatron-LM formats as its save_checkpoint does, return reference outputs."""
    import numpy as np
    from megatron.core import dist_checkpointing
    model = build(style, tp, pp)
    args = megatron_args(style, tp, pp)
    iteration = 7
    path = rank_file(torch_dir, iteration, tp, pp)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    rng = {"random_rng_state": None, "np_rng_state": np.random.get_state(), "torch_rng_state": torch.get_rng_state()}
    torch.save({"args": args, "checkpoint_version": 3.0, "iteration": iteration, "model": model.state_dict(),
                "rng_state": [rng], "num_floating_point_operations_so_far": 0}, path)
    dist.barrier()
    if dist.get_rank() == 0:
        with open(os.path.join(torch_dir, "latest_checkpointed_iteration.txt"), "w") as handle:
            handle.write(str(iteration))
    # torch_dist: the sharded state dict plus the common (non-sharded) entries, under iter_N.
    multiprocessing.current_process()._config["daemon"] = False  # its writer processes
    # Its results queue defaults to a multiprocessing Manager (a server process that would outlive this
    # rank); a synchronous save fills it in this process, so a plain queue does.
    from megatron.core.dist_checkpointing.strategies import filesystem_async
    filesystem_async._results_queue = queue.Queue()
    dist_args = argparse.Namespace(**{**vars(args), "ckpt_format": "torch_dist"})
    state = {"model": model.sharded_state_dict(), "args": dist_args, "checkpoint_version": 3.0, "iteration": iteration}
    dist_path = os.path.join(dist_dir, f"iter_{iteration:07d}")
    if dist.get_rank() == 0:
        os.makedirs(dist_path, exist_ok=True)
    dist.barrier()
    dist_checkpointing.save(state, dist_path)
    dist.barrier()
    if dist.get_rank() == 0:
        with open(os.path.join(dist_dir, "latest_checkpointed_iteration.txt"), "w") as handle:
            handle.write(str(iteration))
    return {"logits": logits(model, PROMPT)[:, :VOCAB], "greedy": greedy(model, PROMPT, NEW_TOKENS),
            "state": {k: v.clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}}


def load_ours(style: str, tp: int, pp: int, directory: str) -> dict:
    """megatron-core loads the rank file megatron_lite wrote (strict), and its logits."""
    model = build(style, tp, pp, seed=99)  # different weights: the load must replace all of them
    blob = torch.load(rank_file(directory, 7, tp, pp), weights_only=False)
    result = model.load_state_dict(blob["model"], strict=True)
    return {"missing": list(result.missing_keys), "unexpected": list(result.unexpected_keys),
            "logits": logits(model, PROMPT)[:, :VOCAB], "greedy": greedy(model, PROMPT, NEW_TOKENS),
            "args_tp": blob["args"].tensor_model_parallel_size, "padded": blob["args"].padded_vocab_size}
