"""Typed configuration: one dataclass per concern, and one validate() for every cross-field rule.

Each field carries its command-line flag in its metadata (see `arg`), so `arguments.py` builds the
parser from these classes and a flag can never drift from the field it sets. Flags keep Megatron-LM's
spelling; a YAML file given with --config uses the field names (snake_case or hyphenated).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

import torch


class ConfigError(ValueError):
    """An invalid configuration. The message names the flag, the values and a valid alternative."""


def arg(default: Any = None, help: str = "", flag: str | None = None, choices: list | None = None,
        action: str | None = None, nargs: str | None = None, dest_type: type | None = None) -> Any:
    """A dataclass field that also describes its command-line flag.

    `flag` defaults to the field name with dashes; `action='store_false'` makes a `--disable-x`/`--no-x`
    flag that turns a default-True field off.
    """
    meta = {"help": help, "flag": flag, "choices": choices, "action": action, "nargs": nargs, "type": dest_type}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelConfig:
    num_layers: int = arg(2, "Number of transformer layers.")
    hidden_size: int = arg(64, "Transformer hidden size.")
    ffn_hidden_size: Optional[int] = arg(None, "MLP hidden size (default 4*hidden, or 2/3 of that rounded to 64 with --swiglu).")
    num_attention_heads: int = arg(4, "Number of attention heads.")
    kv_channels: Optional[int] = arg(None, "Per-head channels (default hidden/heads).")
    group_query_attention: bool = arg(False, "Use grouped-query attention.", action="store_true")
    num_query_groups: Optional[int] = arg(None, "Number of key/value groups with --group-query-attention.")
    seq_length: int = arg(128, "Sequence length of a training sample.")
    max_position_embeddings: Optional[int] = arg(None, "Positions of the learned position table (default seq-length).")
    position_embedding_type: str = arg("learned_absolute", "Position embedding.", choices=["learned_absolute", "rope"])
    rotary_base: float = arg(10000.0, "RoPE base (theta).")
    rotary_percent: float = arg(1.0, "Fraction of each head's channels that RoPE rotates.")
    # Llama 3.x RoPE scaling (HF rope_type "llama3"); Megatron fixes the last three at 1, 4 and 8192.
    use_rope_scaling: bool = arg(False, "Llama 3.x RoPE frequency scaling.", action="store_true")
    rope_scaling_factor: float = arg(8.0, "With --use-rope-scaling: the scaling factor.")
    rope_scaling_low_freq_factor: float = arg(1.0, "With --use-rope-scaling: Llama 3's low_freq_factor.")
    rope_scaling_high_freq_factor: float = arg(4.0, "With --use-rope-scaling: Llama 3's high_freq_factor.")
    rope_scaling_original_max_position_embeddings: int = arg(8192, "With --use-rope-scaling: the pre-scaling context length.")
    normalization: str = arg("LayerNorm", "Normalisation layer.", choices=["LayerNorm", "RMSNorm"])
    norm_epsilon: float = arg(1e-5, "Epsilon of LayerNorm/RMSNorm.")
    swiglu: bool = arg(False, "SwiGLU MLP instead of GeLU.", action="store_true")
    add_bias_linear: bool = arg(True, "Disable biases of linear layers.", flag="--disable-bias-linear", action="store_false")
    add_qkv_bias: bool = arg(False, "Bias on the QKV projection even with --disable-bias-linear (Qwen2 style).", action="store_true")
    qk_layernorm: bool = arg(False, "Normalise each head's queries and keys (before RoPE) with --normalization (Qwen3 style).", action="store_true")
    untie_embeddings_and_output_weights: bool = arg(False, "Separate input embedding and output layer weights.", action="store_true")
    hidden_dropout: float = arg(0.1, "Dropout on hidden states (after attention and MLP, and on embeddings).")
    attention_dropout: float = arg(0.1, "Dropout on attention probabilities.")
    init_method_std: float = arg(0.02, "Std of the normal initialisation; output projections use std/sqrt(2*num_layers).")
    make_vocab_size_divisible_by: int = arg(128, "Pad the vocabulary to a multiple of this times TP.")
    vocab_size: Optional[int] = arg(None, "Vocabulary size (set from the tokenizer; required by --tokenizer-type NullTokenizer).")
    # Activation recomputation.
    recompute_granularity: Optional[str] = arg(None, "Recompute activations in backward.", choices=["full", "selective"])
    recompute_method: Optional[str] = arg(None, "With full recompute: which layers.", choices=["uniform", "block"])
    recompute_num_layers: Optional[int] = arg(None, "Layers per recompute group (uniform) or recomputed layers per stage (block).")
    # Kernel selection (megatron_lite/kernels).
    transformer_impl: str = arg("local", "Transformer implementation.", choices=["local", "transformer_engine"])
    attention_backend: str = arg("auto", "Attention kernel.", choices=["auto", "flash", "fused", "unfused", "local"])
    torch_compile: bool = arg(False, "torch.compile each transformer layer.", action="store_true")
    fp8_format: Optional[str] = arg(None, "FP8 training through Transformer Engine (Hopper GPUs).", choices=["hybrid", "e4m3"])
    masked_softmax_fusion: bool = arg(True, "Disable the fused attention softmax.", flag="--no-masked-softmax-fusion", action="store_false")
    bias_gelu_fusion: bool = arg(True, "Disable fused bias+GeLU.", flag="--no-bias-gelu-fusion", action="store_false")
    bias_swiglu_fusion: bool = arg(True, "Disable fused bias+SwiGLU.", flag="--no-bias-swiglu-fusion", action="store_false")
    bias_dropout_fusion: bool = arg(True, "Disable fused bias+dropout+add.", flag="--no-bias-dropout-fusion", action="store_false")
    apply_rope_fusion: bool = arg(True, "Disable the fused RoPE kernel.", flag="--no-rope-fusion", action="store_false")
    persist_layer_norm: bool = arg(True, "Disable fused/persistent LayerNorm kernels.", flag="--no-persist-layer-norm", action="store_false")
    cross_entropy_fusion: bool = arg(True, "Disable the fused cross entropy (TE's on GPU, else the output GEMM + loss in token chunks): compute the loss from materialised logits.", flag="--no-cross-entropy-fusion", action="store_false")

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = arg(1, "Tensor model parallel size (TP).")
    pipeline_model_parallel_size: int = arg(1, "Pipeline model parallel size (PP).")
    num_layers_per_virtual_pipeline_stage: Optional[int] = arg(None, "Layers per virtual stage (enables interleaved 1F1B).")
    virtual_pipeline_model_parallel_size: Optional[int] = arg(None, "Virtual stages per pipeline rank (alternative to --num-layers-per-virtual-pipeline-stage).", flag="--num-virtual-stages-per-pipeline-rank")
    decoder_first_pipeline_num_layers: Optional[int] = arg(None, "Layers on the first pipeline stage (the rest split evenly).")
    decoder_last_pipeline_num_layers: Optional[int] = arg(None, "Layers on the last pipeline stage (the rest split evenly).")
    pipeline_schedule: str = arg("auto", "Pipeline schedule: auto picks 1F1B, or interleaved 1F1B with virtual stages.", choices=["auto", "gpipe", "1f1b", "interleaved"])
    context_parallel_size: int = arg(1, "Context parallel size (CP).")
    expert_model_parallel_size: int = arg(1, "Expert model parallel size (EP).")
    sequence_parallel: bool = arg(False, "Split norm/dropout regions along the sequence over the TP group.", action="store_true")
    distributed_backend: Optional[str] = arg(None, "torch.distributed backend (default nccl with CUDA, gloo otherwise).", choices=["nccl", "gloo"])
    distributed_timeout_minutes: float = arg(10.0, "Timeout of every collective, in minutes.")
    # Data-parallel gradient reduction (megatron_lite/distributed/ddp.py).
    use_distributed_optimizer: bool = arg(False, "Shard optimizer state over data-parallel ranks (ZeRO-1).", action="store_true")
    overlap_grad_reduce: bool = arg(False, "Overlap gradient reduction with the last micro-batch's backward.", action="store_true")
    overlap_param_gather: bool = arg(False, "Overlap the distributed optimizer's parameter all-gather with the next forward.", action="store_true")
    ddp_bucket_size: Optional[int] = arg(None, "Elements per gradient bucket (default max(40M, 1M*DP)).")
    accumulate_allreduce_grads_in_fp32: bool = arg(False, "Accumulate and reduce gradients in fp32 (always on with --bf16).", action="store_true")


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


@dataclass
class CheckpointConfig:
    save: Optional[str] = arg(None, "Directory to save checkpoints to.")
    load: Optional[str] = arg(None, "Directory to load a checkpoint from.")
    save_interval: Optional[int] = arg(None, "Save every this many iterations.")
    no_save_optim: bool = arg(False, "Do not save optimizer state.", action="store_true")
    no_load_optim: bool = arg(False, "Do not load optimizer state.", action="store_true")
    no_load_rng: bool = arg(False, "Do not load RNG states.", action="store_true")
    finetune: bool = arg(False, "Load weights only and start at iteration 0.", action="store_true")
    ckpt_step: Optional[int] = arg(None, "Load this iteration from --load instead of the latest one.")


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


SECTIONS = {
    "model": ModelConfig,
    "parallel": ParallelConfig,
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
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
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
        return self.world_size // (p.tensor_model_parallel_size * p.pipeline_model_parallel_size * p.context_parallel_size)

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

    def validate(self) -> "Config":
        """Fill derived defaults and check every cross-field rule. Raises ConfigError; never touches torch.distributed."""
        validate(self)
        return self


def _fail(flag: str, problem: str, fix: str) -> None:
    raise ConfigError(f"{flag}: {problem}. {fix}")


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def validate(cfg: Config) -> None:
    m, p, o, d, t = cfg.model, cfg.parallel, cfg.optimizer, cfg.data, cfg.training
    world = cfg.world_size
    tp, pp, cp, ep = (p.tensor_model_parallel_size, p.pipeline_model_parallel_size,
                      p.context_parallel_size, p.expert_model_parallel_size)

    # --- parallel sizes ---
    for flag, value in [("--tensor-model-parallel-size", tp), ("--pipeline-model-parallel-size", pp),
                        ("--context-parallel-size", cp), ("--expert-model-parallel-size", ep)]:
        if value < 1:
            _fail(flag, f"must be >= 1, got {value}", "Use 1 to disable this kind of parallelism.")
    model_parallel = tp * pp * cp
    if world % model_parallel != 0:
        valid = [x for x in _divisors(world) if x <= world]
        _fail("--tensor-model-parallel-size/--pipeline-model-parallel-size/--context-parallel-size",
              f"world size {world} is not divisible by TP x PP x CP = {tp} x {pp} x {cp} = {model_parallel}",
              f"Choose sizes whose product divides {world} (divisors: {valid}).")
    dp = world // model_parallel
    if world % (tp * pp * ep) != 0:
        _fail("--expert-model-parallel-size", f"world size {world} is not divisible by TP x PP x EP = {tp * pp * ep}",
              f"Choose EP dividing {world // (tp * pp)}.")

    # --- model shape ---
    if m.hidden_size % m.num_attention_heads != 0 and m.kv_channels is None:
        _fail("--hidden-size", f"{m.hidden_size} is not divisible by --num-attention-heads {m.num_attention_heads}",
              "Pick a hidden size that is a multiple of the head count, or set --kv-channels.")
    if m.num_attention_heads % tp != 0:
        _fail("--num-attention-heads", f"{m.num_attention_heads} heads are not divisible by --tensor-model-parallel-size {tp}",
              f"Use a TP size from {[x for x in _divisors(m.num_attention_heads) if world % x == 0]}.")
    if m.group_query_attention:
        if m.num_query_groups is None:
            _fail("--num-query-groups", "is required with --group-query-attention", "Set it, e.g. --num-query-groups 8.")
    elif m.num_query_groups is not None and m.num_query_groups != m.num_attention_heads:
        _fail("--num-query-groups", f"{m.num_query_groups} given without --group-query-attention",
              "Add --group-query-attention or drop --num-query-groups.")
    if m.num_query_groups is None:
        m.num_query_groups = m.num_attention_heads
    if m.num_attention_heads % m.num_query_groups != 0:
        _fail("--num-query-groups", f"{m.num_attention_heads} heads are not divisible by {m.num_query_groups} query groups",
              f"Use one of {_divisors(m.num_attention_heads)}.")
    if m.num_query_groups % tp != 0:
        _fail("--num-query-groups", f"{m.num_query_groups} query groups are not divisible by --tensor-model-parallel-size {tp}",
              f"Use a TP size from {_divisors(m.num_query_groups)} or more query groups.")
    if m.ffn_hidden_size is None:
        m.ffn_hidden_size = int((4 * m.hidden_size * 2 / 3) / 64) * 64 if m.swiglu else 4 * m.hidden_size
        if m.ffn_hidden_size == 0:  # tiny test models
            m.ffn_hidden_size = 4 * m.hidden_size
    if m.ffn_hidden_size % tp != 0:
        _fail("--ffn-hidden-size", f"{m.ffn_hidden_size} is not divisible by --tensor-model-parallel-size {tp}",
              f"Use a multiple of {tp}.")
    if m.max_position_embeddings is None:
        m.max_position_embeddings = m.seq_length
    if m.position_embedding_type == "learned_absolute" and m.max_position_embeddings < m.seq_length:
        _fail("--max-position-embeddings", f"{m.max_position_embeddings} is smaller than --seq-length {m.seq_length}",
              f"Set --max-position-embeddings >= {m.seq_length}.")
    if m.position_embedding_type == "rope" and m.head_dim % 2 != 0:
        _fail("--position-embedding-type rope", f"needs an even head dimension, got {m.head_dim}", "Change --hidden-size or --num-attention-heads.")
    # --- RoPE scaling (Llama 3.x) ---
    if m.use_rope_scaling and m.position_embedding_type != "rope":
        _fail("--use-rope-scaling", "needs --position-embedding-type rope", "Add --position-embedding-type rope or drop it.")
    if m.use_rope_scaling and not (m.rope_scaling_factor >= 1 and m.rope_scaling_high_freq_factor > m.rope_scaling_low_freq_factor > 0):
        _fail("--rope-scaling-factor", f"factor {m.rope_scaling_factor}, low/high frequency factors {m.rope_scaling_low_freq_factor}/"
              f"{m.rope_scaling_high_freq_factor}", "Use factor >= 1 and 0 < low < high (Llama 3.1: 8, 1, 4).")
    for flag, value in [("--hidden-dropout", m.hidden_dropout), ("--attention-dropout", m.attention_dropout)]:
        if not 0.0 <= value < 1.0:
            _fail(flag, f"must be in [0, 1), got {value}", "Use e.g. 0.1, or 0 to disable dropout.")
    if m.num_layers < 1:
        _fail("--num-layers", f"must be >= 1, got {m.num_layers}", "Use a positive layer count.")

    # --- pipeline ---
    _validate_pipeline(cfg, pp)

    # --- sequence / context parallel ---
    if p.sequence_parallel and tp == 1:
        p.sequence_parallel = False  # Megatron silently disables it too: nothing to split over.
    if p.sequence_parallel and m.seq_length % tp != 0:
        _fail("--sequence-parallel", f"--seq-length {m.seq_length} is not divisible by --tensor-model-parallel-size {tp}",
              f"Use a sequence length that is a multiple of {tp}.")
    if cp > 1 and m.seq_length % (2 * cp) != 0:
        _fail("--context-parallel-size", f"--seq-length {m.seq_length} is not divisible by 2 x CP = {2 * cp}",
              f"Use a sequence length that is a multiple of {2 * cp}.")

    # --- recompute ---
    if m.recompute_granularity == "full":
        if m.recompute_method is None:
            _fail("--recompute-method", "is required with --recompute-granularity full", "Use uniform or block.")
        if m.recompute_num_layers is None:
            m.recompute_num_layers = 1
        if m.recompute_num_layers < 1:
            _fail("--recompute-num-layers", f"must be >= 1, got {m.recompute_num_layers}", "Use 1 or more.")
    elif m.recompute_method is not None:
        _fail("--recompute-method", "only applies with --recompute-granularity full", "Add --recompute-granularity full or drop it.")

    # --- precision ---
    if o.fp16 and o.bf16:
        _fail("--fp16/--bf16", "both given", "Choose one: --bf16 (recommended on Ampere and newer) or --fp16.")
    if o.loss_scale is not None and not o.fp16:
        _fail("--loss-scale", "only applies with --fp16", "Add --fp16 or drop --loss-scale.")
    if m.fp8_format is not None and m.transformer_impl != "transformer_engine":
        _fail("--fp8-format", "needs --transformer-impl transformer_engine", "Add --transformer-impl transformer_engine (needs TE and a Hopper GPU).")
    if p.overlap_param_gather and not p.use_distributed_optimizer:
        _fail("--overlap-param-gather", "needs --use-distributed-optimizer", "Add --use-distributed-optimizer or drop it.")

    # --- batch ---
    if t.micro_batch_size < 1:
        _fail("--micro-batch-size", f"must be >= 1, got {t.micro_batch_size}", "Use 1 or more.")
    if t.global_batch_size is None:
        t.global_batch_size = t.micro_batch_size * dp
    if t.rampup_batch_size is not None:
        start, increment, _ = t.rampup_batch_size
        for flag, value in [("--rampup-batch-size start", start), ("--global-batch-size", t.global_batch_size)]:
            if value % (t.micro_batch_size * dp) != 0:
                _fail(flag, f"{value} is not divisible by micro-batch x DP = {t.micro_batch_size} x {dp}",
                      f"Use a multiple of {t.micro_batch_size * dp}.")
        if increment % (t.micro_batch_size * dp) != 0:
            _fail("--rampup-batch-size increment", f"{increment} is not divisible by micro-batch x DP = {t.micro_batch_size * dp}",
                  f"Use a multiple of {t.micro_batch_size * dp}.")
    if t.global_batch_size % (t.micro_batch_size * dp) != 0:
        good = t.micro_batch_size * dp * max(1, t.global_batch_size // (t.micro_batch_size * dp))
        _fail("--global-batch-size", f"{t.global_batch_size} is not divisible by --micro-batch-size x DP = {t.micro_batch_size} x {dp}",
              f"Use a multiple of {t.micro_batch_size * dp}, e.g. {good}.")
    if t.train_iters is not None and t.train_samples is not None:
        _fail("--train-iters/--train-samples", "both given", "Give only one.")
    interleaved = p.virtual_pipeline_model_parallel_size is not None
    if interleaved and p.pipeline_schedule in ("auto", "interleaved"):
        num_micro = t.global_batch_size // (t.micro_batch_size * dp)
        if t.rampup_batch_size is not None:
            num_micro = t.rampup_batch_size[0] // (t.micro_batch_size * dp)
        if num_micro % pp != 0:
            _fail("--global-batch-size", f"interleaved 1F1B needs the number of micro-batches ({num_micro}) to be a multiple of PP = {pp}",
                  f"Use a global batch of {t.micro_batch_size * dp * pp * max(1, -(-num_micro // pp))}.")

    # --- data ---
    if not d.mock_data and d.tokenizer_type == "NullTokenizer" and m.vocab_size is None and d.data_path:
        _fail("--vocab-size", "is required with --tokenizer-type NullTokenizer", "Give the vocabulary size of the preprocessed data.")
    if d.tokenizer_type == "SentencePieceTokenizer" and d.tokenizer_model is None:
        _fail("--tokenizer-model", "is required with --tokenizer-type SentencePieceTokenizer", "Point it at a .model file.")
    if d.tokenizer_type == "HuggingFaceTokenizer" and d.tokenizer_model is None:
        _fail("--tokenizer-model", "is required with --tokenizer-type HuggingFaceTokenizer", "Point it at a local tokenizer.json or directory.")
    if d.tokenizer_type == "GPT2BPETokenizer" and (d.vocab_file is None or d.merge_file is None):
        _fail("--vocab-file/--merge-file", "are required with --tokenizer-type GPT2BPETokenizer", "Give GPT-2's vocab.json and merges.txt.")
    split = [s for s in d.split.replace("/", ",").split(",") if s.strip()]
    try:
        weights = [float(s) for s in split]
    except ValueError:
        weights = []
    if not weights or len(weights) > 3 or any(w < 0 for w in weights) or sum(weights) <= 0:
        _fail("--split", f"cannot parse {d.split!r}", "Use up to three non-negative weights, e.g. 949,50,1.")
    if t.train_iters is not None:
        decay_iters = o.lr_decay_iters or t.train_iters
        if o.lr_warmup_fraction is None and o.lr_warmup_iters >= decay_iters:
            _fail("--lr-warmup-iters", f"{o.lr_warmup_iters} warm-up iterations do not fit in {decay_iters} decay iterations "
                  "(--lr-decay-iters, default --train-iters)", f"Use fewer than {decay_iters} warm-up iterations.")
    if cfg.checkpoint.save_interval is not None and cfg.checkpoint.save_interval < 1:
        _fail("--save-interval", f"must be >= 1, got {cfg.checkpoint.save_interval}", "Use a positive interval.")
    if cfg.logging.log_interval < 1:
        _fail("--log-interval", f"must be >= 1, got {cfg.logging.log_interval}", "Use a positive interval.")

    # The groups exist (parallel_state builds them, the self-check prints them), but no model code splits
    # the sequence over CP or routes tokens to experts yet: refuse rather than train something else.
    if cp > 1:
        _fail("--context-parallel-size", f"{cp}: context parallelism is not implemented in the model yet",
              "Use --context-parallel-size 1 (sequence parallelism with TP also splits activations along the sequence).")
    if ep > 1:
        _fail("--expert-model-parallel-size", f"{ep}: mixture-of-experts layers are not implemented yet",
              "Use --expert-model-parallel-size 1.")


def _validate_pipeline(cfg: Config, pp: int) -> None:
    m, p = cfg.model, cfg.parallel
    first, last = p.decoder_first_pipeline_num_layers, p.decoder_last_pipeline_num_layers
    if (first is not None or last is not None) and pp == 1:
        _fail("--decoder-first-pipeline-num-layers", "needs --pipeline-model-parallel-size > 1", "Drop it, or use PP > 1.")
    if first is None and last is None and m.num_layers % pp != 0:
        _fail("--num-layers", f"{m.num_layers} layers are not divisible by --pipeline-model-parallel-size {pp}",
              f"Use a multiple of {pp}, or set --decoder-first/last-pipeline-num-layers.")
    middle_layers = m.num_layers - (first or 0) - (last or 0)
    middle_stages = pp - (first is not None) - (last is not None)
    if middle_layers < 0 or (middle_stages == 0 and middle_layers != 0):
        _fail("--decoder-first/last-pipeline-num-layers", f"do not add up to --num-layers {m.num_layers} over {pp} stages",
              "Make first + last + (an even share per middle stage) equal --num-layers.")
    if middle_stages > 0 and middle_layers % middle_stages != 0:
        _fail("--num-layers", f"the {middle_layers} layers left for {middle_stages} pipeline stage(s) do not divide evenly",
              f"Use --num-layers such that the remaining layers are a multiple of {middle_stages}.")
    per_stage = m.num_layers // pp
    if p.num_layers_per_virtual_pipeline_stage is not None:
        if pp == 1:
            _fail("--num-layers-per-virtual-pipeline-stage", "needs --pipeline-model-parallel-size > 1",
                  "Drop it, or use PP >= 2 (interleaving needs several stages).")
        if first is not None or last is not None:
            _fail("--num-layers-per-virtual-pipeline-stage", "cannot be combined with uneven first/last stages here",
                  "Drop --decoder-first/last-pipeline-num-layers.")
        if per_stage % p.num_layers_per_virtual_pipeline_stage != 0:
            _fail("--num-layers-per-virtual-pipeline-stage",
                  f"{m.num_layers} layers over PP={pp} give {per_stage} per stage, not divisible by {p.num_layers_per_virtual_pipeline_stage}",
                  f"Use a divisor of {per_stage}.")
        vp = per_stage // p.num_layers_per_virtual_pipeline_stage
        if p.virtual_pipeline_model_parallel_size not in (None, vp):
            _fail("--num-virtual-stages-per-pipeline-rank", f"{p.virtual_pipeline_model_parallel_size} contradicts "
                  f"--num-layers-per-virtual-pipeline-stage (which gives {vp})", "Give only one of the two.")
        p.virtual_pipeline_model_parallel_size = vp
    elif p.virtual_pipeline_model_parallel_size is not None:
        vp = p.virtual_pipeline_model_parallel_size
        if pp == 1:
            _fail("--num-virtual-stages-per-pipeline-rank", "needs --pipeline-model-parallel-size > 1", "Drop it, or use PP >= 2.")
        if m.num_layers % (pp * vp) != 0:
            _fail("--num-virtual-stages-per-pipeline-rank", f"{m.num_layers} layers are not divisible by PP x VP = {pp * vp}",
                  f"Use --num-layers that is a multiple of {pp * vp}.")
        p.num_layers_per_virtual_pipeline_stage = m.num_layers // (pp * vp)
    if p.virtual_pipeline_model_parallel_size == 1:
        p.virtual_pipeline_model_parallel_size = None
        p.num_layers_per_virtual_pipeline_stage = None
    if p.pipeline_schedule == "interleaved" and p.virtual_pipeline_model_parallel_size is None:
        _fail("--pipeline-schedule interleaved", "needs virtual stages", "Add --num-layers-per-virtual-pipeline-stage.")
    if p.pipeline_schedule in ("gpipe", "1f1b") and p.virtual_pipeline_model_parallel_size is not None:
        _fail(f"--pipeline-schedule {p.pipeline_schedule}", "does not support virtual stages",
              "Use --pipeline-schedule interleaved (or auto), or drop --num-layers-per-virtual-pipeline-stage.")
