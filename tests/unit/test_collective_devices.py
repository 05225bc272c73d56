"""Every collective call site hands its backend tensors on the device that backend needs.

NCCL (the default on GPUs) communicates CUDA tensors only; a CPU scalar created for an all-reduce works
under gloo and fails under NCCL, so CPU CI cannot see the bug. Here a recording backend replaces
torch.distributed inside collectives.py and pretends every group is NCCL, with the meta device standing
in for CUDA (it exists on every machine and is distinct from the CPU). Model data lives on the meta device
too, as it would live on the GPU. Each call site in megatron_lite/ and pretrain_gpt.py is then run, and the
recorder asserts every tensor it receives is on the NCCL device: a tensor created on the CPU by a call
site fails the test. A static scan lists the call sites, so a new one without coverage here fails as well.
Object collectives (all_gather_object, broadcast_object) and barriers carry no tensor of the caller's
and are not listed.
"""
from __future__ import annotations

import ast
import inspect
import os
import types
import pytest
import torch

from megatron_lite import collectives
from megatron_lite.process_groups import Group, ProcessGroups

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TENSOR_OPS = {"all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter", "reduce_scatter_tensor",
              "all_to_all_single", "broadcast", "send", "recv", "batch_isend_irecv", "all_reduce_scalar",
              "all_reduce_scalars", "any_rank", "broadcast_scalar"}
DEVICE = torch.device("meta")  # stands in for CUDA


class _CallSites(ast.NodeVisitor):
    """(file, innermost enclosing function) of every collectives.<tensor op>(...) call."""

    def __init__(self, rel: str):
        self.rel, self.stack, self.sites = rel, [], set()

    def visit_FunctionDef(self, node) -> None:
        self.stack.append(node.name)
        self.generic_visit(node)
        self.stack.pop()

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        if (isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and func.value.id == "collectives"
                and func.attr in TENSOR_OPS and self.stack):
            self.sites.add((self.rel, self.stack[-1]))
        self.generic_visit(node)


def static_call_sites() -> set[tuple[str, str]]:
    paths = [os.path.join(dp, f) for dp, _, files in os.walk(os.path.join(ROOT, "megatron_lite")) for f in files
             if f.endswith(".py")] + [os.path.join(ROOT, "pretrain_gpt.py")]
    sites: set[tuple[str, str]] = set()
    for path in paths:
        rel = os.path.relpath(path, ROOT)
        if rel == os.path.join("megatron_lite", "collectives.py"):
            continue
        visitor = _CallSites(rel)
        visitor.visit(ast.parse(open(path).read()))
        sites |= visitor.sites
    return sites


class _Work:
    def wait(self) -> None:
        pass

    def is_completed(self) -> bool:
        return True


class RecordingBackend:
    """Stands in for torch.distributed inside collectives.py: every group is 'nccl', nothing is sent."""

    ReduceOp = torch.distributed.ReduceOp
    GroupMember = torch.distributed.GroupMember

    def __init__(self):
        self.calls: list[tuple[str, str, str]] = []  # (op, device type, call site)
        self.sites: set[tuple[str, str]] = set()

    # ---- what collectives asks about groups ----
    def is_available(self) -> bool:
        return True

    def is_initialized(self) -> bool:
        return True

    def get_backend(self, group=None) -> str:
        return "nccl"

    def get_world_size(self, group=None) -> int:
        return 2

    def get_rank(self, group=None) -> int:
        return 0

    def get_process_group_ranks(self, group) -> list:
        return [0, 1]

    # ---- ops ----
    def _record(self, op: str, *tensors: torch.Tensor):
        site = _call_site()
        self.sites.add(site)
        for tensor in tensors:
            self.calls.append((op, tensor.device.type, f"{site[0]}:{site[1]}"))
            assert tensor.device.type == DEVICE.type, (
                f"{site[0]}:{site[1]} passed a {tensor.device.type} tensor to {op}; NCCL needs {DEVICE.type} (CUDA)")
        return _Work()

    def all_reduce(self, tensor, op=None, group=None, async_op=False):
        return self._record("all_reduce", tensor)

    def broadcast(self, tensor, src=0, group=None, async_op=False):
        return self._record("broadcast", tensor)

    def all_gather_single(self, output, tensor, group=None, async_op=False):
        return self._record("all_gather", output, tensor)

    def reduce_scatter_single(self, output, tensor, op=None, group=None, async_op=False):
        return self._record("reduce_scatter", output, tensor)

    def all_to_all_single(self, output, tensor, group=None, async_op=False, **split_sizes):
        return self._record("all_to_all", output, tensor)

    def send(self, tensor, dst=0, group=None):
        self._record("send", tensor)

    def recv(self, tensor, src=0, group=None):
        self._record("recv", tensor)

    class P2POp:
        def __init__(self, op, tensor, peer, group=None):
            self.op, self.tensor, self.peer, self.group = op, tensor, peer, group

    def isend(self, tensor, dst, group=None):
        return self._record("isend", tensor)

    irecv = isend

    def batch_isend_irecv(self, ops):
        return [self._record("batch_isend_irecv", op.tensor) for op in ops]


def _call_site() -> tuple[str, str]:
    """The first frame outside collectives.py, this file and torch: the call site."""
    for frame in inspect.stack()[2:]:
        path = os.path.abspath(frame.filename)
        if path.endswith(os.path.join("megatron_lite", "collectives.py")) or path == os.path.abspath(__file__):
            continue
        if os.sep + "torch" + os.sep in path:
            continue
        return os.path.relpath(path, ROOT), frame.function
    return "?", "?"


@pytest.fixture
def recorder(monkeypatch):
    backend = RecordingBackend()
    monkeypatch.setattr(collectives, "dist", backend)
    monkeypatch.setattr(collectives, "_all_gather_single", backend.all_gather_single)
    monkeypatch.setattr(collectives, "_reduce_scatter_single", backend.reduce_scatter_single)
    monkeypatch.setitem(collectives.BACKEND_DEVICE, "nccl", lambda: DEVICE)
    monkeypatch.setattr(collectives, "_BACKENDS", {})
    # Meta tensors hold no values: reading one back yields zeros (the test is about devices, not values).
    monkeypatch.setattr(collectives, "to_host", lambda tensor: [0.0] * tensor.numel())
    return backend


def _groups(pp_rank: int = 0) -> ProcessGroups:
    """Two members in every group, this process at `pp_rank` of the pipeline."""
    def group(name: str, rank: int = 0) -> Group:
        return Group(name, (0, 1), rank, handle=object())
    fields = {name: group(name) for name in ("tp", "dp", "dp_cp", "cp", "mp", "tp_cp", "tp_dp", "tp_dp_cp", "ep",
                                              "expert_dp", "tp_ep", "etp", "tp_ep_pp")}
    return ProcessGroups(world=Group("world", (0, 1), 0, None), pp=group("pp", pp_rank), embd=group("embd"), **fields)


def _config(**parallel):
    from megatron_lite.config import Config
    cfg = Config(world_size=8)
    m = cfg.model
    m.num_layers, m.hidden_size, m.num_attention_heads, m.seq_length, m.vocab_size = 2, 16, 4, 8, 64
    m.make_vocab_size_divisible_by = 1
    p = cfg.parallel
    p.tensor_model_parallel_size = p.pipeline_model_parallel_size = 2
    for key, value in parallel.items():
        setattr(p, key, value)
    cfg.training.micro_batch_size, cfg.training.global_batch_size = 1, 4
    return cfg.validate()


def _meta(*shape, grad: bool = False) -> torch.Tensor:
    return torch.zeros(*shape, device=DEVICE, requires_grad=grad)


def test_every_call_site_sends_tensors_on_the_backend_device(recorder):
    groups = _groups()
    _tensor_parallel_sites(groups)
    _gradient_sites(groups)
    _optimizer_and_ddp_sites(groups)
    _pipeline_and_inference_sites(groups)
    _training_sites(groups)
    _context_parallel_sites(groups)
    _moe_sites(groups)
    _planner_sites(groups)
    assert recorder.calls and all(device == DEVICE.type for _, device, _ in recorder.calls)
    missing = static_call_sites() - recorder.sites
    assert not missing, f"collective call sites not exercised by this test: {sorted(missing)}"


def _tensor_parallel_sites(groups: ProcessGroups) -> None:
    from megatron_lite.kernels.linear_cross_entropy import linear_cross_entropy
    from megatron_lite.tensor_parallel import mappings
    from megatron_lite.tensor_parallel.cross_entropy import vocab_parallel_cross_entropy
    from megatron_lite.tensor_parallel.utils import gather_full_param
    from megatron_lite.tensor_parallel.shard_spec import ShardSpec, set_shard_spec
    tp = groups.tp
    x = _meta(4, 2, 8, grad=True)
    y = mappings.copy_to_tensor_model_parallel_region(x, tp)        # backward: all-reduce
    y = mappings.gather_from_tensor_model_parallel_region(y, tp)    # all-gather
    y = mappings.reduce_from_tensor_model_parallel_region(y, tp)    # all-reduce
    y = mappings.reduce_scatter_to_sequence_parallel_region(y, tp)  # reduce-scatter
    y.sum().backward()
    logits, target = _meta(4, 2, 16), torch.zeros(4, 2, dtype=torch.long, device=DEVICE)
    vocab_parallel_cross_entropy(logits, target, tp)
    with torch.no_grad():
        linear_cross_entropy(_meta(8, 16), _meta(32, 16), torch.zeros(8, dtype=torch.long, device=DEVICE),
                             vocab_start=0, vocab_size=64, tp_group=tp)
    param = torch.nn.Parameter(_meta(4, 3))
    set_shard_spec(param, ShardSpec(partition_dim=0))
    gather_full_param(param, group=tp)


def _gradient_sites(groups: ProcessGroups) -> None:
    from megatron_lite.pipeline.embedding import allreduce_embedding_grads
    from megatron_lite.tensor_parallel.layers import allreduce_sequence_parallel_grads
    module = torch.nn.Linear(4, 4, device=DEVICE)
    for param in module.parameters():
        param.sequence_parallel, param.grad = True, torch.zeros_like(param)
    allreduce_sequence_parallel_grads([module], groups.tp)
    module.weight.shared_embedding = True
    allreduce_embedding_grads([module], groups)


def _optimizer_and_ddp_sites(groups: ProcessGroups) -> None:
    from megatron_lite.distributed.ddp import DistributedDataParallel
    from megatron_lite.optimizer.clip_grads import (NonFiniteStepError, any_nonfinite, check_finite_step,
                                                    count_zeros_fp32, get_grad_norm_fp32)
    from megatron_lite.optimizer.distrib_optimizer import gather_parameter_state, shard_slices
    grads = [_meta(3, 2), _meta(5)]
    get_grad_norm_fp32(grads, [groups.mp, groups.world])
    get_grad_norm_fp32([], [groups.mp])  # a rank without gradients
    count_zeros_fp32(grads, [groups.mp])
    any_nonfinite(grads, [groups.world])
    with pytest.raises(NonFiniteStepError):  # meta tensors read back as zeros, i.e. "rank 0 saw a NaN"
        check_finite_step(False, 1.0, groups.world)  # the NaN/Inf check's agreement
    for strategy in ("no_shard", "optim", "optim_grads", "optim_grads_params"):
        distributed = strategy != "no_shard"
        cfg = _config(use_distributed_optimizer=distributed, data_parallel_sharding_strategy=strategy, ddp_bucket_size=10)
        cfg.world_size = 4 * 2  # DP x CP = 2 with TP = PP = 2
        ddp = DistributedDataParallel(cfg, torch.nn.Linear(4, 4, device=DEVICE), groups=groups)
        ddp.finish_grad_sync()  # all-reduce, or reduce-scatter (ZeRO-2: into the separate shard, bucket freed)
        if strategy == "optim_grads":
            assert all(b.grad_data is None for buffer in ddp.param_and_grad_buffers for b in buffer.buckets)
        if strategy == "optim_grads_params":
            ddp.sharded_state()  # ZeRO-3 gathers every unit (its all-gather of the shards)
            ddp.finish_param_sync()
        if distributed:
            ddp.start_param_sync()
            owned = [(param, start, end, lambda key, n=end - start: _meta(n)) for param, start, end in shard_slices(ddp)]
            gather_parameter_state([ddp], owned, ("param",))


def _pipeline_and_inference_sites(groups: ProcessGroups) -> None:
    from megatron_lite import inference
    from megatron_lite.pipeline import p2p
    shape = (8, 1, 16)
    p2p.communicate(send_next=_meta(*shape), recv_prev=True, shape=shape, dtype=torch.float32, device=DEVICE,
                    groups=groups)
    inference.broadcast_from_last_stage(_meta(1), groups)
    config = types.SimpleNamespace(model=types.SimpleNamespace(hidden_size=16, vocab_size=64), params_dtype=torch.float32)
    for pp_rank in (0, 1):  # first stage sends, last stage receives and gathers the logits over TP
        inference.pipeline_forward(_StubStage(config), torch.zeros(1, 8, dtype=torch.long, device=DEVICE),
                                   torch.zeros(1, 8, dtype=torch.long, device=DEVICE), groups=_groups(pp_rank))


class _StubStage:
    """A model chunk that returns meta activations (first stage) or logits (last stage)."""

    def __init__(self, config):
        self.config = config

    def set_input_tensor(self, tensor) -> None:
        pass

    def __call__(self, tokens, position_ids, attention_mask, labels=None, **kwargs):
        if tokens is not None:
            return _meta(8, 1, 16)
        return _meta(1, 8, 32)


def _planner_sites(groups: ProcessGroups) -> None:
    """The planner's calibration: a timed all-reduce and a timed p2p exchange each way."""
    from megatron_lite.planner.calibrate import time_all_reduce, time_exchange
    time_all_reduce(_meta(16), groups.tp, repeats=1)
    time_exchange(_meta(16), True, 1, repeats=1)
    time_exchange(_meta(16), False, 1, repeats=1)


def _context_parallel_sites(groups: ProcessGroups) -> None:
    """Ring (async p2p both ways), all-gather (gather + reduce-scatter), Ulysses (all-to-all both ways)
    attention, forward and backward, and the CP loss's all-reduce."""
    from megatron_lite.context_parallel import cp_masked_mean
    from megatron_lite.context_parallel.attention import all_gather_attention, ulysses_attention
    from megatron_lite.context_parallel.ring import ring_attention
    from megatron_lite.kernels.attention import attention
    cp = groups.cp
    q, k, v = _meta(1, 2, 8, 4, grad=True), _meta(1, 2, 8, 4, grad=True), _meta(1, 2, 8, 4, grad=True)
    out = ring_attention(q, k, v, None, cp) + all_gather_attention(q, k, v, None, cp, attention)
    out = out + ulysses_attention(q, k, v, None, cp, attention)
    out.sum().backward()
    loss, _ = cp_masked_mean(_meta(2, 8, grad=True), _meta(2, 8), cp)
    loss.backward()


def _async_save_site(groups: ProcessGroups) -> None:
    """finalize_pending_save's non-blocking check (one any_rank while an --async-save is in flight); its
    object collectives are stood in for (the recorder handles tensor collectives only)."""
    from megatron_lite import checkpointing
    from megatron_lite.checkpoint_writer import CheckpointSaveError, SaveJob
    job = SaveJob(5, 0, "/nonexistent/iter_0000005.tmp", {}, None, error="rank 0: OSError: simulated")
    checkpointing._PENDING = checkpointing._PendingSave(job, "/nonexistent", {}, groups)
    originals = collectives.all_gather_object, collectives.broadcast_object
    try:
        collectives.all_gather_object = lambda obj, group=None: [obj]
        collectives.broadcast_object = lambda obj, src, group=None: obj
        with pytest.raises(CheckpointSaveError, match="saving iteration 5"):
            checkpointing.finalize_pending_save(groups, blocking=False)
    finally:
        collectives.all_gather_object, collectives.broadcast_object = originals
        checkpointing._PENDING = None


def _training_sites(groups: ProcessGroups) -> None:
    import pretrain_gpt
    from megatron_lite import training
    from megatron_lite import selfcheck
    training._SignalFlag(False).any_rank(groups)
    training._average_losses([{"lm loss": 1.0}], groups.replace(pp=Group("pp", (0, 1), 1, object())))
    selfcheck.group_problem("tp", [0, 1], groups.tp, rank=0)
    cfg = _config()
    cfg.training.exit_duration_in_mins = 1e9
    run = types.SimpleNamespace(config=cfg, groups=groups, state=training.TrainState(), start_time=0.0,
                                signals=training._SignalFlag(False), save=lambda reason: None,
                                forward_step_func=None, model=[], batches=types.SimpleNamespace(num_microbatches=1),
                                logger=None, summary={})
    training._Run.any(run, [None])
    training._Run.should_exit(run)
    original = training.evaluate
    try:
        training.evaluate = lambda *args, **kwargs: None
        training._Run.run_eval(run, "valid", [None])
    finally:
        training.evaluate = original
    _async_save_site(groups)
    batch = {key: torch.zeros(1, 8, dtype=torch.long) for key in ("tokens", "labels", "position_ids")}
    batch["loss_mask"] = torch.ones(1, 8)
    original_groups = pretrain_gpt._groups
    try:
        pretrain_gpt._groups = lambda: groups
        pretrain_gpt.get_batch(cfg, iter([batch]))
    finally:
        pretrain_gpt._groups = original_groups


def test_a_cpu_scalar_under_nccl_is_refused_with_a_clear_message(recorder, monkeypatch):
    """Production keeps the check too: a CPU tensor on an NCCL group fails before reaching NCCL."""
    monkeypatch.setattr(collectives, "dist", recorder)
    group = _groups().tp
    with pytest.raises(collectives.CollectiveDeviceError, match="all_reduce on group 'tp'.*nccl.*device_for"):
        collectives.all_reduce(torch.zeros(1), group)


def _moe_sites(groups: ProcessGroups) -> None:
    """The dispatchers' count and routing-map gathers and their all-to-all (forward and backward), the router's
    token-count sums, and the metrics' all-reduce."""
    from megatron_lite.models.moe import dispatcher, metrics, router
    dispatcher.gather_counts(torch.zeros(4, dtype=torch.int64, device=DEVICE), groups.tp_ep)
    dispatcher.gather_routing_map(torch.zeros(3, 4, dtype=torch.bool, device=DEVICE), groups.tp_ep)
    dispatcher.all_to_all(_meta(3, 8, grad=True), groups.tp_ep, [2, 1], [1, 2]).sum().backward()
    router._summed(_meta(4), groups.tp_cp)
    config = types.SimpleNamespace(moe=types.SimpleNamespace(is_moe=True, num_experts=4), model=types.SimpleNamespace(num_layers=2))
    assert metrics.collect([], config, groups) == {}  # nothing recorded (meta values read back as zeros)
