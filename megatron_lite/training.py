"""pretrain(): set-up, the training loop, evaluation, checkpoints, exit conditions and signals.

The step (docs/architecture.md): micro-batches from the data iterator -> the pipeline schedule runs
forward/backward over them -> finalize_model_grads (DP reduction, SP and tied-embedding grads) ->
optimizer (unscale, clip, step, param gather) -> LR schedule -> logging -> eval / checkpoint / exit.
"""
from __future__ import annotations

import math
import os
import signal
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch

from megatron_lite import collectives, fault_injection, parallel_state as ps
from megatron_lite.checkpointing import (finalize_pending_save, load_checkpoint, pending_save_iteration, read_tracker,
                                         save_checkpoint)
from megatron_lite.config import Config, ConfigError
from megatron_lite.data.builder import data_fingerprint
from megatron_lite.distributed.ddp import DistributedDataParallel
from megatron_lite.distributed.finalize_model_grads import finalize_model_grads
from megatron_lite.kernels.registry import select_kernels
from megatron_lite.logging import LossSpikeDetector, MetricsLogger, print_rank_0
from megatron_lite.models.moe import metrics as moe_metrics
from megatron_lite.optimizer import get_megatron_optimizer, memory_report
from megatron_lite.optimizer.clip_grads import NonFiniteStepError
from megatron_lite.optimizer.lr_scheduler import OptimizerParamScheduler
from megatron_lite.pipeline.auto import describe as describe_schedule
from megatron_lite.pipeline.runner import get_forward_backward_func
from megatron_lite.pipeline.layout import is_v_shape
from megatron_lite.pipeline.actions import virtual_stage
from megatron_lite.pipeline.stages import build_model_chunks
from megatron_lite.process_groups import ProcessGroups
from megatron_lite.tensor_parallel.random import model_parallel_seed


# ---- micro-batch accounting (with optional batch-size ramp-up) -----------------------------------
class NumMicroBatchesCalculator:
    """Global batch size and micro-batches per step; with --rampup-batch-size the global batch grows
    from <start> by <increment> evenly over <ramp-up samples> consumed samples (Megatron's rule)."""

    def __init__(self, config: Config):
        t = config.training
        self.micro_times_dp = t.micro_batch_size * config.data_parallel_size
        self.final = t.global_batch_size
        self.rampup = t.rampup_batch_size
        self.current = self.final if self.rampup is None else self.rampup[0]

    def update(self, consumed_samples: int) -> None:
        if self.rampup is None:
            return
        start, increment, rampup_samples = self.rampup
        num_increments = max(1, (self.final - start) // increment)
        per_increment = rampup_samples / num_increments
        steps = int(consumed_samples / per_increment) if per_increment > 0 else num_increments
        self.current = min(start + steps * increment, self.final)
        self.current -= self.current % self.micro_times_dp

    @property
    def global_batch_size(self) -> int:
        return self.current

    @property
    def num_microbatches(self) -> int:
        return self.current // self.micro_times_dp


# ---- signals ------------------------------------------------------------------------------------
class _SignalFlag:
    """Remembers SIGTERM (Slurm pre-emption) so the loop can save and exit at a step boundary."""

    def __init__(self, enabled: bool):
        self.received = False
        if enabled:
            signal.signal(signal.SIGTERM, self._handler)

    def _handler(self, signum, frame) -> None:  # noqa: ARG002
        self.received = True

    def any_rank(self, groups: ProcessGroups) -> bool:
        return collectives.any_rank(self.received, groups.world)


class NonFiniteTrainingError(RuntimeError):
    """The job stopped on a non-finite loss or grad norm (--check-for-nan-in-loss-and-grad, --on-nan exit)."""


# ---- set-up -------------------------------------------------------------------------------------
@dataclass
class TrainState:
    iteration: int = 0
    consumed_train_samples: int = 0
    skipped_iterations: int = 0
    nan_iterations: int = 0


def initialize(config: Config) -> ProcessGroups:
    """torch.distributed, parallel groups and seeds; returns this rank's groups (handed to every component).
    Config has been validated on every rank already."""
    p = config.parallel
    ps.init_distributed(p.distributed_backend, p.distributed_timeout_minutes)
    world = torch.distributed.get_world_size()
    if world != config.world_size:
        raise ConfigError(f"WORLD_SIZE: the config was validated for {config.world_size} ranks but {world} started. "
                          "Launch with torchrun so WORLD_SIZE is set before parsing.")
    ps.initialize_model_parallel(p.tensor_model_parallel_size, p.pipeline_model_parallel_size,
                                 p.virtual_pipeline_model_parallel_size, p.context_parallel_size,
                                 p.expert_model_parallel_size, p.expert_tensor_parallel_size)
    groups = ps.get_process_groups().replace(loss_on_first_stage=is_v_shape(config))  # ZB-V: loss on rank 0
    # Offset by pipeline stage (as Megatron does) so dropout on different stages draws different masks;
    # weights do not depend on it (they are drawn from the seed and each parameter's name).
    model_parallel_seed(config.training.seed + 100 * groups.pp.rank, groups.tp.rank)
    return groups


def setup_model_and_optimizer(config: Config, model_provider: Callable, groups: Optional[ProcessGroups] = None):
    """This rank's model chunks (DDP-wrapped), the optimizer and the LR scheduler. `groups` defaults to
    the groups parallel_state holds (one process when none were initialised)."""
    if groups is None:
        groups = ps.get_process_groups() if ps.model_parallel_is_initialized() else ProcessGroups.single()
    model = build_model(config, model_provider, groups)
    optimizer = get_megatron_optimizer(config, model, groups)
    scheduler = build_lr_scheduler(config, optimizer)
    return model, optimizer, scheduler


def build_model(config: Config, model_provider: Callable, groups: ProcessGroups) -> list[DistributedDataParallel]:
    """This rank's model chunks, DDP-wrapped. The chunks are built on the meta device and DDP draws each
    parameter straight into its final storage (deferred initialisation, distributed/ddp.py): under ZeRO-3
    (--data-parallel-sharding-strategy optim_grads_params) only this rank's shard of each unit, so no rank
    ever holds the full model; otherwise into the DDP buffer, so the model is not held twice while it is
    copied in (8 bytes/param at build for fp32). The values are those of the model built whole (GPTModel
    records how each parameter is drawn). A provider whose model does not record it (no `init_args`) is
    built on the device as before, except under ZeRO-3, which needs it."""
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    with torch.device("meta"):
        chunks = build_model_chunks(config, model_provider, groups)
    deferred = all(hasattr(p, "init_args") for chunk in chunks for p in chunk.parameters())
    if deferred or config.parallel.sharding_strategy == "optim_grads_params":
        return [DistributedDataParallel(config, chunk, groups=groups, init_device=device) for chunk in chunks]
    chunks = build_model_chunks(config, model_provider, groups)
    if torch.cuda.is_available():
        chunks = [chunk.cuda() for chunk in chunks]
    return [DistributedDataParallel(config, chunk, groups=groups) for chunk in chunks]


def build_lr_scheduler(config: Config, optimizer) -> OptimizerParamScheduler:
    """Steps are counted in samples (as in Megatron), so ramp-up and --train-samples work alike."""
    o, t = config.optimizer, config.training
    if t.train_iters is not None:
        decay_steps = (o.lr_decay_iters or t.train_iters) * t.global_batch_size
        warmup_steps = o.lr_warmup_iters * t.global_batch_size
        wsd_steps = (o.lr_wsd_decay_iters or 0) * t.global_batch_size
    else:
        decay_steps = o.lr_decay_samples or t.train_samples
        warmup_steps = o.lr_warmup_samples
        wsd_steps = o.lr_wsd_decay_iters * t.global_batch_size if o.lr_wsd_decay_iters else 0
    if o.lr_warmup_fraction is not None:
        warmup_steps = int(o.lr_warmup_fraction * decay_steps)
    return OptimizerParamScheduler(
        optimizer, init_lr=0.0 if warmup_steps > 0 else o.lr, max_lr=o.lr, min_lr=o.min_lr,
        lr_warmup_steps=warmup_steps, lr_decay_steps=decay_steps, lr_decay_style=o.lr_decay_style,
        wsd_decay_steps=wsd_steps, lr_wsd_decay_style=o.lr_wsd_decay_style,
        start_wd=o.weight_decay, end_wd=o.weight_decay)


def train_iters(config: Config) -> int:
    t = config.training
    if t.train_iters is not None:
        return t.train_iters
    if t.train_samples is not None:
        return math.ceil(t.train_samples / t.global_batch_size)
    return 0


def _chunk_needs_data(chunk_index: int, num_chunks: int, groups: ProcessGroups) -> bool:
    """The chunks holding the first virtual stage (tokens) and the last (labels); with ZB-V both on rank 0."""
    stage = virtual_stage(groups.pp.size, groups.pp.rank, chunk_index, groups.loss_on_first_stage and num_chunks == 2)
    return stage in (0, groups.pp.size * num_chunks - 1)


def build_data_iterators(config: Config, datasets_provider: Callable, consumed_samples: int, num_chunks: int,
                         eval_consumed: int = 0, groups: Optional[ProcessGroups] = None):
    """One iterator per model chunk for each split: only chunks on the first/last stage read data, and
    only TP rank 0 of them reads it (pretrain_gpt's get_batch broadcasts over TP)."""
    from megatron_lite.data import build_pretraining_data_loader
    t = config.training
    iters = train_iters(config)
    eval_runs = (iters // t.eval_interval + 1) if t.eval_iters > 0 else 0
    num_samples = (iters * t.global_batch_size, eval_runs * t.eval_iters * t.global_batch_size,
                   t.eval_iters * t.global_batch_size)
    # Every rank builds the datasets (cheap: memory-mapped), because index caching is collective:
    # rank 0 builds the index files while the others wait at a world barrier, then load them. Only the
    # ranks that feed a model chunk (TP rank 0 of the first and last stage) get loaders.
    groups = groups or ProcessGroups.single()
    datasets = datasets_provider(config, num_samples)
    if groups.tp.rank != 0:
        datasets = (None, None, None)
    dp_rank, dp_size = groups.dp.rank, groups.dp.size

    def iterators(dataset, consumed: int, cyclic: bool) -> list[Optional[Iterator]]:
        out = []
        for c in range(num_chunks):
            if dataset is None or not _chunk_needs_data(c, num_chunks, groups):
                out.append(None)
                continue
            loader = build_pretraining_data_loader(dataset, consumed, t.micro_batch_size, dp_rank, dp_size,
                                                   config.data.num_workers)
            out.append(_cycle(loader) if cyclic else iter(loader))
        return out

    return (iterators(datasets[0], consumed_samples, False), iterators(datasets[1], eval_consumed, True),
            iterators(datasets[2], 0, True))


def _cycle(loader):
    while True:
        yield from loader


def _has_data(iterators) -> bool:
    return any(it is not None for it in iterators)


# ---- the step -----------------------------------------------------------------------------------
def train_step(config: Config, forward_step_func, data_iterators, model, optimizer, scheduler,
               num_microbatches: int, global_batch_size: int, groups: Optional[ProcessGroups] = None):
    """One optimizer step. Raises NonFiniteStepError on every rank (nothing updated) when the NaN/Inf check
    (--check-for-nan-in-loss-and-grad) finds a non-finite loss or grad norm on any rank."""
    groups = groups or ProcessGroups.single()
    forward_backward = get_forward_backward_func(config, groups)
    for chunk in model:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    losses = forward_backward(
        forward_step_func=forward_step_func,
        data_iterator=data_iterators if len(model) > 1 else data_iterators[0],
        model=model, num_microbatches=num_microbatches, seq_length=config.model.seq_length,
        micro_batch_size=config.training.micro_batch_size, config=config, forward_only=False,
        no_sync_func=_no_sync_func(model), finalize_model_grads_func=finalize_model_grads,
        grad_scale_func=optimizer.scale_loss)
    nonfinite_loss = any(not math.isfinite(float(d["lm loss"])) for d in losses)
    try:
        update_successful, grad_norm, num_zeros = optimizer.step(nonfinite_loss=nonfinite_loss)
    except NonFiniteStepError as error:
        error.loss = _average_losses(losses, groups)
        raise
    if update_successful:
        scheduler.step(increment=global_batch_size)
    return _average_losses(losses, groups), update_successful, grad_norm, num_zeros


def _no_sync_func(model):
    from contextlib import ExitStack

    def no_sync():
        stack = ExitStack()
        for chunk in model:
            stack.enter_context(chunk.no_sync())
        return stack
    return no_sync


def _average_losses(losses: list[dict], groups: ProcessGroups) -> Optional[float]:
    """Mean of the micro-batch losses on the loss stage, averaged over DP (for reporting only)."""
    if not groups.is_loss_stage:
        return None
    value = sum(float(d["lm loss"]) for d in losses) / max(1, len(losses))
    return collectives.all_reduce_scalar(value, groups.dp_cp) / groups.dp_cp.size


def evaluate(config: Config, forward_step_func, data_iterators, model, num_microbatches: int,
             groups: Optional[ProcessGroups] = None) -> Optional[float]:
    groups = groups or ProcessGroups.single()
    forward_backward = get_forward_backward_func(config, groups)
    for chunk in model:
        chunk.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for _ in range(config.training.eval_iters):
            losses = forward_backward(
                forward_step_func=forward_step_func,
                data_iterator=data_iterators if len(model) > 1 else data_iterators[0],
                model=model, num_microbatches=num_microbatches, seq_length=config.model.seq_length,
                micro_batch_size=config.training.micro_batch_size, config=config, forward_only=True)
            loss = _average_losses(losses, groups)
            if loss is not None:
                total, count = total + loss, count + 1
    for chunk in model:
        chunk.train()
    return total / count if count else None


# ---- the loop -----------------------------------------------------------------------------------
def pretrain(config: Config, model_provider: Callable, forward_step_func: Callable, datasets_provider: Callable) -> dict:
    """Train (and evaluate) as configured. Returns a summary dict (last losses, iteration)."""
    start_time = time.time()
    # Installed first, so a SIGTERM during set-up (loading, index building) still saves and exits after one step.
    signals = _SignalFlag(config.training.exit_signal_handler)
    # Kernel availability (--transformer-impl transformer_engine, --fp8-format) is checked on every rank before
    # the first collective, so a missing TE or GPU is an error naming the flag, not a hang.
    select_kernels(config, log=False)
    groups = initialize(config)
    logger = MetricsLogger(config, groups.world.size, groups)
    model, optimizer, scheduler = setup_model_and_optimizer(config, model_provider, groups)
    state = TrainState()
    d = config.data
    # Opening the datasets here checks every .bin/.idx pair before any checkpoint is read or step is run.
    fingerprint = data_fingerprint(d.data_path, d.split, d.mock_data)
    if config.checkpoint.load:
        state.iteration, state.consumed_train_samples = load_checkpoint(model, optimizer, scheduler, config,
                                                                        groups=groups, data_fingerprint=fingerprint)
    _print_summary(config, model, groups)
    run = _Run(config, groups, model, optimizer, scheduler, forward_step_func, logger, state, start_time, signals)
    run.memory = memory_report(model, optimizer)
    if not config.logging.measure_activation_memory:  # else logged after the first step, with activations
        run.log_memory()
    run.data_fingerprint = fingerprint
    run.data = build_data_iterators(config, datasets_provider, state.consumed_train_samples, len(model),
                                    run.eval_consumed(), groups)
    try:
        run.train_and_evaluate()
        run.finish_save()  # an --async-save still in flight is published before the job ends
    finally:
        logger.close()
        optimizer.close()  # NVMe offload files (optimizer/nvme.py)
    shutdown()
    run.summary["iteration"] = state.iteration
    return run.summary


class _Run:
    """One pretrain() call: the training loop, evaluations, saves and exit decisions."""

    def __init__(self, config: Config, groups: ProcessGroups, model, optimizer, scheduler, forward_step_func,
                 logger: MetricsLogger, state: TrainState, start_time: float, signals: "_SignalFlag"):
        self.config, self.groups, self.model = config, groups, model
        self.optimizer, self.scheduler, self.forward_step_func = optimizer, scheduler, forward_step_func
        self.logger, self.state, self.start_time = logger, state, start_time
        self.batches = NumMicroBatchesCalculator(config)
        self.signals = signals
        self.summary: dict = {"iteration": state.iteration, "train_losses": [], "valid_loss": None}
        self.saved_at: Optional[int] = None
        self.save_reason = ""
        log = config.logging
        self.spikes = LossSpikeDetector(log.loss_spike_threshold, log.loss_spike_window) if log.log_loss_spikes else None
        self.data_fingerprint: Optional[dict] = None  # recorded in every checkpoint (data.builder)
        self.data = ([], [], [])
        self.memory: Optional[dict] = None  # the memory report until it is logged

    def eval_consumed(self) -> int:
        t = self.config.training
        return (self.state.iteration // t.eval_interval) * t.eval_iters * t.global_batch_size if t.eval_interval else 0

    def save(self, reason: str, wait: bool = False) -> None:
        """Save (with --async-save in the background; `wait`: published before returning, as for an exit)."""
        config, state = self.config, self.state
        if config.checkpoint.save and self.saved_at != state.iteration:
            self.finish_save()  # at most one save in flight
            background = config.checkpoint.async_save
            save_checkpoint(state.iteration, self.model, self.optimizer, self.scheduler, state.consumed_train_samples,
                            config, groups=self.groups, data_fingerprint=self.data_fingerprint, async_save=background)
            self.saved_at = state.iteration
            if not background:
                print_rank_0(f"saved checkpoint at iteration {state.iteration} to {config.checkpoint.save} ({reason})")
            else:
                self.save_reason = reason
                print_rank_0(f"saving checkpoint at iteration {state.iteration} in the background ({reason})")
        if wait:
            self.finish_save()

    def finish_save(self, blocking: bool = True) -> None:
        """Publish the --async-save in flight: wait for it (`blocking`), or only if every rank's writer is
        done (one all-reduce, only while a save is in flight)."""
        if pending_save_iteration() is None:
            return
        iteration = finalize_pending_save(self.groups, blocking=blocking)
        if iteration is not None:
            print_rank_0(f"saved checkpoint at iteration {iteration} to {self.config.checkpoint.save} "
                         f"({self.save_reason}, written in the background)")

    def train_and_evaluate(self) -> None:
        t = self.config.training
        train_data, valid_data, test_data = self.data
        if not t.skip_train:
            if self.train(train_data, valid_data):
                return  # an exit condition fired (after a save)
            if self.state.iteration > 0:
                self.save("end of training", wait=True)
        if self.any(valid_data) and (t.skip_train or not t.eval_interval or self.state.iteration % t.eval_interval != 0):
            self.run_eval("valid", valid_data)
        if self.any(test_data):
            self.run_eval("test", test_data)

    def train(self, train_data, valid_data) -> bool:
        """The loop; True if it stopped early on an exit condition."""
        config, state, t = self.config, self.state, self.config.training
        total_iters = train_iters(config)
        window_start, window_iters = time.time(), 0
        while state.iteration < total_iters:
            self.batches.update(state.consumed_train_samples)
            fault_injection.maybe_kill(state.iteration + 1, self.groups.world.rank)
            forward_step_func = fault_injection.poison_forward_step(self.forward_step_func, state.iteration + 1,
                                                                    self.groups.world.rank)
            try:
                loss, ok, grad_norm, num_zeros = self.step(forward_step_func, train_data)
            except NonFiniteStepError as error:
                loss, ok, grad_norm, num_zeros = self.on_nonfinite(error)
            state.iteration += 1
            state.consumed_train_samples += self.batches.global_batch_size
            state.skipped_iterations += 0 if ok else 1
            if (grad_norm is not None and not math.isfinite(grad_norm)) or (loss is not None and not math.isfinite(loss)):
                state.nan_iterations += 1
            window_iters += 1
            if loss is not None:
                self.summary["train_losses"].append(loss)
            spike = self.spikes.update(loss) if self.spikes is not None else None
            if spike is not None:
                self.logger.log_loss_spike(state.iteration, spike)
            if state.iteration % config.logging.log_interval == 0:
                self.log(loss, grad_norm, num_zeros, (time.time() - window_start) / window_iters)
                window_start, window_iters = time.time(), 0
            if t.eval_interval and state.iteration % t.eval_interval == 0 and self.any(valid_data):
                self.run_eval("valid", valid_data)
            self.finish_save(blocking=False)
            if config.checkpoint.save_interval and state.iteration % config.checkpoint.save_interval == 0:
                self.save("interval")
            if self.should_exit():
                return True
        return False

    def step(self, forward_step_func, train_data):
        """train_step; the first one under planner/measure.py's saved-tensor meter with
        --measure-activation-memory (its peak joins the start-up memory record as `activations`)."""
        def run():
            return train_step(self.config, forward_step_func, train_data, self.model, self.optimizer, self.scheduler,
                              self.batches.num_microbatches, self.batches.global_batch_size, self.groups)
        if self.memory is None:
            return run()
        from megatron_lite.planner.measure import measure_step_activations
        out = []
        self.memory["activations"] = measure_step_activations(self.model, lambda: out.append(run()))
        self.log_memory()
        return out[0]

    def log_memory(self) -> None:
        self.logger.log_memory(self.memory, self.config.parallel.sharding_strategy)
        self.memory = None

    def on_nonfinite(self, error: NonFiniteStepError):
        """--on-nan skip: the step counts as skipped (no update, no LR step); returns train_step's tuple.
        --on-nan exit: every rank leaves together, without saving, so the latest checkpoint stays the last
        good one; raises NonFiniteTrainingError."""
        iteration, t = self.state.iteration + 1, self.config.training
        what = (f"iteration {iteration}: {error.describe()} (lm loss {error.loss}, grad norm {error.grad_norm}); "
                "the step's update was not applied on any rank")
        if t.on_nan == "skip":
            print_rank_0(f"{what}: skipping it (--on-nan skip).")
            return error.loss, False, error.grad_norm, None
        self.finish_save()  # a background save of an earlier (good) iteration completes
        save = self.config.checkpoint.save
        latest = read_tracker(save) if save and os.path.isdir(save) else None
        kept = (f"the latest checkpoint ({save}, iteration {latest}) is the last good one and was not overwritten"
                if latest is not None else "no checkpoint was saved")
        shutdown()
        raise NonFiniteTrainingError(
            f"{what}: stopping (--on-nan exit); {kept}. Fix: lower --lr or --init-method-std, check the data "
            "around these samples, or pass --on-nan skip to drop such steps and continue.")

    def log(self, loss, grad_norm, num_zeros, elapsed: float) -> None:
        state = self.state
        moe = moe_metrics.collect(self.model, self.config, self.groups)  # collective: every rank, every log
        self.logger.log_training(state.iteration, train_iters(self.config), state.consumed_train_samples, loss,
                                 self.optimizer.get_lr(), self.batches.global_batch_size, grad_norm, num_zeros,
                                 float(self.optimizer.get_loss_scale()), state.skipped_iterations,
                                 state.nan_iterations, elapsed, extra=moe)

    def any(self, iterators) -> bool:
        """Whether any rank has data for this split (all ranks must agree before a collective schedule)."""
        return collectives.any_rank(_has_data(iterators), self.groups.world)

    def run_eval(self, split: str, data) -> None:
        loss = evaluate(self.config, self.forward_step_func, data, self.model, self.batches.num_microbatches, self.groups)
        if self.groups.is_loss_stage and loss is not None:
            self.logger.log_evaluation(split, self.state.iteration, self.state.consumed_train_samples, loss)
        self.summary[f"{split}_loss"] = collectives.broadcast_scalar(loss, src=self.groups.loss_stage_rank,
                                                                     group=self.groups.pp)

    def should_exit(self) -> bool:
        t, state = self.config.training, self.state
        reason = None
        if self.signals.any_rank(self.groups):
            reason = "SIGTERM"
        elif t.exit_interval and state.iteration % t.exit_interval == 0:
            reason = f"--exit-interval {t.exit_interval}"
        elif t.exit_duration_in_mins:
            elapsed = collectives.all_reduce_scalar((time.time() - self.start_time) / 60.0, self.groups.world, op="max")
            if elapsed > t.exit_duration_in_mins:
                reason = f"--exit-duration-in-mins {t.exit_duration_in_mins}"
        if reason is None:
            return False
        self.save(reason, wait=True)
        print_rank_0(f"exiting at iteration {state.iteration} ({reason})")
        return True


def shutdown() -> None:
    """Leave together and tear the process groups down, so no backend thread is still alive when the
    interpreter exits (gloo otherwise aborts a rank with 'terminate called without an active exception')."""
    if torch.distributed.is_initialized():
        collectives.barrier()
        ps.destroy_model_parallel()
        torch.distributed.destroy_process_group()


def _print_summary(config: Config, model, groups: ProcessGroups) -> None:
    local = sum(p.numel() for chunk in model for p in chunk.parameters())
    counts = collectives.all_gather_object((groups.pp.rank, groups.tp.rank, groups.dp.rank, local), groups.world)
    per_stage: dict[int, int] = {}
    for pp_rank, tp_rank, dp_rank, n in counts:
        if dp_rank == 0:
            per_stage[pp_rank] = per_stage.get(pp_rank, 0) + n
    p, t = config.parallel, config.training
    lines = [
        f"> layout: TP={p.tensor_model_parallel_size} PP={p.pipeline_model_parallel_size}"
        + (f" VP={p.virtual_pipeline_model_parallel_size}" if p.virtual_pipeline_model_parallel_size else "")
        + f" CP={p.context_parallel_size} DP={config.data_parallel_size} on {config.world_size} ranks"
        + f" | sequence parallel: {p.sequence_parallel} | distributed optimizer: {p.use_distributed_optimizer}",
        "> parameters per pipeline stage (summed over TP): "
        + ", ".join(f"stage {s}: {n:,}" for s, n in sorted(per_stage.items()))
        + f" | total: {sum(per_stage.values()):,} (tied copies counted per stage)",
        f"> micro-batches per step: {config.num_microbatches} x {t.micro_batch_size} samples x DP {config.data_parallel_size}"
        + f" = global batch {t.global_batch_size} | tokens per step: {t.global_batch_size * config.model.seq_length:,}",
        f"> precision: {str(config.params_dtype).replace('torch.', '')} | seed: {t.seed} | "
        f"schedule: {describe_schedule(config)}",
    ]
    print_rank_0("\n".join(lines))
