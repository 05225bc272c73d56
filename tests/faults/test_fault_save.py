"""Fault injection during checkpoint saves: a full disk, a read-only save directory, SIGTERM while an
--async-save is in flight, SIGKILL in the middle of a sharded save; and --async-save's losses.

Injections: MEGATRON_LITE_TEST_DISK_FULL="RANK:ITERATION" (that rank's writer raises ENOSPC),
MEGATRON_LITE_TEST_SLOW_SAVE="SECONDS" (every writer sleeps before each file, so a signal lands mid-save;
megatron_lite/fault_injection.py), a real tmpfs filled up or remounted read-only (root only; skipped
otherwise), and real signals sent to the job's process group.
"""
from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest
import torch.distributed as dist

import checkpoint_toys as toys
from cli import REPO, TINY, command, env, read_jsonl, run, train_losses
from megatron_lite import parallel_state as ps
from megatron_lite.checkpoint_io import CheckpointReader, read_tracker
from megatron_lite.checkpointing import CheckpointSaveError, load_checkpoint, save_checkpoint
from megatron_lite.config import Config
from megatron_lite.testing import run_distributed

DISTOPT = ["--use-distributed-optimizer", "--eval-iters", "0"]


def _complete(directory) -> int:
    """The tracker's iteration, after checking that its checkpoint verifies (every file, size and CRC-32)."""
    iteration = read_tracker(str(directory))
    with CheckpointReader(str(directory)) as reader:
        assert reader.iteration == iteration and reader.verify() == [], reader.verify()
    return iteration


def _run_failing(nproc: int, args: list, tmp_path, extra_env: dict, timeout: float = 300):
    proc = subprocess.run(command(nproc, [*args, "--metrics-jsonl", str(tmp_path / "m.jsonl")]), cwd=REPO,
                          env={**env(), **extra_env}, capture_output=True, text=True, timeout=timeout)
    return proc.returncode, proc.stdout + proc.stderr


@pytest.mark.slow  # ~40 s: two 2-rank runs
def test_async_save_gives_identical_losses_and_checkpoints(tmp_path):
    """Injects nothing: --async-save vs a synchronous save (2 ranks, distributed optimizer, save every 2 of
    6). Asserts: identical losses (fp32, bitwise), and both final checkpoints complete and equal."""
    base = [*TINY, *DISTOPT, "--train-iters", "6", "--save-interval", "2"]
    sync, _ = run(2, [*base, "--save", str(tmp_path / "sync")], tmp_path, "sync")
    background, output = run(2, [*base, "--save", str(tmp_path / "async"), "--async-save"], tmp_path, "async")
    assert train_losses(background) == train_losses(sync) and len(train_losses(sync)) == 6
    assert "written in the background" in output
    assert _complete(tmp_path / "sync") == _complete(tmp_path / "async") == 6
    a, b = CheckpointReader(str(tmp_path / "sync")), CheckpointReader(str(tmp_path / "async"))
    for name in a.param_names():
        assert a.full_tensor(name).equal(b.full_tensor(name)), name
        assert all(v.equal(b.optimizer_full_state(name)[k]) for k, v in a.optimizer_full_state(name).items()), name
    assert sorted(e for e in os.listdir(tmp_path / "async") if e.startswith("iter_")) == [
        "iter_0000002", "iter_0000004", "iter_0000006"]


@pytest.mark.parametrize("background", [False, True])
def test_disk_full_on_one_rank_fails_every_rank_and_keeps_the_last_checkpoint(tmp_path, background):
    """Injects: rank 1's checkpoint writer fails with ENOSPC at iteration 4's save (2 ranks, distributed
    optimizer, save every 2; sync and --async-save). Asserts: exit code != 0 within the timeout (no hang),
    one error naming iteration 4, rank 1, 'No space left on device' and 'the latest checkpoint is still
    iteration 2'; the tracker names iteration 2, which verifies and no iter_0000004 was published."""
    save = tmp_path / "ckpt"
    args = [*TINY, *DISTOPT, "--train-iters", "6", "--save-interval", "2", "--save", str(save)]
    started = time.time()
    rc, output = _run_failing(2, args + (["--async-save"] if background else []), tmp_path,
                              {"MEGATRON_LITE_TEST_DISK_FULL": "1:4"})
    assert rc != 0 and time.time() - started < 240, output[-4000:]
    assert "saving iteration 4 to" in output and "rank 1: OSError: [Errno 28] No space left on device" in output, output[-4000:]
    assert "the latest checkpoint is still iteration 2" in output, output[-4000:]
    assert _complete(save) == 2 and not os.path.exists(save / "iter_0000004")


# ---- a real file system: a full tmpfs and a read-only remount (root) ---------------------------------
def _mount_tmpfs(path, size: str) -> None:
    os.makedirs(path, exist_ok=True)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")


def _config(**checkpoint) -> Config:
    cfg = Config(world_size=2)
    cfg.model.num_layers, cfg.model.hidden_size = 2, toys.HIDDEN
    cfg.model.vocab_size, cfg.model.make_vocab_size_divisible_by = toys.VOCAB, toys.DIVISIBLE_BY
    cfg.parallel.tensor_model_parallel_size = 2
    for key, value in checkpoint.items():
        setattr(cfg.checkpoint, key, value)
    return cfg


def _fs_fault(directory: str, fault: str) -> dict:
    ps.initialize_model_parallel(2, 1)
    chunks = toys.build_chunks(2, ps.get_tensor_model_parallel_rank(), 2, 0, 1, tied=False)
    opt, sched = toys.ToyAdam(chunks), toys.ToyScheduler()
    toys.train_step(chunks, opt, sched)
    save_checkpoint(1, chunks, opt, sched, 8, _config(save=directory))
    dist.barrier()
    if dist.get_rank() == 0:
        if fault == "full":  # fill the file system to the last byte
            fd = os.open(os.path.join(directory, "filler"), os.O_WRONLY | os.O_CREAT)
            try:
                while True:
                    os.write(fd, b"\0" * 4096)
            except OSError:
                pass
            finally:
                os.close(fd)
        else:
            subprocess.run(["mount", "-o", "remount,ro", directory], check=True)
    dist.barrier()
    toys.train_step(chunks, opt, sched)
    out = {}
    try:
        save_checkpoint(2, chunks, opt, sched, 16, _config(save=directory))
        out["error"] = None
    except CheckpointSaveError as error:
        out["error"] = str(error)
    dist.barrier()
    out["loaded"] = load_checkpoint(chunks, opt, sched, _config(load=directory))
    return out


@pytest.mark.parametrize("fault", ["full", "read-only"])
def test_full_or_read_only_file_system_during_a_save(tmp_path, fault):
    """Injects: a real 2 MiB tmpfs as the save directory, after iteration 1's checkpoint either filled to
    the last byte or remounted read-only; then iteration 2 is saved (2 ranks, TP 2). Asserts: every rank
    raises CheckpointSaveError naming iteration 2 and the OS error (ENOSPC / read-only), saying iteration
    1 is still the latest; the tracker names iteration 1, which verifies and loads on both ranks."""
    mount = tmp_path / "fs"
    _mount_tmpfs(mount, "2m")
    try:
        outs = run_distributed(_fs_fault, 2, timeout=120, directory=str(mount), fault=fault)
        expected = "No space left on device" if fault == "full" else "Read-only file system"
        for out in outs:
            assert out["error"] is not None and "saving iteration 2" in out["error"], out
            assert expected in out["error"] and "the latest checkpoint is still iteration 1" in out["error"], out
            assert out["loaded"] == (1, 8)
        assert _complete(mount) == 1
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


# ---- signals mid-save ---------------------------------------------------------------------------------
def _start(args: list, tmp_path, extra_env: dict) -> subprocess.Popen:
    return subprocess.Popen(command(2, [*args, "--metrics-jsonl", str(tmp_path / "m.jsonl")]), cwd=REPO,
                            env={**env(), **extra_env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _workers(proc: subprocess.Popen) -> list[int]:
    """torchrun's worker processes (each in a session of its own, so killpg on torchrun misses them)."""
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(proc.pid)], capture_output=True, text=True).stdout
    return [int(pid) for pid in out.split()]


def _kill_job(proc: subprocess.Popen, sig: int) -> None:
    for pid in [*_workers(proc), proc.pid]:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _wait_for(condition, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not condition():
        if proc.poll() is not None or time.time() > deadline:
            _kill_job(proc, signal.SIGKILL)
            raise AssertionError(f"condition not reached (rc {proc.poll()}):\n{proc.stdout.read()[-4000:]}")
        time.sleep(0.05)


@pytest.mark.slow  # ~40 s
def test_sigterm_during_async_save_publishes_only_complete_checkpoints(tmp_path):
    """Injects: --async-save with every file write slowed by 1 s, SIGTERM to the whole job while iteration
    2's background save is still writing. Asserts: the job exits 0 after waiting for that save and saving
    the SIGTERM iteration; while the save was in flight the tracker did not name it; at the end the tracker
    names the SIGTERM iteration, every published checkpoint verifies and no iter_N.tmp is left."""
    save = tmp_path / "ckpt"
    args = [*TINY, *DISTOPT, "--train-iters", "200", "--save-interval", "2", "--save", str(save), "--async-save"]
    proc = _start(args, tmp_path, {"MEGATRON_LITE_TEST_SLOW_SAVE": "1.0"})
    tmp_dir = save / "iter_0000002.tmp"
    _wait_for(lambda: tmp_dir.is_dir() and any(tmp_dir.iterdir()), proc)
    assert read_tracker(str(save)) is None  # in flight: not published
    # SIGTERM to the workers (what Slurm's pre-emption delivers; torchrun itself is left alone, as
    # scripts/train_slurm.sbatch does: a SIGTERMed torchrun aborts instead of waiting for its workers).
    workers = _workers(proc)
    assert len(workers) == 2, workers
    for pid in workers:
        os.kill(pid, signal.SIGTERM)
    output, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, output[-4000:]
    stopped = max(r["iteration"] for r in read_jsonl(tmp_path / "m.jsonl") if "lm_loss" in r)
    assert f"exiting at iteration {stopped} (SIGTERM)" in output, output[-4000:]
    assert _complete(save) == stopped and stopped >= 2
    published = sorted(e for e in os.listdir(save) if e.startswith("iter_"))
    assert not [e for e in published if e.endswith(".tmp")], published
    for entry in published:
        assert CheckpointReader(str(save / entry)).verify() == [], entry


@pytest.mark.slow  # ~60 s
def test_sigkill_during_sharded_save_resumes_from_the_previous_checkpoint(tmp_path):
    """Injects: SIGKILL to every process of a 2-rank distributed-optimizer job while iteration 4's sharded
    save is writing (writes slowed by 1 s per file; some of its files already in iter_0000004.tmp).
    Asserts: the tracker names iteration 2, which verifies; a --load run resumes from iteration 2, removes
    the partial iter_0000004.tmp, and reproduces an uninterrupted run's losses from iteration 3 on."""
    save = tmp_path / "ckpt"
    base = [*TINY, *DISTOPT, "--train-iters", "6", "--save-interval", "2"]
    proc = _start([*base, "--save", str(save)], tmp_path, {"MEGATRON_LITE_TEST_SLOW_SAVE": "1.0"})
    tmp_dir = save / "iter_0000004.tmp"
    _wait_for(lambda: tmp_dir.is_dir() and any(f.suffix == ".pt" for f in tmp_dir.iterdir()), proc)
    _kill_job(proc, signal.SIGKILL)
    proc.communicate(timeout=60)
    assert _complete(save) == 2 and tmp_dir.is_dir()
    resumed, output = run(2, [*base, "--save", str(save), "--load", str(save)], tmp_path, "resumed")
    assert "loaded checkpoint" in output and "at iteration 2" in output, output[-3000:]
    reference, _ = run(2, base, tmp_path, "reference")
    assert train_losses(resumed) == {i: v for i, v in train_losses(reference).items() if i > 2}
    assert not tmp_dir.exists() and _complete(save) == 6
