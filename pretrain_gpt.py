"""Pretrain a GPT model: `torchrun --nproc-per-node N pretrain_gpt.py --tensor-model-parallel-size ...`.

Thin, as in Megatron-LM: it provides the model, the batches and the loss, and hands them to
megatron_lite.training.pretrain(). Run with --help for every flag.
"""
from __future__ import annotations

import os
import sys
from functools import partial

import torch

from megatron_lite import arguments, collectives, parallel_state as ps
from megatron_lite.config import Config, ConfigError
from megatron_lite.context_parallel import cp_masked_mean, slice_batch_for_cp

_BATCH_KEYS = ("tokens", "labels", "loss_mask", "position_ids")


def model_provider(config: Config, pre_process: bool, post_process: bool, layer_numbers: list[int]):
    """This rank's GPT model chunk, built over the process groups the driver initialised."""
    from megatron_lite.models.gpt.model import GPTModel
    return GPTModel(config, pre_process=pre_process, post_process=post_process, layer_numbers=layer_numbers,
                    groups=_groups())


def _groups():
    """The groups training.initialize built (one process when a test calls these functions directly)."""
    from megatron_lite.process_groups import ProcessGroups
    return ps.get_process_groups() if ps.model_parallel_is_initialized() else ProcessGroups.single()


def datasets_provider(config: Config, num_samples: tuple[int, int, int]):
    from megatron_lite.data import build_gpt_datasets
    d, m = config.data, config.model
    return build_gpt_datasets(d.data_path, d.split, m.seq_length, num_samples, config.training.seed, d.data_cache_path,
                              d.mock_data, m.vocab_size, config.extra["eod_id"], d.reset_position_ids,
                              d.reset_attention_mask, d.eod_mask_loss)


def get_batch(config: Config, data_iterator) -> dict:
    """TP rank 0 reads the micro-batch and broadcasts it over the TP group (one read per TP group); under
    context parallelism each CP rank then keeps its two chunks of the sequence (tokens, labels, loss mask,
    position ids: context_parallel.slice_batch_for_cp; the attention mask stays whole)."""
    mbs, seq = config.training.micro_batch_size, config.model.seq_length
    with_mask = config.data.reset_attention_mask
    batch = next(data_iterator) if data_iterator is not None else None
    shapes = {"tokens": (mbs, seq), "labels": (mbs, seq), "loss_mask": (mbs, seq), "position_ids": (mbs, seq)}
    dtypes = {"tokens": torch.int64, "labels": torch.int64, "loss_mask": torch.float32, "position_ids": torch.int64}
    if with_mask:
        shapes["attention_mask"], dtypes["attention_mask"] = (mbs, 1, seq, seq), torch.bool
    group = _groups().tp
    device = collectives.device_for(group)  # where the model runs and the TP group communicates
    src = group.first
    out = {}
    for key in shapes:
        if batch is not None:
            tensor = batch[key].to(device=device, dtype=dtypes[key] if key != "attention_mask" else torch.uint8).contiguous()
        else:
            tensor = torch.empty(shapes[key], dtype=dtypes[key] if key != "attention_mask" else torch.uint8, device=device)
        collectives.broadcast(tensor, src=src, group=group)  # bool is sent as uint8 (gloo has no bool)
        out[key] = tensor.bool() if key == "attention_mask" else tensor
    return slice_batch_for_cp(out, _groups().cp)


def loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Mean of the per-token losses over the unmasked tokens of the micro-batch (under context parallelism,
    over the tokens of all CP ranks: context_parallel.cp_masked_mean)."""
    cp_group = _groups().cp
    if cp_group.size > 1:
        loss, reported = cp_masked_mean(output_tensor, loss_mask, cp_group)
    else:
        losses = output_tensor.float()
        loss_mask = loss_mask.float()
        loss = torch.sum(losses.view(-1) * loss_mask.view(-1)) / loss_mask.sum().clamp(min=1.0)
        reported = loss.detach()
    return loss, {"lm loss": reported}


def forward_step(config: Config, data_iterator, model):
    """Megatron's forward_step: (output tensor, loss function) for one micro-batch on one chunk."""
    from megatron_lite.distributed.model_chunk import ModelChunk
    chunk = model.module if isinstance(model, ModelChunk) else model
    first, last = chunk.pre_process, chunk.post_process
    if first or last:
        batch = get_batch(config, data_iterator)
        output = model(batch["tokens"] if first else None, batch["position_ids"] if first else None,
                       batch.get("attention_mask"), labels=batch["labels"] if last else None,
                       loss_mask=batch["loss_mask"] if last else None)
        return output, partial(loss_func, batch["loss_mask"])
    output = model(None, None, None, labels=None)
    return output, partial(loss_func, None)


def prepare_tokenizer(config: Config):
    """Set the vocabulary size and end-of-document id from the tokenizer (before building anything)."""
    from megatron_lite.data import build_tokenizer
    d, m = config.data, config.model
    if d.tokenizer_type == "NullTokenizer":
        if m.vocab_size is None:
            raise ConfigError("--vocab-size: is required with --tokenizer-type NullTokenizer (and with --mock-data). "
                              "Give the vocabulary size, e.g. --vocab-size 50257.")
    tokenizer = build_tokenizer(d.tokenizer_type, tokenizer_model=d.tokenizer_model, vocab_file=d.vocab_file,
                                merge_file=d.merge_file, vocab_size=m.vocab_size)
    # A model may have more embedding rows than its tokenizer has tokens (e.g. one imported from
    # Hugging Face with a rounded-up vocabulary): --vocab-size keeps them; fewer rows cannot work.
    if m.vocab_size is not None and d.tokenizer_type != "NullTokenizer":
        if m.vocab_size < tokenizer.vocab_size:
            raise ConfigError(f"--vocab-size: {m.vocab_size} is smaller than the tokenizer's {tokenizer.vocab_size} tokens. "
                              f"Drop --vocab-size, or give at least {tokenizer.vocab_size}.")
    else:
        m.vocab_size = tokenizer.vocab_size
    config.extra["eod_id"] = tokenizer.eod
    return tokenizer


def save_tokenizer(config: Config, tokenizer) -> None:
    """Copy the tokenizer files next to the checkpoints (<save>/tokenizer/), so a checkpoint is
    self-contained for tools/generate.py and the Hugging Face exporter."""
    if config.checkpoint.save and int(os.environ.get("RANK", "0")) == 0:
        tokenizer.save(os.path.join(config.checkpoint.save, "tokenizer"))


def main(argv=None) -> dict:
    try:
        config = arguments.parse(argv)
        tokenizer = prepare_tokenizer(config)
        save_tokenizer(config, tokenizer)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    from megatron_lite.checkpoint_io import CheckpointError
    from megatron_lite.data.indexed_dataset import IndexedDatasetError
    from megatron_lite.training import NonFiniteTrainingError, pretrain
    try:
        return pretrain(config, partial(model_provider, config), partial(forward_step, config), datasets_provider)
    except (NonFiniteTrainingError, CheckpointError, IndexedDatasetError) as error:
        # Raised on every rank together (each checks, all agree): one message, no tracebacks.
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {error}", file=sys.stderr, flush=True)
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
