"""Optimizer state on disk (ZeRO-Infinity's NVMe offload): --optimizer-nvme-offload-dir DIR.

The offloaded fraction of this rank's shard (--optimizer-offload-fraction, optimizer/offload.py) keeps its
fp32 main params and Adam moments in three memory-mapped files per rank under
DIR/megatron_lite_rank{rank}_pid{pid}/ ({param,exp_avg,exp_avg_sq}.f32). Each step walks those slices in
pieces of --optimizer-offload-chunk-mb: the piece's (unscaled, clipped) gradient is copied into one host
chunk buffer and torch's CPU AdamW kernel updates the mapped main param and moments in place; the updated
values are then copied into the model parameter. Process memory beyond the mappings' page cache (clean,
file-backed pages the kernel may drop) is one chunk of gradient. The files are scratch: a clean exit
(close(), or the interpreter's exit) removes them, and a crash leaves the checkpoint, not DIR, as the
source of truth (a new run never reads old files: it starts from the model's or the checkpoint's values).
"""
from __future__ import annotations

import os
import shutil
import weakref

import torch
from torch.optim.adamw import adamw

from megatron_lite.errors import fail
from megatron_lite.kernels.adam import torch_fused_supported

KEYS = ("param", "exp_avg", "exp_avg_sq")
FLAG = "--optimizer-nvme-offload-dir"


class NvmeStore:
    """The disk-resident MainParams of one rank (their `main` become views of the mapped param file)."""

    def __init__(self, main_params: list, directory: str, rank: int, chunk_mb: float, hyper: dict):
        self.main_params = main_params
        self.chunk_numel = max(1, int(chunk_mb * 2**20) // 4)
        numel = sum(m.end - m.start for m in main_params)
        self.path = os.path.join(directory, f"megatron_lite_rank{rank}_pid{os.getpid()}")
        _check_space(directory, 4 * len(KEYS) * numel)
        try:
            os.makedirs(self.path, exist_ok=True)
            self.files = {key: torch.from_file(os.path.join(self.path, f"{key}.f32"), shared=True, size=max(numel, 1),
                                               dtype=torch.float32) for key in KEYS}
        except (OSError, RuntimeError) as error:
            fail(FLAG, f"cannot create the optimizer files under {directory!r} ({error})",
                 "Give a writable directory on a local disk with room for 12 bytes per offloaded parameter.")
        self._finalizer = weakref.finalize(self, shutil.rmtree, self.path, True)  # also at interpreter exit
        self.views: dict[int, dict[str, torch.Tensor]] = {}
        offset = 0
        for m in main_params:
            n = m.end - m.start
            self.views[id(m)] = {key: self.files[key][offset:offset + n] for key in KEYS}
            offset += n
            m.main = self.views[id(m)]["param"]
            m.main.copy_(m.model_slice)
            self.views[id(m)]["exp_avg"].zero_()
            self.views[id(m)]["exp_avg_sq"].zero_()
        self.grad_chunk = torch.empty(min(self.chunk_numel, max(numel, 1)), dtype=torch.float32)
        self.param_groups = [{"params": [], "wd_mult": 1.0, "lr_mult": 1.0, **hyper},
                             {"params": [], "wd_mult": 0.0, "lr_mult": 1.0, **hyper, "weight_decay": 0.0}]

    def state(self, m, key: str) -> torch.Tensor:
        return self.views[id(m)][key]

    @torch.no_grad()
    def step(self, device_grads: dict, num_steps: int) -> None:
        """One AdamW step of every disk slice, chunk by chunk; `num_steps` = steps taken before this one."""
        fused = torch_fused_supported("cpu")
        for m in self.main_params:
            grad = device_grads.get(id(m))
            if grad is None:
                continue
            group = self.param_groups[0 if m.model_param.dim() >= 2 else 1]
            views = self.views[id(m)]
            for lo in range(0, m.end - m.start, self.chunk_numel):
                hi = min(lo + self.chunk_numel, m.end - m.start)
                chunk = self.grad_chunk[:hi - lo]
                chunk.copy_(grad[lo:hi])
                step = torch.tensor(float(num_steps))  # the kernel adds one, as torch's AdamW does
                adamw([views["param"][lo:hi]], [chunk], [views["exp_avg"][lo:hi]], [views["exp_avg_sq"][lo:hi]], [],
                      [step], fused=fused, foreach=False if not fused else None, amsgrad=False,
                      beta1=group["betas"][0], beta2=group["betas"][1], lr=group["lr"],
                      weight_decay=group["weight_decay"], eps=group["eps"], maximize=False)

    def disk_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.files.values())

    def close(self) -> None:
        """Unmap and remove this rank's files (also run automatically at a clean interpreter exit)."""
        self.views.clear()
        self.files = {}
        self._finalizer()


def _check_space(directory: str, needed: int) -> None:
    try:
        os.makedirs(directory, exist_ok=True)
        free = shutil.disk_usage(directory).free
    except OSError as error:
        fail(FLAG, f"cannot use {directory!r} ({error})", "Give a writable directory on a local disk.")
    if free < needed:
        fail(FLAG, f"{directory!r} has {free / 2**20:.1f} MiB free, this rank needs {needed / 2**20:.1f} MiB",
             "Free space there, give a larger disk, or lower --optimizer-offload-fraction.")
