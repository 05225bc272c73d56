"""Inference: load a checkpoint into this rank's model chunk (any TP / PP), run it incrementally with a
KV cache, and generate tokens greedily or by sampling (temperature, top-k, top-p).

With pipeline parallelism the stages run in sequence for every forward: each non-first stage receives
the previous stage's hidden states [s, b, h], the last stage computes logits, gathers them over TP and
picks the next token, which is broadcast over the pipeline group so every stage feeds the same token.
All communication goes through megatron_lite.collectives.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from megatron_lite import collectives, parallel_state as ps
from megatron_lite.checkpoint_io import CheckpointReader
from megatron_lite.config import Config
from megatron_lite.process_groups import ProcessGroups


def _groups(groups: Optional[ProcessGroups]) -> ProcessGroups:
    """The groups passed in, else parallel_state's (a tool that initialised them), else one process."""
    if groups is not None:
        return groups
    return ps.get_process_groups() if ps.model_parallel_is_initialized() else ProcessGroups.single()


# ---- model loading --------------------------------------------------------------------------------
def inference_config(load_dir: str, tp: int = 1, pp: int = 1, bf16: bool = False, fp16: bool = False,
                     ep: int = 1, etp: Optional[int] = None) -> Config:
    """The checkpoint's config (metadata.json) set up for inference in a TP x PP layout (MoE: experts over
    ETP x EP, folded over TP x DP: the world is then TP x PP x DP with EP x ETP dividing TP x DP): no dropout,
    recompute or sequence/virtual pipelining, which only matter for training."""
    values = copy.deepcopy(CheckpointReader(load_dir).config)
    cfg = Config.from_dict(values)
    cfg.extra["inference"] = True  # MoE with TP routes 1/TP slices of the replicated tokens (no SP needed)
    cfg.parallel.expert_model_parallel_size, cfg.parallel.expert_tensor_parallel_size = ep, etp
    m, p = cfg.model, cfg.parallel
    m.hidden_dropout = m.attention_dropout = 0.0
    m.recompute_granularity = m.recompute_method = m.recompute_num_layers = None
    p.tensor_model_parallel_size, p.pipeline_model_parallel_size = tp, pp
    p.sequence_parallel, p.context_parallel_size = False, 1
    p.virtual_pipeline_model_parallel_size = p.num_layers_per_virtual_pipeline_stage = None
    p.decoder_first_pipeline_num_layers = p.decoder_last_pipeline_num_layers = None
    p.pipeline_schedule, p.use_distributed_optimizer, p.overlap_param_gather = "auto", False, False
    p.data_parallel_sharding_strategy = None  # (a ZeRO-2 training run's strategy would turn the line above back on)
    cfg.optimizer.optimizer_cpu_offload, cfg.optimizer.optimizer_nvme_offload_dir = False, None
    cfg.optimizer.bf16, cfg.optimizer.fp16, cfg.optimizer.loss_scale = bf16, fp16, None
    cfg.training.micro_batch_size, cfg.training.global_batch_size, cfg.training.rampup_batch_size = 1, pp, None
    cfg.checkpoint.load, cfg.checkpoint.no_load_optim, cfg.checkpoint.no_load_rng = load_dir, True, True
    cfg.checkpoint.finetune = False
    cfg.world_size = tp * pp * max(1, ep * (etp or tp) // tp)  # EP ranks come from data-parallel replicas
    cfg.training.global_batch_size = pp * cfg.world_size // (tp * pp)
    return cfg.validate()


def load_model(config: Config, device: Optional[torch.device] = None,
               groups: Optional[ProcessGroups] = None) -> torch.nn.Module:
    """This rank's model chunk (the groups must match config's TP/PP) with the checkpoint's weights,
    resharded on load to this layout, in eval mode."""
    from megatron_lite.checkpointing import load_checkpoint
    from megatron_lite.models.gpt.model import GPTModel
    from megatron_lite.pipeline.stages import layers_for_stage
    groups = _groups(groups)
    pp_size, pp_rank = groups.pp.size, groups.pp.rank
    layers = layers_for_stage(config.model.num_layers, pp_size, pp_rank)
    model = GPTModel(config, pre_process=pp_rank == 0, post_process=pp_rank == pp_size - 1, layer_numbers=layers,
                     groups=groups)
    if device is not None:
        model = model.to(device)
    load_checkpoint(model, None, None, config, groups=groups)
    return model.eval()


# ---- one forward through every pipeline stage ----------------------------------------------------
def pipeline_forward(model: torch.nn.Module, tokens: torch.Tensor, position_ids: torch.Tensor,
                     inference_context=None, labels: Optional[torch.Tensor] = None,
                     groups: Optional[ProcessGroups] = None) -> Optional[torch.Tensor]:
    """Run tokens [b, s] through all stages. Returns, on the last stage, the full-vocabulary logits
    [b, s, vocab] (gathered over TP, padding removed), or the per-token loss [b, s] when labels are
    given; None on other stages."""
    groups = _groups(groups)
    pp_size, pp_rank = groups.pp.size, groups.pp.rank
    config = model.config
    batch, seq = tokens.shape
    if pp_rank > 0:
        hidden = torch.empty(seq, batch, config.model.hidden_size, dtype=config.params_dtype, device=tokens.device)
        collectives.recv(hidden, groups.pp.global_rank(pp_rank - 1))
        model.set_input_tensor(hidden)
    kwargs = {"inference_context": inference_context} if inference_context is not None else {}
    out = model(tokens if pp_rank == 0 else None, position_ids, None,
                labels=labels if pp_rank == pp_size - 1 else None, **kwargs)
    if pp_rank < pp_size - 1:
        collectives.send(out, groups.pp.global_rank(pp_rank + 1))
        return None
    if labels is not None:
        return out
    if groups.tp.size > 1:
        out = collectives.all_gather(out.contiguous(), groups.tp, dim=-1)
    return out[..., :config.model.vocab_size]


def broadcast_from_last_stage(tensor: torch.Tensor, groups: Optional[ProcessGroups] = None) -> torch.Tensor:
    """Every stage gets the last stage's tensor (same shape and dtype on every rank)."""
    groups = _groups(groups)
    if groups.pp.size > 1:
        collectives.broadcast(tensor, src=groups.pp.last, group=groups.pp)
    return tensor


@torch.no_grad()
def token_losses(model: torch.nn.Module, tokens: torch.Tensor, labels: torch.Tensor,
                 groups: Optional[ProcessGroups] = None) -> torch.Tensor:
    """Per-token loss [b, s] of a batch, available on every rank (for checking checkpoints)."""
    groups = _groups(groups)
    positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
    loss = pipeline_forward(model, tokens, positions, labels=labels, groups=groups)
    if loss is None:
        loss = torch.empty(tokens.shape, dtype=torch.float32, device=tokens.device)
    return broadcast_from_last_stage(loss.float().contiguous(), groups)


# ---- sampling -------------------------------------------------------------------------------------
@dataclass
class SamplingParams:
    greedy: bool = True
    temperature: float = 1.0
    top_k: int = 0      # 0: no top-k filter
    top_p: float = 1.0  # 1.0: no nucleus filter
    seed: int = 1234


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """The next token from the logits [vocab] of the last position. Runs on the CPU in fp32 so every
    rank with the same generator state draws the same token."""
    logits = logits.detach().float().cpu()
    if params.greedy or params.temperature <= 0:
        return int(torch.argmax(logits))
    logits = logits / params.temperature
    if 0 < params.top_k < logits.numel():
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        # Drop a token when the tokens before it already reach top_p; the most likely one always stays.
        drop = cumulative - torch.softmax(sorted_logits, dim=-1) >= params.top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return int(torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator))


@torch.no_grad()
def generate(model: torch.nn.Module, prompt_ids: Sequence[int], max_new_tokens: int,
             params: Optional[SamplingParams] = None, stop_ids: Sequence[int] = (),
             use_kv_cache: bool = True, groups: Optional[ProcessGroups] = None) -> list[int]:
    """Generate up to max_new_tokens after prompt_ids (stopping after a token in stop_ids). Collective:
    every rank of the model-parallel group calls it with the same arguments; every rank returns the
    same ids. With the KV cache, the prompt is processed once and each step feeds only the new token."""
    from megatron_lite.models.gpt.transformer import InferenceContext
    params = params or SamplingParams()
    groups = _groups(groups)
    generator = torch.Generator().manual_seed(params.seed)
    device = next(model.parameters()).device
    context = InferenceContext() if use_kv_cache else None
    tokens = torch.tensor([list(prompt_ids)], dtype=torch.long, device=device)
    step_input, generated = tokens, []
    for _ in range(max_new_tokens):
        start = context.offset if context is not None else 0
        positions = torch.arange(start, start + step_input.shape[1], device=device)[None]
        logits = pipeline_forward(model, step_input, positions, context, groups=groups)
        if context is not None:
            context.advance(step_input.shape[1])
        next_token = torch.zeros(1, dtype=torch.long, device=device)
        if logits is not None:
            next_token.fill_(sample(logits[0, -1], params, generator))
        next_id = int(broadcast_from_last_stage(next_token, groups).item())
        generated.append(next_id)
        if next_id in stop_ids:
            break
        tokens = torch.cat([tokens, next_token.view(1, 1)], dim=1)
        step_input = next_token.view(1, 1) if context is not None else tokens
    return generated


@torch.no_grad()
def generate_batch(model: torch.nn.Module, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                   params: Optional[SamplingParams] = None, stop_ids: Sequence[int] = (),
                   use_kv_cache: bool = True) -> list[list[int]]:
    """`generate` for several prompts of the same length in one batch: each row gets what `generate` gives
    it alone (its own sampling generator seeded with params.seed; it stops after a stop id while the
    others go on). Collective like `generate`."""
    from megatron_lite.models.gpt.transformer import InferenceContext
    if len({len(p) for p in prompts}) != 1:
        raise ValueError("generate_batch needs prompts of one length; group them by length first.")
    params = params or SamplingParams()
    generators = [torch.Generator().manual_seed(params.seed) for _ in prompts]
    device = next(model.parameters()).device
    context = InferenceContext() if use_kv_cache else None
    tokens = torch.tensor([list(p) for p in prompts], dtype=torch.long, device=device)
    step_input, generated = tokens, [[] for _ in prompts]
    done = [False] * len(prompts)
    for _ in range(max_new_tokens):
        start = context.offset if context is not None else 0
        positions = torch.arange(start, start + step_input.shape[1], device=device)[None].expand(len(prompts), -1)
        logits = pipeline_forward(model, step_input, positions, context)
        if context is not None:
            context.advance(step_input.shape[1])
        next_tokens = torch.zeros(len(prompts), dtype=torch.long, device=device)
        if logits is not None:
            for row in range(len(prompts)):
                if not done[row]:  # a finished row draws nothing, so the others' generators stay in step
                    next_tokens[row] = sample(logits[row, -1], params, generators[row])
        next_tokens = broadcast_from_last_stage(next_tokens)
        for row, token in enumerate(next_tokens.tolist()):
            if not done[row]:
                generated[row].append(token)
                done[row] = token in stop_ids
        if all(done):
            break
        tokens = torch.cat([tokens, next_tokens.view(-1, 1)], dim=1)
        step_input = next_tokens.view(-1, 1) if context is not None else tokens
    return generated
