"""One candidate layout (the planner's unit of search) and how it becomes a Config and pretrain_gpt.py flags.

A `Layout` holds exactly the choices the planner makes; everything else (the model, precision, global
batch) comes from the base Config the user gave. `apply(cfg, layout)` writes a layout into a Config, so
every rule config.validate() owns (divisibility, sequence/context parallel constraints, virtual stages,
the schedule) judges a plan exactly as it judges a user's flags.
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass

RECOMPUTE = ("none", "selective", "full")
STRATEGIES = ("no_shard", "optim", "optim_grads", "optim_grads_params")


@dataclass(frozen=True)
class Layout:
    tp: int = 1
    pp: int = 1
    vp: int = 1                 # virtual stages per pipeline rank (1: no interleaving)
    dp: int = 1
    cp: int = 1
    ep: int = 1
    sp: bool = False
    mbs: int = 1
    recompute: str = "none"
    strategy: str = "no_shard"

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.dp * self.cp

    def as_dict(self) -> dict:
        return asdict(self)


def num_microbatches(cfg, layout: Layout) -> int:
    return cfg.training.global_batch_size // (layout.mbs * layout.dp)


def apply(cfg, layout: Layout, overlap: bool = True):
    """A copy of `cfg` set to `layout` (not validated). `overlap`: the planner's plans overlap the DP
    gradient reduce (and the ZeRO parameter all-gather) with compute when DP > 1, as Megatron's recipes do."""
    out = copy.deepcopy(cfg)
    p, m = out.parallel, out.model
    out.world_size = layout.world
    p.tensor_model_parallel_size, p.pipeline_model_parallel_size = layout.tp, layout.pp
    p.context_parallel_size, p.expert_model_parallel_size = layout.cp, layout.ep
    # the virtual stage count (config derives --num-layers-per-virtual-pipeline-stage and checks it divides)
    p.num_layers_per_virtual_pipeline_stage = None
    p.virtual_pipeline_model_parallel_size = layout.vp if layout.vp > 1 else None
    p.sequence_parallel = layout.sp
    p.data_parallel_sharding_strategy = layout.strategy
    p.use_distributed_optimizer = layout.strategy != "no_shard"
    p.overlap_grad_reduce = overlap and layout.dp * layout.cp > 1
    p.overlap_param_gather = overlap and layout.dp * layout.cp > 1 and layout.strategy != "no_shard"
    out.training.micro_batch_size = layout.mbs
    m.recompute_granularity = None if layout.recompute == "none" else layout.recompute
    if layout.recompute != "full":
        m.recompute_method, m.recompute_num_layers = None, None
    elif m.recompute_method is None:
        m.recompute_method, m.recompute_num_layers = "uniform", 1
    return out


def layout_of(cfg) -> Layout:
    """The layout a (derived) Config describes."""
    p, m = cfg.parallel, cfg.model
    return Layout(tp=p.tensor_model_parallel_size, pp=p.pipeline_model_parallel_size,
                  vp=p.virtual_pipeline_model_parallel_size or 1, dp=cfg.data_parallel_size,
                  cp=p.context_parallel_size, ep=p.expert_model_parallel_size, sp=bool(p.sequence_parallel),
                  mbs=cfg.training.micro_batch_size, recompute=m.recompute_granularity or "none",
                  strategy=p.sharding_strategy)


def flags(cfg, layout: Layout, overlap: bool = True) -> list[str]:
    """The exact pretrain_gpt.py flags that select `layout` (model flags stay the user's)."""
    out = ["--tensor-model-parallel-size", str(layout.tp), "--pipeline-model-parallel-size", str(layout.pp)]
    if layout.vp > 1:
        out += ["--num-layers-per-virtual-pipeline-stage", str(cfg.model.num_layers // (layout.pp * layout.vp))]
    if layout.cp > 1:
        out += ["--context-parallel-size", str(layout.cp)]
    if layout.ep > 1:
        out += ["--expert-model-parallel-size", str(layout.ep)]
    if layout.sp:
        out.append("--sequence-parallel")
    out += ["--micro-batch-size", str(layout.mbs)]
    if layout.recompute != "none":
        out += ["--recompute-granularity", layout.recompute]
        if layout.recompute == "full":
            out += ["--recompute-method", "uniform", "--recompute-num-layers", "1"]
    if layout.strategy != "no_shard":
        out += ["--data-parallel-sharding-strategy", layout.strategy]
    if overlap and layout.dp * layout.cp > 1:
        out.append("--overlap-grad-reduce")
        if layout.strategy != "no_shard":
            out.append("--overlap-param-gather")
    return out


def describe(layout: Layout) -> str:
    parts = [f"TP{layout.tp}", f"PP{layout.pp}"] + ([f"VP{layout.vp}"] if layout.vp > 1 else []) + [f"DP{layout.dp}"]
    parts += [f"CP{layout.cp}"] if layout.cp > 1 else []
    parts += [f"EP{layout.ep}"] if layout.ep > 1 else []
    return " ".join(parts)


def layout_from_plan(plan: dict) -> Layout:
    """The Layout of a plan record (predict.evaluate's keys)."""
    return Layout(plan["tensor_model_parallel_size"], plan["pipeline_model_parallel_size"],
                  plan["virtual_pipeline_model_parallel_size"] or 1, plan["data_parallel_size"],
                  plan["context_parallel_size"], plan["expert_model_parallel_size"], plan["sequence_parallel"],
                  plan["micro_batch_size"], plan["recompute_granularity"], plan["data_parallel_sharding_strategy"])


def prepare(cfg):
    """A copy of the user's Config with the model's derived defaults filled in (ffn size, query groups,
    positions), which every model needs; the layout fields are left to `apply`."""
    m = cfg.model
    if m.ffn_hidden_size and m.num_query_groups and m.max_position_embeddings \
            and (not cfg.moe.is_moe or cfg.moe.moe_ffn_hidden_size):
        return cfg  # already derived
    out = copy.deepcopy(cfg)
    out.model.derive_defaults()
    out.moe.derive_defaults(out)  # the experts' MLP size (default: the dense one)
    return out
