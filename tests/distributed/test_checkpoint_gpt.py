"""Checkpoints with the real GPTModel, DistributedDataParallel, MegatronOptimizer and LR scheduler:

1. TP2 x DP2 with the distributed optimizer -> TP1 x DP4 (plain optimizer) and TP4 x DP1 (distributed):
   every parameter and optimizer state equals, exactly, the saved one rebuilt in the test process;
   across sharding strategies: ZeRO-2 DP4 with half the optimizer offloaded to the host -> ZeRO-1 TP2 x DP2
   and ZeRO-2 TP2 x DP2 fully offloaded -> no sharding on one process, optimizer state included; ZeRO-3 DP4
   -> ZeRO-1 TP2 x DP2 (a step) -> no sharding on one process, and back into ZeRO-3 DP4 (ZeRO-3 saves and
   loads its own slices: no tensor collective, no parameter gathered);
2. one process, fp32 with dropout: save, continue, reload, continue -> bitwise identical (RNG included);
   and the TP2 x DP2 distributed-optimizer checkpoint loads into TP1 x DP1 with the plain optimizer;
3. bf16 with --no-load-optim: the fp32 main weights follow the loaded bf16 weights.
"""
import torch

import checkpoint_toys as toys

from megatron_lite import collectives, parallel_state as ps
from megatron_lite.checkpointing import load_checkpoint, save_checkpoint
from megatron_lite.config import Config
from megatron_lite.distributed import DistributedDataParallel, finalize_model_grads
from megatron_lite.models.gpt import GPTModel
from megatron_lite.optimizer import get_megatron_optimizer
from megatron_lite.tensor_parallel.random import model_parallel_seed
from megatron_lite.tensor_parallel.shard_spec import shard_spec_of
from megatron_lite.testing import run_distributed
from megatron_lite.training import build_lr_scheduler

SEQ, VOCAB, GLOBAL_BATCH = 8, 50, 4


def _config(world: int, tp: int, dist_opt: bool, dropout: float = 0.0, bf16: bool = False, strategy: str | None = None,
            offload: float | None = None, **checkpoint) -> Config:
    cfg = Config(world_size=world)
    m = cfg.model
    m.num_layers, m.hidden_size, m.num_attention_heads, m.seq_length = 2, 16, 4, SEQ
    m.vocab_size, m.make_vocab_size_divisible_by, m.swiglu, m.ffn_hidden_size = VOCAB, 4, True, 32
    m.hidden_dropout = m.attention_dropout = dropout
    cfg.parallel.tensor_model_parallel_size, cfg.parallel.use_distributed_optimizer = tp, dist_opt
    cfg.parallel.ddp_bucket_size = 500  # several buckets; params straddle DP shard boundaries
    cfg.training.micro_batch_size = GLOBAL_BATCH // (world // tp)
    cfg.training.global_batch_size, cfg.training.train_iters = GLOBAL_BATCH, 10
    cfg.optimizer.lr, cfg.optimizer.lr_warmup_iters, cfg.optimizer.bf16 = 1e-2, 2, bf16
    cfg.parallel.data_parallel_sharding_strategy = strategy
    if offload is not None:
        cfg.optimizer.optimizer_cpu_offload, cfg.optimizer.optimizer_offload_fraction = True, offload
    for key, value in checkpoint.items():
        setattr(cfg.checkpoint, key, value)
    return cfg.validate()


def _setup(cfg: Config):
    p = cfg.parallel
    ps.initialize_model_parallel(p.tensor_model_parallel_size, 1)
    groups = ps.get_process_groups()
    model_parallel_seed(cfg.training.seed, groups.tp.rank)
    ddp = DistributedDataParallel(cfg, GPTModel(cfg, groups=groups), groups=groups)
    optimizer = get_megatron_optimizer(cfg, [ddp], groups)
    return ddp, optimizer, build_lr_scheduler(cfg, optimizer)


def _train_step(ddp, optimizer, scheduler, step: int) -> None:
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    tokens = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ + 1), generator=torch.Generator().manual_seed(step))
    local = tokens.chunk(dp)[dp_rank]
    positions = torch.arange(SEQ).expand(local.shape[0], SEQ)
    optimizer.zero_grad()
    loss = ddp(local[:, :-1], positions, None, local[:, 1:]).mean()
    optimizer.scale_loss(loss).backward()
    finalize_model_grads([ddp], ps.get_process_groups())
    optimizer.step()
    ddp.finish_param_sync()
    scheduler.step(GLOBAL_BATCH)


def _state(ddp, optimizer, scheduler) -> dict:
    return {"tp_rank": ps.get_tensor_model_parallel_rank(), "tp": ps.get_tensor_model_parallel_world_size(),
            "model": {n: p.detach().clone() for n, p in ddp.sharded_state().items()},
            "meta": {n: (shard_spec_of(p), tuple(p.shape)) for n, p in ddp.sharded_state().items()},
            "optim": optimizer.get_parameter_state(), "common": optimizer.state_dict(),
            "sched": scheduler.state_dict()}


def _four_ranks(directory: str) -> dict:
    cfg = _config(4, 2, True, save=directory)
    ddp, optimizer, scheduler = _setup(cfg)
    for step in range(2):
        _train_step(ddp, optimizer, scheduler, step)
    save_checkpoint(2, [ddp], optimizer, scheduler, 2 * GLOBAL_BATCH, cfg)
    out = {"saved": _state(ddp, optimizer, scheduler)}
    ps.destroy_model_parallel()
    for key, (tp, dist_opt) in {"tp1_dp4": (1, False), "tp4_dp1_distopt": (4, True)}.items():
        cfg = _config(4, tp, dist_opt, load=directory)
        ddp, optimizer, scheduler = _setup(cfg)
        out[key + "_result"] = load_checkpoint([ddp], optimizer, scheduler, cfg)
        out[key] = _state(ddp, optimizer, scheduler)
        ps.destroy_model_parallel()
    return out


def _one_rank(directory: str, resume_dir: str) -> dict:
    out = {}
    cfg = _config(1, 1, False, load=directory)  # the TP2 x DP2 distributed-optimizer checkpoint
    ddp, optimizer, scheduler = _setup(cfg)
    out["tp1_dp1_result"] = load_checkpoint([ddp], optimizer, scheduler, cfg)
    out["tp1_dp1"] = _state(ddp, optimizer, scheduler)
    ps.destroy_model_parallel()

    # fp32 resume with dropout: bitwise.
    cfg = _config(1, 1, False, dropout=0.1, save=resume_dir, load=resume_dir)
    ddp, optimizer, scheduler = _setup(cfg)
    for step in range(2):
        _train_step(ddp, optimizer, scheduler, step)
    save_checkpoint(2, [ddp], optimizer, scheduler, 8, cfg)
    for step in range(2, 4):
        _train_step(ddp, optimizer, scheduler, step)
    out["reference"] = _state(ddp, optimizer, scheduler)
    ps.destroy_model_parallel()
    ddp, optimizer, scheduler = _setup(cfg)
    torch.manual_seed(4321)
    out["resume_result"] = load_checkpoint([ddp], optimizer, scheduler, cfg)
    for step in range(2, 4):
        _train_step(ddp, optimizer, scheduler, step)
    out["resumed"] = _state(ddp, optimizer, scheduler)
    ps.destroy_model_parallel()

    # bf16, --no-load-optim: main params are refreshed from the loaded weights.
    cfg = _config(1, 1, False, bf16=True, load=resume_dir, no_load_optim=True)
    ddp, optimizer, scheduler = _setup(cfg)
    out["bf16_result"] = load_checkpoint([ddp], optimizer, scheduler, cfg)
    states = optimizer.get_parameter_state()
    out["bf16_main_follows"] = all(torch.equal(states[n]["param"], p.detach().float()) for n, p in ddp.sharded_state().items())
    out["bf16_steps"] = optimizer.num_steps
    ps.destroy_model_parallel()
    return out


def _check_against_full(state: dict, full: dict, full_optim: dict, saved: dict) -> None:
    assert set(state["model"]) == set(full)
    for name, tensor in state["model"].items():
        meta = state["meta"][name]
        assert torch.equal(tensor, toys.expected_shard(full[name], meta, state["tp_rank"], state["tp"])), name
        for key, value in state["optim"][name].items():
            assert torch.equal(value, toys.expected_shard(full_optim[name][key], meta, state["tp_rank"], state["tp"])), \
                (name, key)
    assert state["common"]["num_steps"] == saved["common"]["num_steps"] == 2
    assert state["sched"] == saved["sched"]


def test_gpt_distributed_optimizer_reshard_and_fp32_resume(tmp_path):
    directory, resume_dir = str(tmp_path / "tp2dp2"), str(tmp_path / "resume")
    results = run_distributed(_four_ranks, 4, directory=directory)
    saved = [out["saved"] for out in results]
    shards: dict = {}
    for state in saved[:2]:  # DP rank 0's TP group holds every TP shard
        for name, tensor in state["model"].items():
            shards.setdefault(name, {})[state["tp_rank"]] = (tensor, state["optim"][name], state["meta"][name])
    # Expected values by checkpoint_toys' index rule, not the loader's own shard_of_full/full_from_shards.
    full = {n: toys.expected_full([s[t][0] for t in sorted(s)], s[0][2]) for n, s in shards.items()}
    full_optim = {n: {k: toys.expected_full([s[t][1][k] for t in sorted(s)], s[0][2]) for k in s[0][1]}
                  for n, s in shards.items()}
    for state in saved[2:]:  # DP replicas agree (the distributed optimizer's state is gathered)
        for name, tensor in state["model"].items():
            assert torch.equal(tensor, shards[name][state["tp_rank"]][0]), name
    for out in results:
        for layout in ("tp1_dp4", "tp4_dp1_distopt"):
            assert out[layout + "_result"] == (2, 2 * GLOBAL_BATCH)
            _check_against_full(out[layout], full, full_optim, saved[0])

    (one,) = run_distributed(_one_rank, 1, directory=directory, resume_dir=resume_dir)
    assert one["tp1_dp1_result"] == (2, 2 * GLOBAL_BATCH)
    _check_against_full(one["tp1_dp1"], full, full_optim, saved[0])
    assert one["resume_result"] == (2, 8)
    toys.assert_same_states(one["reference"], one["resumed"])
    assert one["bf16_result"] == (2, 8) and one["bf16_main_follows"] and one["bf16_steps"] == 0


def _strategies_four_ranks(directory: str) -> dict:
    cfg = _config(4, 1, True, strategy="optim_grads", offload=0.5, save=directory)
    ddp, optimizer, scheduler = _setup(cfg)
    for step in range(2):
        _train_step(ddp, optimizer, scheduler, step)
    save_checkpoint(2, [ddp], optimizer, scheduler, 2 * GLOBAL_BATCH, cfg)
    out = {"saved": _state(ddp, optimizer, scheduler)}
    ps.destroy_model_parallel()
    for key, kwargs in {"zero1_tp2_dp2": {"strategy": "optim"},
                        "zero2_offload_tp2_dp2": {"strategy": "optim_grads", "offload": 1.0}}.items():
        cfg = _config(4, 2, True, load=directory, **kwargs)
        ddp, optimizer, scheduler = _setup(cfg)
        out[key + "_result"] = load_checkpoint([ddp], optimizer, scheduler, cfg)
        out[key] = _state(ddp, optimizer, scheduler)
        _train_step(ddp, optimizer, scheduler, 2)  # and it trains on from there
        ps.destroy_model_parallel()
    return out


def _strategies_one_rank(directory: str) -> dict:
    cfg = _config(1, 1, False, load=directory, strategy="no_shard")
    ddp, optimizer, scheduler = _setup(cfg)
    return {"result": load_checkpoint([ddp], optimizer, scheduler, cfg), "state": _state(ddp, optimizer, scheduler)}


def test_checkpoint_reshards_across_sharding_strategies_and_offload(tmp_path):
    directory = str(tmp_path / "zero2_dp4")
    results = run_distributed(_strategies_four_ranks, 4, directory=directory)
    saved = results[0]["saved"]  # TP1: each DP rank's gathered state is the full state
    meta = saved["meta"]
    full, full_optim = saved["model"], saved["optim"]
    for out in results:
        assert torch.equal(out["saved"]["model"]["embedding.word_embeddings.weight"], full["embedding.word_embeddings.weight"])
        for layout in ("zero1_tp2_dp2", "zero2_offload_tp2_dp2"):
            assert out[layout + "_result"] == (2, 2 * GLOBAL_BATCH)
            _check_against_full(out[layout], full, full_optim, saved)
    (one,) = run_distributed(_strategies_one_rank, 1, directory=directory)
    assert one["result"] == (2, 2 * GLOBAL_BATCH) and set(one["state"]["meta"]) == set(meta)
    _check_against_full(one["state"], full, full_optim, saved)


def _zero3_gathers(ddp) -> tuple:
    """(tensor collectives run since the last reset, whether any parameter holds full storage): ZeRO-3 saves
    and loads its own slices of the shards, so both must be empty / False."""
    ops = {op for _, op in collectives.comm_stats()} - {"all_gather_object", "broadcast_object", "barrier"}
    return ops, any(p.untyped_storage().nbytes() > 0 for p in ddp.module.parameters())


def _zero3_chain_four_ranks(first: str, second: str) -> dict:
    """ZeRO-3 DP4 trains and saves; ZeRO-1 TP2 x DP2 resumes from it, trains a step and saves again."""
    cfg = _config(4, 1, True, strategy="optim_grads_params", save=first)
    ddp, optimizer, scheduler = _setup(cfg)
    for step in range(2):
        _train_step(ddp, optimizer, scheduler, step)
    collectives.reset_comm_stats()
    save_checkpoint(2, [ddp], optimizer, scheduler, 2 * GLOBAL_BATCH, cfg)
    out = {"save_gathers": _zero3_gathers(ddp), "saved": _state(ddp, optimizer, scheduler)}
    ps.destroy_model_parallel()
    cfg = _config(4, 2, True, strategy="optim", load=first, save=second)
    ddp, optimizer, scheduler = _setup(cfg)
    out["zero1_result"] = load_checkpoint([ddp], optimizer, scheduler, cfg)
    out["zero1"] = _state(ddp, optimizer, scheduler)
    _train_step(ddp, optimizer, scheduler, 2)
    save_checkpoint(3, [ddp], optimizer, scheduler, 3 * GLOBAL_BATCH, cfg)
    out["zero1_trained"] = _state(ddp, optimizer, scheduler)
    ps.destroy_model_parallel()
    cfg = _config(4, 1, True, strategy="optim_grads_params", load=second)  # and back into ZeRO-3's shards
    ddp, optimizer, scheduler = _setup(cfg)
    collectives.reset_comm_stats()
    out["zero3_result"] = load_checkpoint([ddp], optimizer, scheduler, cfg)
    out["load_gathers"] = _zero3_gathers(ddp)
    out["zero3_resumed"] = _state(ddp, optimizer, scheduler)
    _train_step(ddp, optimizer, scheduler, 3)
    out["zero3_trains_on"] = bool(torch.isfinite(torch.cat([p.reshape(-1) for p in ddp.sharded_state().values()])).all())
    ps.destroy_model_parallel()
    return out


def test_checkpoint_zero3_dp4_to_zero1_tp2_dp2_to_no_shard(tmp_path):
    """ZeRO-3 DP4 -> ZeRO-1 TP2 x DP2 -> no sharding on one process, optimizer state included, exactly:
    each hop loads what the previous one held (parameters, fp32 main params, Adam moments, step counts)."""
    first, second = str(tmp_path / "zero3_dp4"), str(tmp_path / "zero1_tp2_dp2")
    results = run_distributed(_zero3_chain_four_ranks, 4, first=first, second=second)
    saved = results[0]["saved"]  # TP1: every rank's gathered state is the full state
    for out in results:
        assert out["save_gathers"] == out["load_gathers"] == (set(), False), (out["save_gathers"], out["load_gathers"])
        assert out["zero1_result"] == (2, 2 * GLOBAL_BATCH)
        _check_against_full(out["zero1"], saved["model"], saved["optim"], saved)
    (one,) = run_distributed(_strategies_one_rank, 1, directory=second)
    assert one["result"] == (3, 3 * GLOBAL_BATCH)
    full = one["state"]
    for out in results:  # every TP2 x DP2 rank's state is its TP shard of what the one process loaded
        state = out["zero1_trained"]
        for name, tensor in state["model"].items():
            meta = state["meta"][name]
            assert torch.equal(tensor, toys.expected_shard(full["model"][name], meta, state["tp_rank"], state["tp"])), name
            for key, value in state["optim"][name].items():
                expected = toys.expected_shard(full["optim"][name][key], meta, state["tp_rank"], state["tp"])
                assert torch.equal(value, expected), (name, key)
        assert full["common"]["num_steps"] == state["common"]["num_steps"] == 3 and full["sched"] == state["sched"]
        assert out["zero3_result"] == (3, 3 * GLOBAL_BATCH) and out["zero3_trains_on"]
        resumed = out["zero3_resumed"]  # ZeRO-3 (TP1) loading the ZeRO-1 TP2 checkpoint holds the full state
        for name, tensor in resumed["model"].items():
            assert torch.equal(tensor, full["model"][name]), name
            for key, value in resumed["optim"][name].items():
                assert torch.equal(value, full["optim"][name][key]), (name, key)


def _zero3_bf16_round_trip(directory: str) -> dict:
    cfg = _config(2, 1, True, bf16=True, strategy="optim_grads_params", save=directory, load=directory)
    ddp, optimizer, scheduler = _setup(cfg)
    for step in range(2):
        _train_step(ddp, optimizer, scheduler, step)
    save_checkpoint(2, [ddp], optimizer, scheduler, 2 * GLOBAL_BATCH, cfg)
    saved = _state(ddp, optimizer, scheduler)
    ps.destroy_model_parallel()
    ddp, optimizer, scheduler = _setup(cfg)
    result = load_checkpoint([ddp], optimizer, scheduler, cfg)
    return {"saved": saved, "loaded": _state(ddp, optimizer, scheduler), "result": result}


def test_checkpoint_zero3_bf16_resume_is_exact(tmp_path):
    """bf16 under ZeRO-3: the loaded bf16 weights land in the shards and the fp32 main params and moments
    in the optimizer's slices, bit for bit what was saved."""
    for out in run_distributed(_zero3_bf16_round_trip, 2, directory=str(tmp_path / "zero3_bf16")):
        assert out["result"] == (2, 2 * GLOBAL_BATCH)
        toys.assert_same_states(out["saved"], out["loaded"])
