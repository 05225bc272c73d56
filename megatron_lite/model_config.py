"""The model's sections of the configuration (ModelConfig: the transformer; MoEConfig: its experts) and
`arg`, the dataclass field helper every section uses to carry its command-line flag. config.py holds the
other sections and Config itself, which re-exports these."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

from megatron_lite.errors import fail as _fail

if TYPE_CHECKING:
    from megatron_lite.config import Config


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


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

    def derive_defaults(self) -> list[str]:
        if self.num_query_groups is None and not self.group_query_attention:
            self.num_query_groups = self.num_attention_heads
        if self.ffn_hidden_size is None:
            self.ffn_hidden_size = int((4 * self.hidden_size * 2 / 3) / 64) * 64 if self.swiglu else 4 * self.hidden_size
            if self.ffn_hidden_size == 0:  # tiny test models
                self.ffn_hidden_size = 4 * self.hidden_size
        if self.max_position_embeddings is None:
            self.max_position_embeddings = self.seq_length
        if self.recompute_granularity == "full" and self.recompute_num_layers is None:
            self.recompute_num_layers = 1
        return []

    def validate(self, cfg: "Config") -> None:
        """The model's shape, and what a TP size of --tensor-model-parallel-size needs of it."""
        tp, world = cfg.parallel.tensor_model_parallel_size, cfg.world_size
        if self.num_layers < 1:
            _fail("--num-layers", f"must be >= 1, got {self.num_layers}", "Use a positive layer count.")
        if self.hidden_size % self.num_attention_heads != 0 and self.kv_channels is None:
            _fail("--hidden-size", f"{self.hidden_size} is not divisible by --num-attention-heads {self.num_attention_heads}",
                  "Pick a hidden size that is a multiple of the head count, or set --kv-channels.")
        if self.num_attention_heads % tp != 0:
            _fail("--num-attention-heads", f"{self.num_attention_heads} heads are not divisible by --tensor-model-parallel-size {tp}",
                  f"Use a TP size from {[x for x in _divisors(self.num_attention_heads) if world % x == 0]}.")
        self._validate_query_groups(tp)
        if self.ffn_hidden_size % tp != 0:
            _fail("--ffn-hidden-size", f"{self.ffn_hidden_size} is not divisible by --tensor-model-parallel-size {tp}",
                  f"Use a multiple of {tp}.")
        if self.position_embedding_type == "learned_absolute" and self.max_position_embeddings < self.seq_length:
            _fail("--max-position-embeddings", f"{self.max_position_embeddings} is smaller than --seq-length {self.seq_length}",
                  f"Set --max-position-embeddings >= {self.seq_length}.")
        if self.position_embedding_type == "rope" and self.head_dim % 2 != 0:
            _fail("--position-embedding-type rope", f"needs an even head dimension, got {self.head_dim}",
                  "Change --hidden-size or --num-attention-heads.")
        if self.use_rope_scaling and self.position_embedding_type != "rope":
            _fail("--use-rope-scaling", "needs --position-embedding-type rope", "Add --position-embedding-type rope or drop it.")
        if self.use_rope_scaling and not (self.rope_scaling_factor >= 1
                                          and self.rope_scaling_high_freq_factor > self.rope_scaling_low_freq_factor > 0):
            _fail("--rope-scaling-factor", f"factor {self.rope_scaling_factor}, low/high frequency factors "
                  f"{self.rope_scaling_low_freq_factor}/{self.rope_scaling_high_freq_factor}",
                  "Use factor >= 1 and 0 < low < high (Llama 3.1: 8, 1, 4).")
        for flag, value in [("--hidden-dropout", self.hidden_dropout), ("--attention-dropout", self.attention_dropout)]:
            if not 0.0 <= value < 1.0:
                _fail(flag, f"must be in [0, 1), got {value}", "Use e.g. 0.1, or 0 to disable dropout.")
        self._validate_recompute()
        if self.fp8_format is not None and self.transformer_impl != "transformer_engine":
            _fail("--fp8-format", "needs --transformer-impl transformer_engine",
                  "Add --transformer-impl transformer_engine (needs TE and a Hopper GPU).")

    def _validate_query_groups(self, tp: int) -> None:
        if self.group_query_attention and self.num_query_groups is None:
            _fail("--num-query-groups", "is required with --group-query-attention", "Set it, e.g. --num-query-groups 8.")
        if not self.group_query_attention and self.num_query_groups != self.num_attention_heads:
            _fail("--num-query-groups", f"{self.num_query_groups} given without --group-query-attention",
                  "Add --group-query-attention or drop --num-query-groups.")
        if self.num_attention_heads % self.num_query_groups != 0:
            _fail("--num-query-groups", f"{self.num_attention_heads} heads are not divisible by {self.num_query_groups} query groups",
                  f"Use one of {_divisors(self.num_attention_heads)}.")
        if self.num_query_groups % tp != 0:
            _fail("--num-query-groups", f"{self.num_query_groups} query groups are not divisible by --tensor-model-parallel-size {tp}",
                  f"Use a TP size from {_divisors(self.num_query_groups)} or more query groups.")

    def _validate_recompute(self) -> None:
        if self.recompute_granularity == "full":
            if self.recompute_method is None:
                _fail("--recompute-method", "is required with --recompute-granularity full", "Use uniform or block.")
            if self.recompute_num_layers < 1:
                _fail("--recompute-num-layers", f"must be >= 1, got {self.recompute_num_layers}", "Use 1 or more.")
        elif self.recompute_method is not None:
            _fail("--recompute-method", "only applies with --recompute-granularity full",
                  "Add --recompute-granularity full or drop it.")

MOE_LOAD_BALANCING_TYPES = ("aux_loss", "seq_aux_loss", "global_aux_loss", "none")


@dataclass
class MoEConfig:
    """Mixture of experts (models/moe/). Flags, defaults and semantics are megatron-core's; departures are
    said in the help texts and docs/architecture.md."""
    num_experts: Optional[int] = arg(None, "Number of routed experts per MoE layer (None: a dense model). Experts have "
                                     "no biases here: needs --disable-bias-linear.")
    moe_router_topk: int = arg(2, "Experts each token is routed to.")
    moe_ffn_hidden_size: Optional[int] = arg(None, "Hidden size of each routed expert's MLP (default --ffn-hidden-size).")
    moe_layer_freq: str = arg("1", "Which layers are MoE: an integer N (every N-th layer, starting with layer 0) or a "
                              "per-layer 0/1 list such as '[0]+[1]*3' (1 = MoE).")
    moe_router_score_function: str = arg("softmax", "Router score function.", choices=["softmax", "sigmoid"])
    moe_router_pre_softmax: bool = arg(False, "Softmax over all experts before top-k (else over the chosen k).", action="store_true")
    moe_router_topk_scaling_factor: Optional[float] = arg(None, "Multiply the chosen experts' routing weights by this.")
    moe_router_num_groups: Optional[int] = arg(None, "Group-limited routing: experts split into this many groups.")
    moe_router_group_topk: Optional[int] = arg(None, "Group-limited routing: groups chosen per token.")
    moe_router_load_balancing_type: str = arg("aux_loss", "Load-balancing loss (none: only the expert bias, if enabled, balances).",
                                              choices=list(MOE_LOAD_BALANCING_TYPES))
    moe_aux_loss_coeff: float = arg(0.0, "Coefficient of the load-balancing loss (0: not computed).")
    moe_z_loss_coeff: Optional[float] = arg(None, "Coefficient of the router z-loss (e.g. 1e-3).")
    moe_router_enable_expert_bias: bool = arg(False, "Aux-loss-free balancing: a per-expert bias added to the scores for "
                                              "choosing experts, updated after each step.", action="store_true")
    moe_router_bias_update_rate: float = arg(1e-3, "Step of the expert-bias update (sign of the load deficit times this).")
    moe_expert_capacity_factor: Optional[float] = arg(None, "Capacity per expert as a multiple of the even share of this "
                                                      "rank's token-expert pairs; pairs over capacity are dropped (None: dropless).")
    moe_token_drop_policy: str = arg("probs", "Which pairs an over-capacity expert keeps: highest probs, or earliest position "
                                     "(ties go to the earlier token here; megatron-core leaves them to torch.topk).",
                                     choices=["probs", "position"])
    moe_pad_expert_input_to_capacity: bool = arg(False, "With a capacity factor: give every expert exactly its capacity "
                                                 "(padded with zero-weight tokens).", action="store_true")
    moe_token_dispatcher_type: str = arg("allgather", "Token dispatcher over the ETP x EP group. alltoall here is one "
                                         "all-to-all over ETP x EP each way (megatron-core: all-to-all over EP plus "
                                         "all-gather/reduce-scatter over ETP); same results.", choices=["allgather", "alltoall"])
    moe_grouped_gemm: bool = arg(False, "Run the local experts as one grouped GEMM (torch._grouped_mm where it works; "
                                 "else a loop of GEMMs with the same result).", action="store_true")
    moe_shared_expert_intermediate_size: Optional[int] = arg(None, "Hidden size of the shared expert(s) every token also "
                                                             "goes through (None: no shared expert).")
    moe_shared_expert_gate: bool = arg(False, "Scale the shared expert's output by sigmoid(x . w) (Qwen2-MoE).", action="store_true")

    @property
    def is_moe(self) -> bool:
        return self.num_experts is not None

    def layer_pattern(self, num_layers: int) -> list[int]:
        """1 for each MoE layer, 0 for each dense one (megatron-core's --moe-layer-freq)."""
        text = str(self.moe_layer_freq).strip()
        if text.lstrip("-").isdigit():
            freq = int(text)
            if freq < 1:
                _fail("--moe-layer-freq", f"must be >= 1, got {freq}", "Use 1 (every layer) or e.g. 2.")
            return [1 if i % freq == 0 else 0 for i in range(num_layers)]
        import re
        if not re.fullmatch(r"[\[\]\d\s,+*()]+", text):
            _fail("--moe-layer-freq", f"cannot parse {text!r}", "Use an integer or a 0/1 list like '[0]+[1]*3'.")
        try:
            pattern = list(eval(text, {"__builtins__": {}}, {}))  # only brackets, digits, + and * (checked above)
        except Exception:  # noqa: BLE001 (any parse error is the user's expression)
            pattern = []
        if len(pattern) != num_layers or any(x not in (0, 1) for x in pattern):
            _fail("--moe-layer-freq", f"{text!r} gives {pattern}, not {num_layers} zeros and ones (--num-layers)",
                  f"Give one 0/1 entry per layer, e.g. '[0]+[1]*{num_layers - 1}'.")
        return pattern

    def derive_defaults(self, cfg: "Config") -> list[str]:
        if self.is_moe and self.moe_ffn_hidden_size is None:
            self.moe_ffn_hidden_size = cfg.model.ffn_hidden_size
        return []

    def validate(self, cfg: "Config") -> None:
        """Experts against EP/ETP, routing sizes, and what this implementation supports."""
        if not self.is_moe:
            for flag, value in [("--moe-shared-expert-intermediate-size", self.moe_shared_expert_intermediate_size),
                                ("--moe-expert-capacity-factor", self.moe_expert_capacity_factor)]:
                if value is not None:
                    _fail(flag, "needs --num-experts", f"Add --num-experts or drop {flag}.")
            return
        p, m, E, k = cfg.parallel, cfg.model, self.num_experts, self.moe_router_topk
        ep, etp = p.expert_model_parallel_size, p.expert_tp_size
        if E < 1 or k < 1:
            _fail("--num-experts/--moe-router-topk", f"need >= 1, got {E} and {k}", "Use e.g. --num-experts 8 --moe-router-topk 2.")
        if k > E:
            _fail("--moe-router-topk", f"{k} is more than --num-experts {E}", f"Use a top-k of at most {E}.")
        if E % ep != 0:
            _fail("--num-experts", f"{E} experts are not divisible by --expert-model-parallel-size {ep}",
                  f"Use an EP size from {_divisors(E)}.")
        if self.moe_ffn_hidden_size % etp != 0:
            _fail("--moe-ffn-hidden-size", f"{self.moe_ffn_hidden_size} is not divisible by --expert-tensor-parallel-size {etp}",
                  f"Use a multiple of {etp}.")
        self.layer_pattern(m.num_layers)
        self._validate_routing()
        self._validate_layout(cfg)

    def _validate_routing(self) -> None:
        E, k, groups, group_topk = self.num_experts, self.moe_router_topk, self.moe_router_num_groups, self.moe_router_group_topk
        if (groups is None) != (group_topk is None):
            _fail("--moe-router-num-groups/--moe-router-group-topk", "give both or neither", "Set both, e.g. 4 and 2.")
        if groups is not None and (E % groups != 0 or not 1 <= group_topk <= groups or k % group_topk != 0
                                   or k // group_topk > E // groups):
            _fail("--moe-router-num-groups", f"{groups} groups, {group_topk} chosen, top-{k} of {E} experts: groups must "
                  "divide the experts, group-topk divide top-k, and each chosen group hold top-k/group-topk experts",
                  "Use e.g. 8 experts, 4 groups, group-topk 2, top-k 2.")
        if self.moe_router_load_balancing_type == "none" and self.moe_aux_loss_coeff > 0:
            _fail("--moe-aux-loss-coeff", "set with --moe-router-load-balancing-type none", "Pick a loss type or drop the coefficient.")
        if self.moe_router_enable_expert_bias and self.moe_router_score_function != "sigmoid":
            _fail("--moe-router-enable-expert-bias", "needs --moe-router-score-function sigmoid (megatron-core's rule)",
                  "Add --moe-router-score-function sigmoid.")
        if self.moe_expert_capacity_factor is not None and self.moe_expert_capacity_factor <= 0:
            _fail("--moe-expert-capacity-factor", f"must be > 0, got {self.moe_expert_capacity_factor}", "Use e.g. 1.0, or drop it.")
        if self.moe_pad_expert_input_to_capacity and self.moe_expert_capacity_factor is None:
            _fail("--moe-pad-expert-input-to-capacity", "needs --moe-expert-capacity-factor", "Add a capacity factor.")
        if self.moe_shared_expert_gate and self.moe_shared_expert_intermediate_size is None:
            _fail("--moe-shared-expert-gate", "needs --moe-shared-expert-intermediate-size", "Add a shared expert size.")

    def _validate_layout(self, cfg: "Config") -> None:
        p, m = cfg.parallel, cfg.model
        if p.tensor_model_parallel_size > 1 and not p.sequence_parallel and not cfg.extra.get("inference"):
            _fail("--num-experts", "with --tensor-model-parallel-size > 1 needs --sequence-parallel (megatron-core's rule: "
                  "every rank must route distinct tokens)", "Add --sequence-parallel.")
        if m.add_bias_linear:
            _fail("--num-experts", "experts here have no biases (like megatron-core's grouped GEMM experts), and "
                  "--disable-bias-linear is not set", "Add --disable-bias-linear.")
        if self.moe_pad_expert_input_to_capacity and self.moe_token_dispatcher_type == "allgather" \
                and p.expert_model_parallel_size * p.expert_tp_size > 1:
            _fail("--moe-pad-expert-input-to-capacity", "the allgather dispatcher does not pad expert inputs across ranks "
                  "(megatron-core supports padding with alltoall)", "Use --moe-token-dispatcher-type alltoall.")
