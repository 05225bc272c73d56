"""Checkpoint save/load time and peak extra memory per rank: sharded vs the previous gather, sync vs
--async-save (training time lost per save), at DP 1/2/4/8 on this machine.

    python benchmarks/bench_checkpoint.py [--dp 1 2 4 8] [--layers 6] [--hidden 512] [--steps 4]
        [--strategy optim|optim_grads_params] [--append]

Each DP size runs in its own `--dp` gloo processes (TP 1, the distributed optimizer -- ZeRO-1, or ZeRO-3
with `--strategy optim_grads_params` --, fp32: the checkpoint holds the weights and the optimizer's fp32
main copy and two Adam moments, 16 bytes/param). Per rank:

- sharded save: `save_checkpoint` (each rank writes its own pieces; rank 0 the manifest), wall time and
  peak RSS growth over the RSS just before (sampled every 2 ms by a thread);
- gather save (the previous format's path, rebuilt here): `optimizer.get_parameter_state()` all-gathers
  every DP slice on every rank, then DP rank 0 torch.saves the weights and the full optimizer state;
- load: `load_checkpoint` of the sharded checkpoint in the same layout;
- reshard load (DP >= 2): the same processes rebuilt as TP 2 x DP/2 load it (`load_checkpoint`): time,
  peak RSS growth and the bytes this rank read (`CheckpointReader.bytes_read`); each rank reads only the
  saved pieces overlapping its TP 2 shard, about half of the checkpoint's bytes (the previous reshard read
  every saved shard of each parameter, i.e. the whole checkpoint, and built each full tensor);
- async: the blocking part of `save_checkpoint(async_save=True)` (the host snapshot), and the training time
  lost per save = (time of `--steps` steps with the background writer running + the final publish)
  minus the same steps without a save (the faster of a window before and one after).
The machine is shared with other jobs: each save/load runs twice and the faster time is reported.
Files go to a fresh directory under $TMPDIR (page cache, then fsync to the disk behind it).
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import threading
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_lite import checkpointing, parallel_state as ps  # noqa: E402
from megatron_lite.checkpoint_io import CheckpointReader  # noqa: E402
from megatron_lite.checkpointing import finalize_pending_save, load_checkpoint, save_checkpoint  # noqa: E402
from megatron_lite.config import Config  # noqa: E402
from megatron_lite.distributed import DistributedDataParallel, finalize_model_grads  # noqa: E402
from megatron_lite.models.gpt import GPTModel  # noqa: E402
from megatron_lite.optimizer import get_megatron_optimizer  # noqa: E402
from megatron_lite.tensor_parallel.random import model_parallel_seed  # noqa: E402
from megatron_lite.testing import run_distributed  # noqa: E402
from megatron_lite.training import build_lr_scheduler  # noqa: E402

SEQ, VOCAB = 64, 8192


def _config(dp: int, layers: int, hidden: int, directory: str, strategy: str = "optim", tp: int = 1) -> Config:
    cfg = Config(world_size=dp)
    m = cfg.model
    # at least 2 heads: the reshard-load column loads into TP 2
    m.num_layers, m.hidden_size, m.num_attention_heads, m.seq_length = layers, hidden, max(2, hidden // 64), SEQ
    m.vocab_size, m.hidden_dropout, m.attention_dropout = VOCAB, 0.0, 0.0
    cfg.parallel.use_distributed_optimizer = True
    cfg.parallel.data_parallel_sharding_strategy, cfg.parallel.tensor_model_parallel_size = strategy, tp
    cfg.training.micro_batch_size, cfg.training.global_batch_size, cfg.training.train_iters = 1, dp, 100
    cfg.checkpoint.save = cfg.checkpoint.load = directory
    return cfg.validate()


def _rss() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Peak resident set growth over the value at entry, sampled by a thread (ru_maxrss cannot be reset)."""

    def __enter__(self):
        self.base = self.peak = _rss()
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        self.start = time.perf_counter()
        return self

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, _rss())
            time.sleep(0.002)

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, _rss())
        self.extra_mib = (self.peak - self.base) / 2**20


def _step(ddp, optimizer, scheduler, step: int, dp: int) -> None:
    tokens = torch.randint(0, VOCAB, (dp, SEQ + 1), generator=torch.Generator().manual_seed(step))
    local = tokens[ps.get_data_parallel_rank():ps.get_data_parallel_rank() + 1]
    optimizer.zero_grad()
    loss = ddp(local[:, :-1], torch.arange(SEQ).expand(1, SEQ), None, local[:, 1:]).mean()
    loss.backward()
    finalize_model_grads([ddp], ps.get_process_groups())
    optimizer.step()
    ddp.finish_param_sync()
    scheduler.step(dp)


def _gather_save(ddp, optimizer, directory: str) -> None:
    """The previous format's save: every DP rank all-gathers the full optimizer state; DP rank 0 writes."""
    states = optimizer.get_parameter_state()
    weights = ddp.sharded_state()  # (ZeRO-3: gathers every unit, a collective on every rank)
    if ps.get_data_parallel_rank() == 0:
        os.makedirs(directory, exist_ok=True)
        torch.save({n: p.detach().clone() for n, p in weights.items()}, os.path.join(directory, "model.pt"))
        torch.save(states, os.path.join(directory, "optim.pt"))
    del states, weights
    ddp.finish_param_sync()  # (ZeRO-3: frees the gathered units again)
    torch.distributed.barrier()


def _timed_steps(ddp, optimizer, scheduler, steps: int, first: int, dp: int) -> float:
    start = time.perf_counter()
    for step in range(first, first + steps):
        _step(ddp, optimizer, scheduler, step, dp)
    return time.perf_counter() - start


def _build(cfg: Config):
    ps.initialize_model_parallel(cfg.parallel.tensor_model_parallel_size, 1)
    groups = ps.get_process_groups()
    model_parallel_seed(cfg.training.seed, groups.tp.rank)
    ddp = DistributedDataParallel(cfg, GPTModel(cfg, groups=groups), groups=groups)
    optimizer = get_megatron_optimizer(cfg, [ddp], groups)
    return groups, ddp, optimizer, build_lr_scheduler(cfg, optimizer)


class _RecordingReader(CheckpointReader):
    """load_checkpoint's reader, kept to report the bytes it read."""
    opened: list = []

    def __init__(self, path: str):
        super().__init__(path)
        _RecordingReader.opened.append(self)


def _reshard_load(dp: int, layers: int, hidden: int, directory: str, strategy: str) -> tuple:
    """These processes as TP 2 x DP/2 load the checkpoint: (seconds, extra MiB, MiB read)."""
    groups, ddp, optimizer, scheduler = _build(_config(dp, layers, hidden, directory, strategy, tp=2))
    checkpointing.CheckpointReader = _RecordingReader
    try:
        torch.distributed.barrier()
        with PeakRSS() as measured:
            load_checkpoint([ddp], optimizer, scheduler, _config(dp, layers, hidden, directory, strategy, tp=2))
    finally:
        checkpointing.CheckpointReader = CheckpointReader
    read = sum(_RecordingReader.opened.pop().bytes_read.values())
    ps.destroy_model_parallel()
    return measured.seconds, measured.extra_mib, read / 2**20


def _rank(dp: int, layers: int, hidden: int, steps: int, directory: str, strategy: str = "optim") -> dict:
    cfg = _config(dp, layers, hidden, directory, strategy)
    groups, ddp, optimizer, scheduler = _build(cfg)
    _step(ddp, optimizer, scheduler, 0, dp)
    out = {"params": sum(p.numel() for p in ddp.parameters())}
    for name, action in (("sharded_save", lambda: save_checkpoint(1, [ddp], optimizer, scheduler, dp, cfg)),
                         ("gather_save", lambda: _gather_save(ddp, optimizer, os.path.join(directory, "gather"))),
                         ("load", lambda: load_checkpoint([ddp], optimizer, scheduler, cfg))):
        runs = []
        for _ in range(2):  # the machine is shared: the faster of two runs, the larger memory growth
            torch.distributed.barrier()
            with PeakRSS() as measured:
                action()
            runs.append((measured.seconds, measured.extra_mib))
        out[name] = (min(r[0] for r in runs), max(r[1] for r in runs))
    torch.distributed.barrier()
    before = _timed_steps(ddp, optimizer, scheduler, steps, 1, dp)
    torch.distributed.barrier()
    with PeakRSS() as snapshot:
        save_checkpoint(2, [ddp], optimizer, scheduler, dp, cfg, async_save=True)
    with PeakRSS() as overlapped:
        _timed_steps(ddp, optimizer, scheduler, steps, 1 + steps, dp)
        finalize_pending_save(groups)
    torch.distributed.barrier()
    baseline = min(before, _timed_steps(ddp, optimizer, scheduler, steps, 1 + 2 * steps, dp))
    out["async_blocking"] = (snapshot.seconds, snapshot.extra_mib)
    out["async_lost"] = snapshot.seconds + overlapped.seconds - baseline
    out["step"] = baseline / steps
    ps.destroy_model_parallel()
    if dp >= 2:
        del ddp, optimizer, scheduler
        out["reshard_load"] = _reshard_load(dp, layers, hidden, directory, strategy)
    return out


def _size_mib(directory: str) -> float:
    path = os.path.join(directory, "iter_0000001")
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path)) / 2**20


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dp", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--strategy", default="optim", choices=["optim", "optim_grads_params"],
                        help="--data-parallel-sharding-strategy: ZeRO-1 (optim) or ZeRO-3 (optim_grads_params).")
    parser.add_argument("--append", action="store_true", help="Append the table to benchmarks/RESULTS.md.")
    args = parser.parse_args(argv)
    lines = ["| DP | checkpoint MiB | sharded save s | sharded save extra MiB/rank (max) | gather save s | "
             "gather save extra MiB/rank (max) | load s | load extra MiB/rank (max) | async blocking s | "
             "step s | async: training time lost per save s | reshard load to TP 2 s | reshard load extra MiB/rank "
             "(max) | reshard load MiB read/rank (max) |", "|" + "---|" * 14]
    for dp in args.dp:
        directory = tempfile.mkdtemp(prefix="bench_ckpt_")
        try:
            outs = run_distributed(_rank, dp, timeout=1800, dp=dp, layers=args.layers, hidden=args.hidden,
                                   steps=args.steps, directory=directory, strategy=args.strategy)
            size = _size_mib(directory)
        finally:
            shutil.rmtree(directory, ignore_errors=True)

        def worst(key, index):
            return max(o[key][index] for o in outs)
        lines.append(f"| {dp} | {size:.0f} | {worst('sharded_save', 0):.2f} | {worst('sharded_save', 1):.0f} | "
                     f"{worst('gather_save', 0):.2f} | {worst('gather_save', 1):.0f} | {worst('load', 0):.2f} | "
                     f"{worst('load', 1):.0f} | {worst('async_blocking', 0):.2f} | {max(o['step'] for o in outs):.2f} | "
                     f"{max(o['async_lost'] for o in outs):.2f} | " + (
                         f"{worst('reshard_load', 0):.2f} | {worst('reshard_load', 1):.0f} | {worst('reshard_load', 2):.0f} |"
                         if dp >= 2 else "- | - | - |"))
        print(lines[-1], flush=True)
    header = (f"GPT {args.layers} layers x hidden {args.hidden}, vocab {VOCAB} ({outs[0]['params'] / 1e6:.1f} M params), "
              f"fp32, distributed optimizer ({args.strategy}), TP 1, one process per DP rank, {args.steps} steps per async window; "
              f"{platform.machine()}, {os.cpu_count()} CPU cores shared with other jobs, torch {torch.__version__}. "
              "Times: the slowest rank; extra MiB: the largest peak RSS growth of any rank during the operation.")
    from results import report
    report("Checkpoint save/load: sharded vs gather, sync vs async", header, lines, args.append)


if __name__ == "__main__":
    main()
