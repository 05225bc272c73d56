"""Kernel registry: for each operation, the best available implementation with the reference's semantics.

`select_kernels(config)` decides once per process (cached per configuration) and logs one line:

    kernels: norm=reference, attention=sdpa, bias_gelu=reference, swiglu=reference, rope=reference,
             cross_entropy=fused_linear, adam=torch_fused, torch_compile=off, fp8=off

The returned `KernelChoice` is what the model calls (`kernels.layer_norm(...)`, `kernels.attention(...)`),
so model code never branches on hardware. Every non-reference implementation is tested against the
reference in tests/unit/test_kernels.py (GPU-only ones are skipped there with the reason).

Operation      candidates, best first                                  forced to reference by
norm           te (TE LayerNorm/RMSNorm), apex (fused), torch (F.*)    --no-persist-layer-norm
attention      te (DotProductAttention), sdpa[(flash|efficient|cudnn)],
               unfused (matmul + softmax + matmul)                     --attention-backend local|unfused;
                                                                       auto -> unfused: --no-masked-softmax-fusion
bias_gelu      compiled (torch.compile -> one Triton kernel)           --no-bias-gelu-fusion
swiglu         compiled                                                --no-bias-swiglu-fusion
rope           compiled                                                --no-rope-fusion
cross_entropy  te (fused Triton vocab-parallel CE), fused_linear      --no-cross-entropy-fusion
               (output GEMM + vocab-parallel CE in token chunks, kernels/linear_cross_entropy.py), torch (TP = 1)
adam           te / apex FusedAdam, torch_fused, foreach               --no-fused-adam
linear GEMMs   te Linear under fp8_autocast (--fp8-format, TE + Hopper)  (off unless --fp8-format)
The reference of each op is the model engineer's plain-torch kernel (kernels/norm.py, attention.py,
activations.py, rope.py, tensor_parallel/cross_entropy.py). Elementwise fusions via torch.compile are
only chosen on CUDA (with Triton): on CPU their compile time outweighs the gain for short runs, and
--torch-compile compiles the whole layer instead.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from megatron_lite.config import Config, ConfigError
from megatron_lite.kernels import activations, adam, external, fused, norm, rope
from megatron_lite.kernels.linear_cross_entropy import linear_cross_entropy
from megatron_lite.kernels.attention import attention as reference_attention
from megatron_lite.tensor_parallel.cross_entropy import vocab_parallel_cross_entropy

# name -> (layer_norm, rms_norm)
_NORMS: dict[str, tuple[Callable, Callable]] = {
    "reference": (norm.layer_norm, norm.rms_norm),
    "torch": (norm.layer_norm, fused.torch_rms_norm),
    "apex": (external.apex_layer_norm, external.apex_rms_norm),
    "te": (external.te_layer_norm, external.te_rms_norm),
}
_ACTIVATIONS: dict[str, tuple[Callable, Callable]] = {  # name -> (bias_gelu, swiglu)
    "reference": (activations.bias_gelu, activations.swiglu),
    "compiled": (fused.compiled_bias_gelu, fused.compiled_swiglu),
}
_ROPE: dict[str, Callable] = {"reference": rope.apply_rotary, "compiled": fused.compiled_apply_rotary}
# Logits -> loss. fused_linear starts from the output layer's input instead (output_cross_entropy); given
# logits anyway (no labels to fuse with), it is the vocab-parallel reference.
_CROSS_ENTROPY: dict[str, Callable] = {"reference": vocab_parallel_cross_entropy, "te": external.te_cross_entropy,
                                       "torch": fused.torch_cross_entropy, "fused_linear": vocab_parallel_cross_entropy}
ATTENTION_IMPLS = ("reference", "unfused", "sdpa", "sdpa(flash)", "sdpa(efficient)", "sdpa(cudnn)", "sdpa(math)", "te")


@dataclass(frozen=True)
class KernelChoice:
    """The implementation chosen for each operation, and the ops themselves (same signatures as the
    reference kernels). Frozen and hashable: torch.compile guards on it like on a constant."""
    norm: str = "reference"
    attention: str = "reference"
    bias_gelu: str = "reference"
    swiglu: str = "reference"
    rope: str = "reference"
    cross_entropy: str = "reference"
    adam: str = "for_loop"
    torch_compile: bool = False
    fp8: Optional[str] = None
    notes: tuple[str, ...] = ()  # why a requested fast path was not taken (shown in the log line)

    # ---- the ops --------------------------------------------------------------------------------
    def layer_norm(self, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], eps: float) -> torch.Tensor:
        return _NORMS[self.norm][0](x, weight, bias, eps)

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        return _NORMS[self.norm][1](x, weight, eps)

    def attention_fn(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     attention_mask: Optional[torch.Tensor] = None, dropout_p: float = 0.0,
                     causal: bool = True) -> torch.Tensor:
        """Causal (or masked) attention on q [b, heads, s, d], k, v [b, groups, s, d] -> [b, heads, s, d]."""
        impl = self.attention
        if impl == "reference":
            return reference_attention(q, k, v, attention_mask, dropout_p=dropout_p, causal=causal)
        if impl == "unfused":
            return fused.unfused_attention(q, k, v, attention_mask, dropout_p=dropout_p, causal=causal)
        if impl == "te":
            return external.te_attention(q, k, v, attention_mask, dropout_p=dropout_p, causal=causal)
        backend = impl[5:-1] if impl.startswith("sdpa(") else None
        return fused.sdpa_attention(q, k, v, attention_mask, dropout_p=dropout_p, causal=causal, backend=backend)

    def bias_gelu_fn(self, x: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        return _ACTIVATIONS[self.bias_gelu][0](x, bias)

    def swiglu_fn(self, x: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        return _ACTIVATIONS[self.swiglu][1](x, bias)

    def apply_rotary(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return _ROPE[self.rope](x, cos, sin)

    def cross_entropy_fn(self, logits: torch.Tensor, target: torch.Tensor, tp_group=None) -> torch.Tensor:
        """Per-token fp32 loss of vocab-parallel logits [..., vocab/tp] (split over `tp_group`) against target [...]."""
        return _CROSS_ENTROPY[self.cross_entropy](logits, target, tp_group)

    @property
    def fuses_output_layer(self) -> bool:
        """Whether the loss is computed by output_cross_entropy (from the output layer's input) rather
        than by cross_entropy_fn on materialised logits."""
        return self.cross_entropy == "fused_linear"

    def output_cross_entropy(self, x: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, vocab_start: int,
                             vocab_size: int, grad_weights: Optional[torch.Tensor] = None, tp_group=None) -> torch.Tensor:
        """Per-token fp32 loss of the output GEMM x @ weight^T (this rank's vocabulary slice, padding
        beyond vocab_size masked) against target, without the [tokens, vocab] logits (fused_linear)."""
        return linear_cross_entropy(x, weight, target, vocab_start=vocab_start, vocab_size=vocab_size,
                                    grad_weights=grad_weights, tp_group=tp_group)

    def compile_layer(self, layer: torch.nn.Module) -> torch.nn.Module:
        """Prepare a transformer layer: with --fp8-format its linear layers run their GEMMs through
        Transformer Engine in fp8 (the output layer stays bf16, as in Megatron); with --torch-compile the
        layer is compiled in place (nn.Module.compile keeps parameter names and state_dict keys, unlike
        torch.compile(module), so checkpoints do not change)."""
        if self.fp8 is not None:
            linear = external.te_fp8_linear(self.fp8)
            for module in layer.modules():
                if hasattr(module, "linear_fn"):
                    module.linear_fn = linear
        if self.torch_compile:
            layer.compile(dynamic=False)
        return layer

    def describe(self) -> str:
        parts = [f"norm={self.norm}", f"attention={self.attention}", f"bias_gelu={self.bias_gelu}",
                 f"swiglu={self.swiglu}", f"rope={self.rope}", f"cross_entropy={self.cross_entropy}",
                 f"adam={self.adam}", f"torch_compile={'on' if self.torch_compile else 'off'}",
                 f"fp8={self.fp8 or 'off'}"]
        line = "kernels: " + ", ".join(parts)
        return line + (f" ({'; '.join(self.notes)})" if self.notes else "")


REFERENCE = KernelChoice()  # every op on its plain-torch reference (what tests compare against)

_CACHE: dict[tuple, KernelChoice] = {}
_LOGGED: set[str] = set()


def _config_key(config: Config, device_type: str) -> tuple:
    m = config.model
    return (device_type, m.transformer_impl, m.attention_backend, m.torch_compile, m.fp8_format,
            m.masked_softmax_fusion, m.bias_gelu_fusion, m.bias_swiglu_fusion, m.apply_rope_fusion,
            m.persist_layer_norm, m.cross_entropy_fusion, config.optimizer.use_fused_adam,
            config.parallel.tensor_model_parallel_size)


def _log_once(choice: KernelChoice) -> None:
    line = choice.describe()
    if line in _LOGGED:
        return
    _LOGGED.add(line)
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        print(line, flush=True)


def select_kernels(config: Config, device_type: Optional[str] = None, log: bool = True) -> KernelChoice:
    """The kernels for `config` on `device_type` ("cuda" when a GPU is present, else "cpu").

    Raises ConfigError at start-up, naming the flag, when a requested feature cannot run here
    (--transformer-impl transformer_engine or --fp8-format without TE / a Hopper GPU).
    """
    device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
    key = _config_key(config, device_type)
    if key not in _CACHE:
        _CACHE[key] = _select(config, device_type)
    choice = _CACHE[key]
    if log:
        _log_once(choice)
    return choice


def _select(config: Config, device_type: str) -> KernelChoice:
    m = config.model
    cuda = device_type == "cuda"
    notes: list[str] = []
    te = m.transformer_impl == "transformer_engine"
    if te and not (cuda and external.te_available()):
        raise ConfigError("--transformer-impl transformer_engine: Transformer Engine is not importable on this machine "
                          f"({'no CUDA GPU' if not cuda else 'import transformer_engine.pytorch failed'}). "
                          "Install transformer-engine on a CUDA machine, or use --transformer-impl local.")
    if m.fp8_format is not None:
        if not te:
            raise ConfigError(f"--fp8-format {m.fp8_format}: needs --transformer-impl transformer_engine. "
                              "Add it (with Transformer Engine on a Hopper GPU), or drop --fp8-format.")
        if not external.hopper_or_newer():
            found = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA GPU"
            raise ConfigError(f"--fp8-format {m.fp8_format}: FP8 GEMMs need a Hopper (sm_90) or newer GPU, found {found}. "
                              "Run on H100/H200, or drop --fp8-format (bf16 with --bf16).")

    # Norms: TE under --transformer-impl transformer_engine, else Apex's fused kernels, else torch's
    # F.rms_norm (a fused kernel on CUDA). On CPU F.rms_norm is no faster than the reference, so the
    # reference (bit-identical to Hugging Face in every dtype) stays.
    if not m.persist_layer_norm:
        norm_impl = "reference"
    elif te:
        norm_impl = "te"
    elif cuda and external.apex_norm_available():
        norm_impl = "apex"
    else:
        norm_impl = "torch" if cuda else "reference"

    attention_impl = _select_attention(m.attention_backend, te, cuda, notes, m.masked_softmax_fusion)

    # torch.compile-fused elementwise kernels need Triton (CUDA). With --torch-compile the whole layer is
    # compiled, which fuses these too, so compiling them separately would only add graph breaks.
    can_fuse = cuda and external.module_available("triton") and not m.torch_compile

    def fusion(enabled: bool, name: str) -> str:
        if enabled and cuda and not can_fuse and not m.torch_compile:
            notes.append(f"{name}: no Triton")
        return "compiled" if enabled and can_fuse else "reference"

    # TE's Triton kernel on CUDA when present; otherwise the output GEMM and the loss fused in token chunks
    # (never materialises the logits; on CPU 1.3-2x faster than GEMM + torch's log-softmax/NLL, profiled).
    cross_entropy = "reference"
    if m.cross_entropy_fusion and cuda and external.te_cross_entropy_available():
        cross_entropy = "te"
    elif m.cross_entropy_fusion:
        cross_entropy = "fused_linear"
    return KernelChoice(norm=norm_impl, attention=attention_impl,
                        bias_gelu=fusion(m.bias_gelu_fusion, "bias_gelu"), swiglu=fusion(m.bias_swiglu_fusion, "swiglu"),
                        rope=fusion(m.apply_rope_fusion, "rope"), cross_entropy=cross_entropy,
                        adam=adam.select_adam_impl(config.optimizer.use_fused_adam, device_type, m.transformer_impl),
                        torch_compile=m.torch_compile, fp8=m.fp8_format, notes=tuple(notes))


def _select_attention(backend: str, te: bool, cuda: bool, notes: list[str], masked_softmax_fusion: bool = True) -> str:
    """--attention-backend: local = the model engineer's reference, unfused = explicit softmax, flash / fused
    = those kernels (TE's under transformer_engine, else SDPA's), auto = TE or SDPA's own choice, or the
    explicit softmax under --no-masked-softmax-fusion (Megatron's switch off its fused scale-mask-softmax)."""
    if backend == "local":
        return "reference"
    if backend == "unfused" or (backend == "auto" and not masked_softmax_fusion):
        return "unfused"
    if te:
        return "te"
    if backend == "auto":
        return "sdpa"
    if backend == "flash":
        return "sdpa(flash)"  # torch has a flash kernel on CPU too
    # fused: cuDNN's fused attention on Hopper, the memory-efficient kernel on older GPUs.
    if not cuda:
        notes.append("attention-backend fused needs CUDA: using sdpa")
        return "sdpa"
    return "sdpa(cudnn)" if external.hopper_or_newer() else "sdpa(efficient)"


def with_impls(choice: KernelChoice, **impls: str) -> KernelChoice:
    """A copy of `choice` with some ops replaced (tests and benchmarks: compare one fast path at a time)."""
    return dataclasses.replace(choice, **impls)
