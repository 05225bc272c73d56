"""Generate text from a megatron_lite checkpoint, greedily or by sampling, with a KV cache.

    python tools/generate.py --load ./ckpt --prompt "Once upon a time" --max-new-tokens 32 --greedy
    python tools/generate.py --load ./ckpt --prompt-ids 1,2,3 --temperature 0.8 --top-p 0.9 --seed 7 \\
        --output-jsonl out.jsonl
    torchrun --nproc-per-node 4 tools/generate.py --load ./ckpt --prompt "Hello" --prompt "Goodbye" --greedy
    torchrun --nproc-per-node 8 tools/generate.py --load ./ckpt --prompts-file prompts.txt --greedy

The checkpoint is resharded on load to a TP x PP layout. Without layout flags that is the checkpoint's
own TP x PP when it equals the number of processes, else the largest TP that divides the number of
processes and that the model can split (heads, query groups, MLP width), with PP 1. Processes beyond
TP x PP form data-parallel replicas, each generating its share of the prompts (results come back in
prompt order on every rank). The
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

from megatron_lite import collectives, hf_conversion, parallel_state as ps  # noqa: E402
from megatron_lite.checkpoint_io import CheckpointReader, read_tracker  # noqa: E402
from megatron_lite.data.tokenizers import MegatronTokenizer, NullTokenizer, build_tokenizer  # noqa: E402
from megatron_lite.inference import SamplingParams, generate_batch, inference_config, load_model  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--load", "--load-dir", dest="load", required=True, help="Checkpoint (--save dir or iter_N dir).")
    parser.add_argument("--prompt", action="append", default=[], help="Prompt text (repeatable).")
    parser.add_argument("--prompt-ids", action="append", default=[], help="Prompt as token ids, e.g. 1,2,3 (repeatable).")
    parser.add_argument("--prompts-file", default=None,
                        help="More prompts: a text file with one prompt per line, or JSONL with a 'prompt' or 'text' key.")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8,
                        help="Prompts of equal token length generated together in one batch (per data-parallel replica).")
    parser.add_argument("--greedy", action="store_true", help="Argmax decoding (otherwise sampling).")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0, help="Sample from the k most likely tokens (0: all).")
    parser.add_argument("--top-p", type=float, default=1.0, help="Nucleus sampling threshold (1.0: off).")
    parser.add_argument("--seed", type=int, default=1234, help="Sampling seed.")
    parser.add_argument("--ignore-eod", action="store_true", help="Do not stop at the end-of-document token.")
    parser.add_argument("--no-kv-cache", action="store_true", help="Recompute the whole sequence each step (for checks).")
    parser.add_argument("--output-jsonl", default=None, help="Write {prompt, prompt_ids, generated_ids, generated_text} lines.")
    parser.add_argument("--tensor-model-parallel-size", type=int, default=None,
                        help="Default: the checkpoint's when its TP x PP equals WORLD_SIZE, else the largest valid TP.")
    parser.add_argument("--pipeline-model-parallel-size", type=int, default=None, help="Default: see above (else 1).")
    parser.add_argument("--expert-model-parallel-size", type=int, default=None,
                        help="MoE: experts split over EP ranks taken from the data-parallel replicas (default: the "
                             "checkpoint's EP when it fits, else 1). With EP > 1 every replica generates every prompt "
                             "(the replicas run each forward together).")
    parser.add_argument("--expert-tensor-parallel-size", type=int, default=None,
                        help="MoE: each expert split over ETP ranks (default: the checkpoint's, else TP).")
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


def _splittable_tp(model: dict, tp: int) -> bool:
    """Whether the model's heads, query groups and MLP width all split over `tp` ranks."""
    heads = model["num_attention_heads"]
    groups = model.get("num_query_groups") or heads
    ffn = model.get("ffn_hidden_size") or 4 * model["hidden_size"]
    return heads % tp == 0 and groups % tp == 0 and ffn % tp == 0


def choose_layout(world: int, model: dict, saved: tuple[int, int], tp: Optional[int] = None,
                  pp: Optional[int] = None) -> tuple[int, int, int]:
    """(TP, PP, DP) for `world` processes: the flags if given; else the checkpoint's own `saved` TP x PP when
    it equals `world`; else the largest TP dividing world / PP that the model can split (PP 1 by default).
    Processes beyond TP x PP are data-parallel replicas."""
    if tp is None and pp is None and saved[0] * saved[1] == world and _splittable_tp(model, saved[0]) \
            and model["num_layers"] % saved[1] == 0:
        return saved[0], saved[1], 1
    pp = pp or 1
    if world % pp != 0:
        raise SystemExit(f"error: --pipeline-model-parallel-size {pp} does not divide the number of processes ({world}).")
    if tp is None:
        tp = max(t for t in range(1, world // pp + 1) if (world // pp) % t == 0 and _splittable_tp(model, t))
    elif not _splittable_tp(model, tp):
        valid = [t for t in range(1, world // pp + 1) if (world // pp) % t == 0 and _splittable_tp(model, t)]
        raise SystemExit(f"error: --tensor-model-parallel-size {tp}: the model's heads/query groups/MLP do not split "
                         f"over {tp} ranks; use one of {valid}.")
    if world % (tp * pp) != 0:
        raise SystemExit(f"error: --tensor-model-parallel-size {tp} x --pipeline-model-parallel-size {pp} must divide "
                         f"the number of processes ({world}).")
    return tp, pp, world // (tp * pp)


def setup_parallel(args: argparse.Namespace) -> tuple[int, int, Optional[torch.device]]:
    """torch.distributed (under torchrun) and the TP/PP(/DP) groups; returns (tp, pp, device)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.context_parallel_size != 1:
        raise SystemExit(f"error: --context-parallel-size {args.context_parallel_size}: context parallelism is for "
                         "training; generation runs with CP 1 (any checkpoint, whatever CP it was trained with, "
                         "loads here). Drop --context-parallel-size, and use TP/PP to spread the model.")
    reader = CheckpointReader(args.load)
    layout = reader.layout
    tp, pp, dp = choose_layout(world, reader.config["model"], (layout.get("tp") or 1, layout.get("pp") or 1),
                               args.tensor_model_parallel_size, args.pipeline_model_parallel_size)
    args.ep, args.etp = expert_layout(args, layout, world, tp, pp)
    device = None
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if world > 1:
        if not torch.distributed.is_initialized():
            ps.init_distributed()
        ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                     expert_model_parallel_size=args.ep, expert_tensor_parallel_size=args.etp)
    return tp, pp, device


def expert_layout(args: argparse.Namespace, saved: dict, world: int, tp: int, pp: int) -> tuple[int, Optional[int]]:
    """(EP, ETP) for generation: the flags, else the checkpoint's when ETP x EP divides world / PP, else (1, TP)."""
    ep, etp = args.expert_model_parallel_size, args.expert_tensor_parallel_size
    if ep is None and etp is None:
        ep, etp = saved.get("ep") or 1, saved.get("etp")
        if (world // pp) % (ep * (etp or tp)) != 0:
            ep, etp = 1, None
    ep = ep or 1
    if (world // pp) % (ep * (etp or tp)) != 0:
        raise SystemExit(f"error: --expert-model-parallel-size {ep} x --expert-tensor-parallel-size {etp or tp} must "
                         f"divide the processes per pipeline stage ({world // pp}).")
    return ep, etp


def read_prompts_file(path: str) -> list[str]:
    """One prompt per non-empty line; JSONL lines use their 'prompt' (or 'text') value."""
    prompts = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            line = line.rstrip("\n")
            if not line.strip():
                continue
            if line.lstrip().startswith("{"):
                record = json.loads(line)
                line = record.get("prompt", record.get("text"))
                if line is None:
                    raise SystemExit(f"error: {path}: a JSON line without a 'prompt' or 'text' key.")
            prompts.append(line)
    return prompts


def prompts_of(args: argparse.Namespace, tokenizer: MegatronTokenizer) -> list[tuple[Optional[str], list[int]]]:
    texts = list(args.prompt) + (read_prompts_file(args.prompts_file) if args.prompts_file else [])
    prompts = [(text, tokenizer.tokenize(text)) for text in texts]
    prompts += [(None, [int(x) for x in ids.replace(" ", "").split(",") if x]) for ids in args.prompt_ids]
    if not prompts:
        raise SystemExit("error: give --prompt TEXT, --prompt-ids 1,2,3 or --prompts-file FILE.")
    for text, ids in prompts:
        if not ids:
            raise SystemExit(f"error: prompt {text!r} tokenizes to no tokens.")
    return prompts


def batches_of(indices: list[int], prompts: list, batch_size: int) -> list[list[int]]:
    """`indices` grouped into batches of at most `batch_size` prompts of equal token length (first-seen order)."""
    by_length: dict[int, list[int]] = {}
    for index in indices:
        by_length.setdefault(len(prompts[index][1]), []).append(index)
    return [group[i:i + batch_size] for group in by_length.values() for i in range(0, len(group), batch_size)]


def main(argv: Optional[list[str]] = None) -> list[dict]:
    """Run generation; returns each prompt's result (on every rank). Tears down the groups it created."""
    args = build_parser().parse_args(argv)
    owns_process_group = not torch.distributed.is_initialized()
    tp, pp, device = setup_parallel(args)
    try:
        return run(args, tp, pp, device)
    finally:
        if ps.model_parallel_is_initialized():
            ps.destroy_model_parallel()
            if owns_process_group:  # an un-destroyed gloo/NCCL group aborts the interpreter at exit
                torch.distributed.destroy_process_group()


def run(args: argparse.Namespace, tp: int, pp: int, device: Optional[torch.device]) -> list[dict]:
    ep, etp = getattr(args, "ep", 1), getattr(args, "etp", None)
    config = inference_config(args.load, tp=tp, pp=pp, bf16=args.bf16, fp16=args.fp16, ep=ep, etp=etp)
    tokenizer = resolve_tokenizer(args, config)
    prompts = prompts_of(args, tokenizer)
    model = load_model(config, device)
    params = SamplingParams(greedy=args.greedy, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                            seed=args.seed)
    stop_ids = () if args.ignore_eod or isinstance(tokenizer, NullTokenizer) else (tokenizer.eod,)
    rank0 = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
    # Data-parallel replicas: replica r generates prompts r, r + DP, ...; every rank gets all results.
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    if ep > 1 or (etp or tp) != tp:  # MoE forwards are collective over the replicas: all run every prompt
        dp, dp_rank = 1, 0
    mine = []
    for batch in batches_of(list(range(dp_rank, len(prompts), dp)), prompts, max(1, args.batch_size)):
        outputs = generate_batch(model, [prompts[i][1] for i in batch], args.max_new_tokens, params, stop_ids,
                                 use_kv_cache=not args.no_kv_cache)
        for index, ids in zip(batch, outputs):
            text, prompt_ids = prompts[index]
            mine.append((index, {"prompt": text, "prompt_ids": prompt_ids, "generated_ids": ids,
                                 "generated_text": tokenizer.detokenize(ids)}))
    if dp > 1:
        mine = [item for part in collectives.all_gather_object(mine, ps.get_data_parallel_group()) for item in part]
    results = [result for _, result in sorted(mine, key=lambda item: item[0])]
    for result in results:
        text, prompt_ids, ids = result["prompt"], result["prompt_ids"], result["generated_ids"]
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
