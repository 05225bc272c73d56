"""Typed configuration: one dataclass per section, each owning its own rules (the model's two, ModelConfig and
MoEConfig, and the `arg` field helper live in model_config.py).

Each field carries its command-line flag in its metadata (see `arg`), so `arguments.py` builds the
parser from these classes and a flag can never drift from the field it sets. Flags keep Megatron-LM's
spelling; a YAML file given with --config uses the field names (snake_case or hyphenated).

`Config.validate()` = `derive_defaults()` (fills what the user left to be derived; a value the user set is
never rewritten silently, each change becomes a note) + each section's `validate(cfg)`, in one order.
A rule lives in exactly one place: the pipeline layout rules in pipeline/layout.py, the interleaving
rule in pipeline/schedules.py, the parallel sizes here (check_parallel_sizes, also asked by parallel_state).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field
from typing import ClassVar, Optional

import torch

from megatron_lite.errors import ConfigError, fail as _fail  # ConfigError: re-exported, callers catch it from here
from megatron_lite.model_config import ModelConfig, MoEConfig, _divisors, arg  # re-exported (one Config namespace)


SHARDING_STRATEGIES = ("no_shard", "optim", "optim_grads", "optim_grads_params")


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = arg(1, "Tensor model parallel size (TP).")
    pipeline_model_parallel_size: int = arg(1, "Pipeline model parallel size (PP).")
    num_layers_per_virtual_pipeline_stage: Optional[int] = arg(None, "Layers per virtual stage (enables interleaved 1F1B).")
    virtual_pipeline_model_parallel_size: Optional[int] = arg(None, "Virtual stages per pipeline rank (alternative to --num-layers-per-virtual-pipeline-stage).", flag="--num-virtual-stages-per-pipeline-rank")
    decoder_first_pipeline_num_layers: Optional[int] = arg(None, "Layers on the first pipeline stage (the rest split evenly).")
    decoder_last_pipeline_num_layers: Optional[int] = arg(None, "Layers on the last pipeline stage (the rest split evenly).")
    pipeline_schedule: str = arg("auto", "Pipeline schedule: auto picks by the simulator's bubble within 1F1B's activation memory (1F1B/ZB-H1/GPipe; with two virtual stages per rank interleaved or ZB-V); zb-h1 splits backward into B and W (zero-bubble H1); zbv is zero-bubble V (two chunks per rank in a V: --num-virtual-stages-per-pipeline-rank 2).", choices=["auto", "gpipe", "1f1b", "interleaved", "zb-h1", "zbv"])
    microbatch_group_size_per_vp_stage: Optional[int] = arg(None, "Interleaved 1F1B: consecutive micro-batches per virtual stage (default PP); m need not be a multiple of PP.", flag="--microbatch-group-size-per-virtual-pipeline-stage")
    overlap_p2p_comm: bool = arg(False, "Post pipeline sends/receives asynchronously and wait only when their data is needed.", action="store_true")
    pipeline_p2p_transport: str = arg("auto", "How pipeline stages exchange activations and gradients: auto uses shared memory when every rank of the pipeline group is on one host with CPU tensors (gloo runs) and the process group's p2p otherwise; shm requires shared memory; process-group always uses torch.distributed p2p.", choices=["auto", "shm", "process-group"])
    context_parallel_size: int = arg(1, "Context parallel size (CP).")
    cp_comm_type: str = arg("p2p", "Context-parallel attention: p2p (ring), all_gather (K/V gathered) or a2a (Ulysses all-to-all).", choices=["p2p", "all_gather", "a2a"])
    expert_model_parallel_size: int = arg(1, "Expert model parallel size (EP): experts are split over EP ranks carved from DP x CP (parallel folding).")
    expert_tensor_parallel_size: Optional[int] = arg(None, "Expert tensor parallel size (ETP): each expert's MLP split over ETP ranks (default --tensor-model-parallel-size, as in megatron-core).")
    sequence_parallel: bool = arg(False, "Split norm/dropout regions along the sequence over the TP group.", action="store_true")
    distributed_backend: Optional[str] = arg(None, "torch.distributed backend (default nccl with CUDA, gloo otherwise).", choices=["nccl", "gloo"])
    distributed_timeout_minutes: float = arg(10.0, "Timeout of every collective, in minutes.")
    # Data-parallel gradient reduction (megatron_lite/distributed/ddp.py).
    use_distributed_optimizer: bool = arg(False, "Shard optimizer state over data-parallel ranks (ZeRO-1); the alias of --data-parallel-sharding-strategy optim.", action="store_true")
    data_parallel_sharding_strategy: Optional[str] = arg(None, "What is sharded over data-parallel ranks: no_shard, optim (ZeRO-1, = --use-distributed-optimizer), optim_grads (ZeRO-2: also gradients), optim_grads_params (ZeRO-3: also parameters, gathered per layer around its forward and backward). Default: optim with --use-distributed-optimizer, else no_shard.", choices=list(SHARDING_STRATEGIES))
    overlap_grad_reduce: bool = arg(False, "Overlap gradient reduction with the last micro-batch's backward.", action="store_true")
    overlap_param_gather: bool = arg(False, "Overlap the distributed optimizer's parameter all-gather with the next forward (ZeRO-3: prefetch the next unit's parameters while the current one computes, in forward and in backward).", action="store_true")
    ddp_bucket_size: Optional[int] = arg(None, "Elements per gradient bucket (default max(40M, 1M*DP); ZeRO-3 uses one bucket per unit instead).")
    accumulate_allreduce_grads_in_fp32: bool = arg(False, "Accumulate and reduce gradients in fp32 (always on with --bf16).", action="store_true")
    auto_parallel: bool = arg(False, "Plan the layout (TP, PP, VP, CP, EP, SP, micro-batch size, recompute, DP sharding) for the launched world size with megatron_lite/planner and train with it; layout flags given explicitly win. The chosen plan and its predictions are logged.", action="store_true")

    @property
    def expert_tp_size(self) -> int:
        """The effective --expert-tensor-parallel-size (megatron-core: TP when not given)."""
        return self.expert_tensor_parallel_size or self.tensor_model_parallel_size

    @property
    def sharding_strategy(self) -> str:
        """The effective --data-parallel-sharding-strategy (also before derive_defaults has run)."""
        if self.data_parallel_sharding_strategy is not None:
            return self.data_parallel_sharding_strategy
        return "optim" if self.use_distributed_optimizer else "no_shard"

    @property
    def shards_grads(self) -> bool:
        """ZeRO-2 and ZeRO-3: each DP rank keeps only its shard of the reduced gradients."""
        return self.sharding_strategy in ("optim_grads", "optim_grads_params")

    def derive_defaults(self) -> list[str]:
        notes = self._derive_sharding_strategy()
        if self.sequence_parallel and self.tensor_model_parallel_size == 1:
            self.sequence_parallel = False  # Megatron turns it off too, silently; we say so
            notes.append("--sequence-parallel turned off: with --tensor-model-parallel-size 1 there is nothing to split")
        return notes

    def _derive_sharding_strategy(self) -> list[str]:
        """--use-distributed-optimizer is the alias of strategy optim; every sharded strategy implies it."""
        strategy = self.data_parallel_sharding_strategy
        if strategy is None:
            self.data_parallel_sharding_strategy = self.sharding_strategy
            return []
        if strategy == "no_shard" and self.use_distributed_optimizer:
            _fail("--data-parallel-sharding-strategy", "no_shard contradicts --use-distributed-optimizer (= optim)",
                  "Drop one of them, or use --data-parallel-sharding-strategy optim.")
        if strategy != "no_shard" and not self.use_distributed_optimizer:
            self.use_distributed_optimizer = True  # the optimizer states are sharded in every sharded strategy
            return [f"--use-distributed-optimizer turned on: --data-parallel-sharding-strategy {strategy} shards "
                    "the optimizer states"]
        return []

    def validate(self, cfg: "Config") -> None:
        """Sizes against the world, and what sequence/context parallelism need of the sequence length."""
        check_parallel_sizes(cfg.world_size, self.tensor_model_parallel_size, self.pipeline_model_parallel_size,
                             self.context_parallel_size, self.expert_model_parallel_size, self.expert_tp_size)
        tp, cp, seq = self.tensor_model_parallel_size, self.context_parallel_size, cfg.model.seq_length
        if self.sequence_parallel and seq % tp != 0:
            _fail("--sequence-parallel", f"--seq-length {seq} is not divisible by --tensor-model-parallel-size {tp}",
                  f"Use a sequence length that is a multiple of {tp}.")
        if cp > 1:
            self.validate_context_parallel(cfg)
        if self.overlap_param_gather and not self.use_distributed_optimizer:
            _fail("--overlap-param-gather", "needs --use-distributed-optimizer", "Add --use-distributed-optimizer or drop it.")
        if self.sharding_strategy not in SHARDING_STRATEGIES:
            _fail("--data-parallel-sharding-strategy", f"unknown {self.sharding_strategy!r}",
                  f"Use one of {', '.join(SHARDING_STRATEGIES)}.")

    def validate_context_parallel(self, cfg: "Config") -> None:
        """What context parallelism needs: the sequence cut into 2 x CP chunks (each split again over TP
        under sequence parallelism) and whole heads per rank for a2a."""
        tp, cp, seq, m = self.tensor_model_parallel_size, self.context_parallel_size, cfg.model.seq_length, cfg.model
        unit = 2 * cp * (tp if self.sequence_parallel else 1)
        if seq % unit != 0:
            what = f"2 x CP x TP = 2 x {cp} x {tp}" if self.sequence_parallel else f"2 x CP = 2 x {cp}"
            _fail("--context-parallel-size", f"--seq-length {seq} is not divisible by {what} = {unit}",
                  f"Use a sequence length that is a multiple of {unit}.")
        heads = m.num_attention_heads // tp if m.num_attention_heads % tp == 0 else m.num_attention_heads
        if self.cp_comm_type == "a2a" and heads % cp != 0:
            _fail("--cp-comm-type", f"a2a splits each TP rank's {heads} attention heads over CP = {cp}, which does "
                  "not divide them", "Use --cp-comm-type p2p or all_gather, or a CP size that divides the heads per TP rank.")

    def validate_zero3(self, cfg: "Config") -> None:
        """ZeRO-3 frees each unit's parameter storage between uses (distributed/zero3.py): layouts that keep
        their own references to parameter data, or that have not been shown equal to one process, are refused."""
        m, flag = cfg.model, "--data-parallel-sharding-strategy"
        if m.torch_compile:
            _fail(flag, "optim_grads_params (ZeRO-3) with --torch-compile: compiled layers may hold on to the "
                  "parameter storage ZeRO-3 frees between uses", "Drop --torch-compile, or use optim_grads (ZeRO-2).")
        if m.transformer_impl == "transformer_engine" or m.fp8_format is not None:
            _fail(flag, "optim_grads_params (ZeRO-3) with --transformer-impl transformer_engine / --fp8-format: "
                  "Transformer Engine caches weights (fp8 casts) across the gathers ZeRO-3 frees",
                  "Use --transformer-impl local, or optim_grads (ZeRO-2).")

    def validate_implemented(self, cfg: "Config") -> None:
        # ZeRO-3's own rules; expert parallel sizes only mean something with experts.
        if self.sharding_strategy == "optim_grads_params":
            self.validate_zero3(cfg)
            if cfg.moe.is_moe:
                _fail("--data-parallel-sharding-strategy", "optim_grads_params (ZeRO-3) with --num-experts: expert "
                      "parameters are not sharded at rest yet", "Use optim_grads (ZeRO-2) or optim (ZeRO-1) with MoE.")
        if (self.expert_model_parallel_size > 1 or self.expert_tp_size != self.tensor_model_parallel_size) \
                and cfg.moe.num_experts is None:
            _fail("--expert-model-parallel-size/--expert-tensor-parallel-size", "set without --num-experts: a dense "
                  "model has no experts to split", "Add --num-experts N, or drop the expert parallel sizes.")


@dataclass
class OptimizerConfig:
    optimizer: str = arg("adam", "Optimizer (adam is AdamW with decoupled weight decay, as in Megatron).", choices=["adam", "sgd"])
    lr: float = arg(1e-4, "Peak learning rate.")
    min_lr: float = arg(0.0, "Learning rate floor after decay.")
    lr_decay_style: str = arg("linear", "Learning rate decay.", choices=["constant", "linear", "cosine", "inverse-square-root", "WSD"])
    lr_decay_iters: Optional[int] = arg(None, "Iterations to decay over (default --train-iters).")
    lr_decay_samples: Optional[int] = arg(None, "Samples to decay over (with --train-samples).")
    lr_warmup_iters: int = arg(0, "Linear warmup iterations.")
    lr_warmup_samples: int = arg(0, "Linear warmup samples (with --train-samples).")
    lr_warmup_fraction: Optional[float] = arg(None, "Warmup as a fraction of the decay iterations.")
    lr_wsd_decay_style: str = arg("exponential", "WSD: shape of the final decay.", choices=["exponential", "linear", "cosine"])
    lr_wsd_decay_iters: Optional[int] = arg(None, "WSD: iterations of the final decay.")
    weight_decay: float = arg(0.01, "Weight decay (applied to 2-D weights only).")
    clip_grad: float = arg(1.0, "Clip gradients to this global L2 norm (0 disables).")
    adam_beta1: float = arg(0.9, "Adam beta1.")
    adam_beta2: float = arg(0.999, "Adam beta2.")
    adam_eps: float = arg(1e-8, "Adam epsilon.")
    sgd_momentum: float = arg(0.9, "SGD momentum.")
    # Mixed precision.
    bf16: bool = arg(False, "bf16 parameters and activations, fp32 main weights.", action="store_true")
    fp16: bool = arg(False, "fp16 parameters and activations, fp32 main weights, loss scaling.", action="store_true")
    loss_scale: Optional[float] = arg(None, "Static loss scale (fp16); dynamic when not given.")
    initial_loss_scale: float = arg(2.0 ** 32, "Initial dynamic loss scale.")
    min_loss_scale: float = arg(1.0, "Minimum dynamic loss scale.")
    loss_scale_window: int = arg(1000, "Iterations without overflow before the scale grows.")
    hysteresis: int = arg(2, "Overflows tolerated before the scale is lowered.")
    use_fused_adam: bool = arg(True, "Disable fused/foreach Adam kernels.", flag="--no-fused-adam", action="store_false")
    # Optimizer offload (optimizer/offload.py).
    optimizer_cpu_offload: bool = arg(False, "Keep the fp32 main params and Adam moments of --optimizer-offload-fraction of this rank's shard in host memory (pinned on CUDA) and step them there with torch's CPU Adam.", action="store_true")
    optimizer_offload_fraction: float = arg(1.0, "With --optimizer-cpu-offload or --optimizer-nvme-offload-dir: the fraction (0..1) of each rank's optimizer shard kept and stepped on the host (or on disk).")
    optimizer_nvme_offload_dir: Optional[str] = arg(None, "Keep the offloaded fraction's fp32 main params and Adam moments in memory-mapped per-rank files under DIR (removed on a clean exit), stepped in chunks.")
    optimizer_offload_chunk_mb: float = arg(64.0, "With --optimizer-nvme-offload-dir: MiB of parameters stepped at a time.")

    def validate(self, cfg: "Config") -> None:
        self._validate_offload()
        if self.fp16 and self.bf16:
            _fail("--fp16/--bf16", "both given", "Choose one: --bf16 (recommended on Ampere and newer) or --fp16.")
        if self.loss_scale is not None and not self.fp16:
            _fail("--loss-scale", "only applies with --fp16", "Add --fp16 or drop --loss-scale.")
        train_iters = cfg.training.train_iters
        if train_iters is not None:
            decay_iters = self.lr_decay_iters or train_iters
            if self.lr_warmup_fraction is None and self.lr_warmup_iters >= decay_iters:
                _fail("--lr-warmup-iters", f"{self.lr_warmup_iters} warm-up iterations do not fit in {decay_iters} decay "
                      "iterations (--lr-decay-iters, default --train-iters)", f"Use fewer than {decay_iters} warm-up iterations.")

    def _validate_offload(self) -> None:
        if not 0.0 <= self.optimizer_offload_fraction <= 1.0:
            _fail("--optimizer-offload-fraction", f"{self.optimizer_offload_fraction} is outside [0, 1]",
                  "Use a fraction between 0 (nothing offloaded) and 1 (the whole shard on the host).")
        if self.optimizer_cpu_offload and self.optimizer != "adam":
            _fail("--optimizer-cpu-offload", f"steps Adam on the host, not --optimizer {self.optimizer}",
                  "Use --optimizer adam or drop --optimizer-cpu-offload.")
        if self.optimizer_nvme_offload_dir is None:
            return
        flag = "--optimizer-nvme-offload-dir"
        if self.optimizer != "adam":
            _fail(flag, f"steps Adam from disk, not --optimizer {self.optimizer}", f"Use --optimizer adam or drop {flag}.")
        if self.optimizer_offload_chunk_mb <= 0:
            _fail("--optimizer-offload-chunk-mb", f"must be > 0, got {self.optimizer_offload_chunk_mb}", "Use e.g. 64.")
        existing = self.optimizer_nvme_offload_dir
        while not os.path.exists(existing) and os.path.dirname(existing) != existing:
            existing = os.path.dirname(existing)  # the directory will be created under its nearest existing parent
        if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
            _fail(flag, f"{self.optimizer_nvme_offload_dir!r} is not writable ({existing!r} is not a writable directory)",
                  "Give a writable directory on a local disk.")


@dataclass
class DataConfig:
    data_path: Optional[list] = arg(None, "Dataset prefixes, optionally weighted: '0.3 a 0.7 b'.", nargs="*")
    split: str = arg("969,30,1", "Train/valid/test split weights.")
    data_cache_path: Optional[str] = arg(None, "Where index files are cached (default next to the data).")
    mock_data: bool = arg(False, "Deterministic synthetic data (no files needed).", action="store_true")
    tokenizer_type: str = arg("NullTokenizer", "Tokenizer.", choices=["SentencePieceTokenizer", "GPT2BPETokenizer", "HuggingFaceTokenizer", "NullTokenizer"])
    tokenizer_model: Optional[str] = arg(None, "SentencePiece .model, or a local tokenizer.json / directory.")
    vocab_file: Optional[str] = arg(None, "GPT-2 BPE vocab.json.")
    merge_file: Optional[str] = arg(None, "GPT-2 BPE merges.txt.")
    num_workers: int = arg(2, "Data loader worker processes.")
    reset_position_ids: bool = arg(False, "Restart position ids after each end-of-document token.", action="store_true")
    reset_attention_mask: bool = arg(False, "Do not attend across end-of-document tokens.", action="store_true")
    eod_mask_loss: bool = arg(False, "Do not train on end-of-document tokens.", action="store_true")

    def validate(self, cfg: "Config") -> None:
        if not self.mock_data and self.tokenizer_type == "NullTokenizer" and cfg.model.vocab_size is None and self.data_path:
            _fail("--vocab-size", "is required with --tokenizer-type NullTokenizer", "Give the vocabulary size of the preprocessed data.")
        if self.tokenizer_type == "SentencePieceTokenizer" and self.tokenizer_model is None:
            _fail("--tokenizer-model", "is required with --tokenizer-type SentencePieceTokenizer", "Point it at a .model file.")
        if self.tokenizer_type == "HuggingFaceTokenizer" and self.tokenizer_model is None:
            _fail("--tokenizer-model", "is required with --tokenizer-type HuggingFaceTokenizer",
                  "Point it at a local tokenizer.json or directory.")
        if self.tokenizer_type == "GPT2BPETokenizer" and (self.vocab_file is None or self.merge_file is None):
            _fail("--vocab-file/--merge-file", "are required with --tokenizer-type GPT2BPETokenizer",
                  "Give GPT-2's vocab.json and merges.txt.")
        split = [part for part in self.split.replace("/", ",").split(",") if part.strip()]
        try:
            weights = [float(part) for part in split]
        except ValueError:
            weights = []
        if not weights or len(weights) > 3 or any(w < 0 for w in weights) or sum(weights) <= 0:
            _fail("--split", f"cannot parse {self.split!r}", "Use up to three non-negative weights, e.g. 949,50,1.")


@dataclass
class TrainingConfig:
    micro_batch_size: int = arg(1, "Samples per micro-batch per data-parallel rank.")
    global_batch_size: Optional[int] = arg(None, "Samples per optimizer step (default micro-batch x DP).")
    rampup_batch_size: Optional[list] = arg(None, "Batch ramp-up: <start> <increment> <ramp-up samples>.", nargs=3, dest_type=int)
    train_iters: Optional[int] = arg(None, "Training iterations.")
    train_samples: Optional[int] = arg(None, "Training samples (alternative to --train-iters).")
    eval_interval: int = arg(1000, "Evaluate every this many iterations.")
    eval_iters: int = arg(100, "Micro-batch steps per evaluation.")
    skip_train: bool = arg(False, "Evaluate only.", action="store_true")
    exit_interval: Optional[int] = arg(None, "Exit (after a checkpoint) when the iteration is a multiple of this.")
    exit_duration_in_mins: Optional[float] = arg(None, "Exit (after a checkpoint) after this many minutes.")
    exit_signal_handler: bool = arg(True, "Do not save and exit on SIGTERM.", flag="--no-exit-signal-handler", action="store_false")
    seed: int = arg(1234, "Random seed: weights, dropout and data order.")
    check_for_nan_in_loss_and_grad: bool = arg(
        True, "Stop a step whose loss or grad norm is NaN/Inf on any rank before its update is applied (all ranks "
        "agree); --on-nan says what happens next. On by default, as in Megatron.", action=argparse.BooleanOptionalAction)
    on_nan: str = arg("exit", "With --check-for-nan-in-loss-and-grad: 'exit' stops the job (no save: the last good "
                      "checkpoint stays the latest) with an error naming the iteration and rank; 'skip' drops the "
                      "step's update and continues (fp16 overflow semantics).", choices=["exit", "skip"])

    def derive_defaults(self, cfg: "Config") -> list[str]:
        if self.global_batch_size is None:
            self.global_batch_size = self.micro_batch_size * cfg.data_parallel_size
        return []

    def first_num_microbatches(self, dp: int) -> int:
        """Micro-batches of the first step (the smallest with a batch-size ramp-up)."""
        start = self.rampup_batch_size[0] if self.rampup_batch_size is not None else self.global_batch_size
        return start // (self.micro_batch_size * dp)

    def validate(self, cfg: "Config") -> None:
        dp, mbs = cfg.data_parallel_size, self.micro_batch_size
        if mbs < 1:
            _fail("--micro-batch-size", f"must be >= 1, got {mbs}", "Use 1 or more.")
        if self.rampup_batch_size is not None:
            start, increment, _ = self.rampup_batch_size
            for flag, value in [("--rampup-batch-size start", start), ("--global-batch-size", self.global_batch_size)]:
                if value % (mbs * dp) != 0:
                    _fail(flag, f"{value} is not divisible by micro-batch x DP = {mbs} x {dp}", f"Use a multiple of {mbs * dp}.")
            if increment % (mbs * dp) != 0:
                _fail("--rampup-batch-size increment", f"{increment} is not divisible by micro-batch x DP = {mbs * dp}",
                      f"Use a multiple of {mbs * dp}.")
        if self.global_batch_size % (mbs * dp) != 0:
            good = mbs * dp * max(1, self.global_batch_size // (mbs * dp))
            _fail("--global-batch-size", f"{self.global_batch_size} is not divisible by --micro-batch-size x DP = {mbs} x {dp}",
                  f"Use a multiple of {mbs * dp}, e.g. {good}.")
        if self.train_iters is not None and self.train_samples is not None:
            _fail("--train-iters/--train-samples", "both given", "Give only one.")


@dataclass
class CheckpointConfig:
    save: Optional[str] = arg(None, "Directory to save checkpoints to.")
    load: Optional[str] = arg(None, "Directory to load a checkpoint from.")
    save_interval: Optional[int] = arg(None, "Save every this many iterations.")
    no_save_optim: bool = arg(False, "Do not save optimizer state.", action="store_true")
    async_save: bool = arg(False, "Save in the background: each rank copies its checkpoint pieces to host memory and "
                           "a writer thread writes them while training continues; the tracker names the checkpoint "
                           "once every rank's files are durable. At most one save in flight; exit and SIGTERM wait "
                           "for it.", action="store_true")
    no_load_optim: bool = arg(False, "Do not load optimizer state.", action="store_true")
    no_load_rng: bool = arg(False, "Do not load RNG states.", action="store_true")
    allow_data_change: bool = arg(False, "Resume with --load even if the training data (dataset sizes, blend weights, "
                                  "split) differs from the data the checkpoint was trained on.", action="store_true")
    finetune: bool = arg(False, "Load weights only and start at iteration 0.", action="store_true")
    ckpt_step: Optional[int] = arg(None, "Load this iteration from --load instead of the latest one.")

    def validate(self, cfg: "Config") -> None:
        if self.save_interval is not None and self.save_interval < 1:
            _fail("--save-interval", f"must be >= 1, got {self.save_interval}", "Use a positive interval.")


@dataclass
class LoggingConfig:
    log_interval: int = arg(100, "Log every this many iterations.")
    metrics_jsonl: Optional[str] = arg(None, "Write one JSON object per logged iteration/evaluation to this file.")
    tensorboard_dir: Optional[str] = arg(None, "TensorBoard log directory.")
    wandb_project: Optional[str] = arg(None, "Weights & Biases project (WANDB_MODE=offline works).")
    wandb_exp_name: Optional[str] = arg(None, "Weights & Biases run name.")
    wandb_save_dir: Optional[str] = arg(None, "Weights & Biases local directory.")
    peak_tflops: Optional[float] = arg(None, "Peak dense TFLOP/s per device for MFU (detected for known GPUs).")
    log_memory: bool = arg(True, "Do not log memory.", flag="--no-log-memory", action="store_false")
    log_num_zeros_in_grad: bool = arg(False, "Count and log zero gradient elements (an extra pass over all grads).", action="store_true")
    log_loss_spikes: bool = arg(False, "Report every iteration whose loss is more than --loss-spike-threshold standard "
                                "deviations above the mean of the previous --loss-spike-window losses (a console "
                                "line and a JSONL record 'loss_spike'; every iteration, whatever --log-interval).",
                                action="store_true")
    loss_spike_threshold: float = arg(4.0, "With --log-loss-spikes: standard deviations above the window's mean.")
    loss_spike_window: int = arg(50, "With --log-loss-spikes: how many previous losses the mean and deviation use.")
    measure_activation_memory: bool = arg(False, "Measure the first step's peak saved-activation bytes (planner/measure.py) and add them to the memory record, which is then written after that step.", action="store_true")

    def validate(self, cfg: "Config") -> None:
        if self.log_interval < 1:
            _fail("--log-interval", f"must be >= 1, got {self.log_interval}", "Use a positive interval.")
        if self.loss_spike_threshold <= 0:
            _fail("--loss-spike-threshold", f"must be > 0, got {self.loss_spike_threshold}", "Use e.g. 4.")
        if self.loss_spike_window < 2:
            _fail("--loss-spike-window", f"must be >= 2, got {self.loss_spike_window}", "Use e.g. 50.")


SECTIONS = {
    "model": ModelConfig,
    "parallel": ParallelConfig,
    "moe": MoEConfig,
    "optimizer": OptimizerConfig,
    "data": DataConfig,
    "training": TrainingConfig,
    "checkpoint": CheckpointConfig,
    "logging": LoggingConfig,
}


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    notes: ClassVar[list] = []  # what derive_defaults changed (set per instance by validate)
    world_size: int = 1  # set from the launcher's WORLD_SIZE by arguments.parse
    extra: dict = field(default_factory=dict)  # flags added by a tool's extra_args_provider

    @property
    def params_dtype(self) -> torch.dtype:
        if self.optimizer.bf16:
            return torch.bfloat16
        if self.optimizer.fp16:
            return torch.float16
        return torch.float32

    @property
    def data_parallel_size(self) -> int:
        p = self.parallel
        model_parallel = p.tensor_model_parallel_size * p.pipeline_model_parallel_size * p.context_parallel_size
        return max(1, self.world_size // max(1, model_parallel))  # sizes themselves are checked by validate()

    @property
    def num_microbatches(self) -> int:
        t = self.training
        return t.global_batch_size // (t.micro_batch_size * self.data_parallel_size)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "Config":
        cfg = cls(world_size=values.get("world_size", 1), extra=dict(values.get("extra", {})))
        for name, section_cls in SECTIONS.items():
            for key, value in values.get(name, {}).items():
                setattr(getattr(cfg, name), key, value)
        return cfg

    def derive_defaults(self) -> list[str]:
        """Fill every field left to be derived (ffn size, query groups, positions, global batch, virtual
        stages, ...). Values the user gave are never rewritten silently: each change is returned as a note
        (arguments.parse prints them)."""
        from megatron_lite.pipeline.layout import derive_virtual_stages
        notes = self.model.derive_defaults()
        notes += self.parallel.derive_defaults()
        notes += derive_virtual_stages(self)
        notes += self.training.derive_defaults(self)
        notes += self.moe.derive_defaults(self)
        return notes

    def validate(self) -> "Config":
        """derive_defaults(), then every section's own rules; raises ConfigError naming the flag, the values
        and a fix. Never touches torch.distributed, so every rank runs it before any process group exists."""
        from megatron_lite.pipeline.layout import validate_layout, validate_schedule
        self.notes = self.derive_defaults()
        self.parallel.validate(self)
        self.model.validate(self)
        self.moe.validate(self)
        validate_layout(self)
        self.optimizer.validate(self)
        self.training.validate(self)
        validate_schedule(self, self.training.first_num_microbatches(self.data_parallel_size))
        self.data.validate(self)
        self.checkpoint.validate(self)
        self.logging.validate(self)
        self.parallel.validate_implemented(self)
        return self


def validate(cfg: Config) -> None:
    """Derive defaults and check every rule (Config.validate, as a function)."""
    cfg.validate()


def check_parallel_sizes(world: int, tp: int, pp: int, cp: int = 1, ep: int = 1, etp: Optional[int] = None) -> None:
    """The sizes rule, owned here and asked by parallel_state.initialize_model_parallel too. Parallel folding
    (megatron-core): attention uses TP x CP x DP x PP, experts ETP x EP x EDP x PP over the same ranks."""
    etp = tp if etp is None else etp
    for flag, value in [("--tensor-model-parallel-size", tp), ("--pipeline-model-parallel-size", pp),
                        ("--context-parallel-size", cp), ("--expert-model-parallel-size", ep),
                        ("--expert-tensor-parallel-size", etp)]:
        if value < 1:
            _fail(flag, f"must be >= 1, got {value}", "Use 1 to disable this kind of parallelism.")
    if world % (tp * pp * cp) != 0:
        _fail("--tensor-model-parallel-size/--pipeline-model-parallel-size/--context-parallel-size",
              f"world size {world} is not divisible by TP x PP x CP = {tp} x {pp} x {cp} = {tp * pp * cp}",
              f"Choose sizes whose product divides {world} (divisors: {_divisors(world)}).")
    if world % (etp * pp * ep) != 0:
        _fail("--expert-model-parallel-size/--expert-tensor-parallel-size",
              f"world size {world} is not divisible by ETP x EP x PP = {etp} x {ep} x {pp} = {etp * ep * pp}",
              f"Choose ETP x EP dividing {max(1, world // pp)} (world / PP).")
