"""Generate text from a megatron_lite checkpoint, greedily or by sampling, with a KV cache.

    python tools/generate.py --load ./ckpt --prompt "Once upon a time" --max-new-tokens 32 --greedy
    python tools/generate.py --load ./ckpt --prompt-ids 1,2,3 --temperature 0.8 --top-p 0.9 --seed 7 \\
        --output-jsonl out.jsonl
    torchrun --nproc-per-node 4 tools/generate.py --load ./ckpt --tensor-model-parallel-size 2 \\
        --pipeline-model-parallel-size 2 --prompt "Hello" --greedy

The checkpoint is resharded on load to the TP x PP layout asked for (default: TP = world size). The
tokenizer is, in order: the --tokenizer-* flags; `<load>/tokenizer/` (written by convert.py); the
files the checkpoint was trained with (its config), if they still exist; else ids only (NullTokenizer:
a --prompt is space-separated ids). Without --greedy, tokens are sampled (temperature 1 by default).
Generation stops after --max-new-tokens tokens or at the tokenizer's end-of-document token
(unless --ignore-eod). Rank 0 prints; --output-jsonl writes one JSON object per prompt.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional

import torch

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from megatron_lite import hf_conversion, parallel_state as ps  # noqa: E402
from megatron_lite.checkpoint_io import read_tracker  # noqa: E402
from megatron_lite.data.tokenizers import MegatronTokenizer, NullTokenizer, build_tokenizer  # noqa: E402
from megatron_lite.inference import SamplingParams, generate, inference_config, load_model  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--load", "--load-dir", dest="load", required=True, help="Checkpoint (--save dir or iter_N dir).")
    parser.add_argument("--prompt", action="append", default=[], help="Prompt text (repeatable).")
    parser.add_argument("--prompt-ids", action="append", default=[], help="Prompt as token ids, e.g. 1,2,3 (repeatable).")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--greedy", action="store_true", help="Argmax decoding (otherwise sampling).")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0, help="Sample from the k most likely tokens (0: all).")
    parser.add_argument("--top-p", type=float, default=1.0, help="Nucleus sampling threshold (1.0: off).")
    parser.add_argument("--seed", type=int, default=1234, help="Sampling seed.")
    parser.add_argument("--ignore-eod", action="store_true", help="Do not stop at the end-of-document token.")
    parser.add_argument("--no-kv-cache", action="store_true", help="Recompute the whole sequence each step (for checks).")
    parser.add_argument("--output-jsonl", default=None, help="Write {prompt, prompt_ids, generated_ids, generated_text} lines.")
    parser.add_argument("--tensor-model-parallel-size", type=int, default=None, help="Default: WORLD_SIZE / PP.")
    parser.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    parser.add_argument("--context-parallel-size", type=int, default=1,
                        help="Only 1: context parallelism is for training (a checkpoint trained with CP loads here).")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--fp16", action="store_true")
    parser.add_argument("--tokenizer-type", default=None, help="Override the checkpoint's tokenizer (Megatron names).")
    parser.add_argument("--tokenizer-model", default=None)
    parser.add_argument("--vocab-file", default=None)
    parser.add_argument("--merge-file", default=None)
    return parser


def resolve_tokenizer(args: argparse.Namespace, config) -> MegatronTokenizer:
    """The tokenizer, in the order the module docstring gives."""
    vocab_size = config.model.vocab_size
    if args.tokenizer_type:
        return build_tokenizer(args.tokenizer_type, args.tokenizer_model, args.vocab_file, args.merge_file, vocab_size)
    root = args.load if read_tracker(args.load) is not None else os.path.dirname(os.path.abspath(args.load))
    settings = hf_conversion.tokenizer_settings(os.path.join(root, "tokenizer"))
    if settings is None:
        data = config.data
        files = [f for f in (data.tokenizer_model, data.vocab_file, data.merge_file) if f]
        if data.tokenizer_type != "NullTokenizer" and files and all(os.path.exists(f) for f in files):
            settings = {"tokenizer_type": data.tokenizer_type, "tokenizer_model": data.tokenizer_model,
                        "vocab_file": data.vocab_file, "merge_file": data.merge_file}
    if settings is None:
        return NullTokenizer(vocab_size)
    return build_tokenizer(settings["tokenizer_type"], settings.get("tokenizer_model"), settings.get("vocab_file"),
                           settings.get("merge_file"), vocab_size)


def setup_parallel(args: argparse.Namespace) -> tuple[int, int, Optional[torch.device]]:
    """torch.distributed (under torchrun) and the TP/PP groups; returns (tp, pp, device)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.context_parallel_size != 1:
        raise SystemExit(f"error: --context-parallel-size {args.context_parallel_size}: context parallelism is for "
                         "training; generation runs with CP 1 (any checkpoint, whatever CP it was trained with, "
                         "loads here). Drop --context-parallel-size, and use TP/PP to spread the model.")
    pp = args.pipeline_model_parallel_size
    tp = args.tensor_model_parallel_size or max(1, world // pp)
    if tp * pp != world:
        raise SystemExit(f"error: --tensor-model-parallel-size {tp} x --pipeline-model-parallel-size {pp} must equal "
                         f"the number of processes ({world}); data-parallel generation is not supported.")
    device = None
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if world > 1:
        if not torch.distributed.is_initialized():
            ps.init_distributed()
        ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    return tp, pp, device


def prompts_of(args: argparse.Namespace, tokenizer: MegatronTokenizer) -> list[tuple[Optional[str], list[int]]]:
    prompts = [(text, tokenizer.tokenize(text)) for text in args.prompt]
    prompts += [(None, [int(x) for x in ids.replace(" ", "").split(",") if x]) for ids in args.prompt_ids]
    if not prompts:
        raise SystemExit("error: give --prompt TEXT or --prompt-ids 1,2,3.")
    for text, ids in prompts:
        if not ids:
            raise SystemExit(f"error: prompt {text!r} tokenizes to no tokens.")
    return prompts


def main(argv: Optional[list[str]] = None) -> list[dict]:
    """Run generation; returns each prompt's result (on every rank). Tears down the groups it created."""
    args = build_parser().parse_args(argv)
    owns_process_group = not torch.distributed.is_initialized()
    tp, pp, device = setup_parallel(args)
    try:
        return run(args, tp, pp, device)
    finally:
        if tp * pp > 1:
            ps.destroy_model_parallel()
            if owns_process_group:  # an un-destroyed gloo/NCCL group aborts the interpreter at exit
                torch.distributed.destroy_process_group()


def run(args: argparse.Namespace, tp: int, pp: int, device: Optional[torch.device]) -> list[dict]:
    config = inference_config(args.load, tp=tp, pp=pp, bf16=args.bf16, fp16=args.fp16)
    tokenizer = resolve_tokenizer(args, config)
    prompts = prompts_of(args, tokenizer)
    model = load_model(config, device)
    params = SamplingParams(greedy=args.greedy, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                            seed=args.seed)
    stop_ids = () if args.ignore_eod or isinstance(tokenizer, NullTokenizer) else (tokenizer.eod,)
    rank0 = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
    results = []
    for text, prompt_ids in prompts:
        ids = generate(model, prompt_ids, args.max_new_tokens, params, stop_ids, use_kv_cache=not args.no_kv_cache)
        result = {"prompt": text, "prompt_ids": prompt_ids, "generated_ids": ids,
                  "generated_text": tokenizer.detokenize(ids)}
        results.append(result)
        if rank0:
            if text is not None:  # detokenize prompt and continuation together, so joins (spaces, bytes) are right
                print(tokenizer.detokenize(prompt_ids + ids), flush=True)
            else:
                print(f"{prompt_ids} -> {ids}: {result['generated_text']}", flush=True)
    if rank0 and args.output_jsonl:
        with open(args.output_jsonl, "w") as handle:
            for result in results:
                handle.write(json.dumps(result) + "\n")
    return results


if __name__ == "__main__":
    main()
