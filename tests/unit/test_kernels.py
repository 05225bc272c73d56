"""Every fast path of kernels/registry.py against its reference twin (forward and gradients), and the
registry's selection rules. Paths that need CUDA, Transformer Engine or Apex are skipped elsewhere, with
the reason in pytest's -rs summary."""
from __future__ import annotations

import pytest
import torch

from megatron_lite.config import Config, ConfigError
from megatron_lite.kernels import adam, external
from megatron_lite.kernels.registry import REFERENCE, select_kernels, with_impls

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (none on this machine)")
needs_te = pytest.mark.skipif(not external.te_available(), reason="needs Transformer Engine and a CUDA GPU")
needs_apex = pytest.mark.skipif(not external.apex_norm_available(), reason="needs Apex and a CUDA GPU")
DEVICE = "cuda" if CUDA else "cpu"
# Tolerances: fp32 paths may only reorder float operations; low precision may differ by a rounding or two.
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


def _inputs(*shapes: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=gen).to(DEVICE, dtype).requires_grad_() for s in shapes]


def _compare(fast, ref, inputs: list[torch.Tensor], dtype: torch.dtype) -> None:
    """Same outputs and same input gradients for a random upstream gradient."""
    outs = []
    for fn in (fast, ref):
        xs = [x.detach().clone().requires_grad_() for x in inputs]
        y = fn(*xs)
        grad = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y)
        y.backward(grad)
        outs.append((y.detach().float(), [x.grad.float() for x in xs]))
    (y_fast, g_fast), (y_ref, g_ref) = outs
    torch.testing.assert_close(y_fast, y_ref, **TOL[dtype])
    for a, b in zip(g_fast, g_ref):
        torch.testing.assert_close(a, b, **TOL[dtype])


# ---- norms ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("impl", ["torch", pytest.param("apex", marks=needs_apex), pytest.param("te", marks=needs_te)])
def test_norms_match_reference(impl: str, dtype: torch.dtype) -> None:
    """Against the textbook formulas in float64 (not REFERENCE: impl="torch" shares the reference's
    layer norm, so that comparison would be the function against itself)."""
    fast = with_impls(REFERENCE, norm=impl)
    x, w, b = _inputs((6, 3, 64), (64,), (64,), dtype=dtype)

    def rms_norm64(x, w):  # Hugging Face Llama: normalise in fp32 (here fp64), round to the input dtype, scale
        x64 = x.double()
        return (w.double() * (x64 / (x64.pow(2).mean(-1, keepdim=True) + 1e-5).sqrt()).to(x.dtype).double()).to(x.dtype)

    def layer_norm64(x, w, b):
        x64 = x.double()
        mean, var = x64.mean(-1, keepdim=True), x64.var(-1, unbiased=False, keepdim=True)
        return ((x64 - mean) / (var + 1e-5).sqrt() * w.double() + b.double()).to(x.dtype)

    for impl_choice in (fast, REFERENCE):
        _compare(lambda x, w: impl_choice.rms_norm(x, w, 1e-5), rms_norm64, [x, w], dtype)
        _compare(lambda x, w, b: impl_choice.layer_norm(x, w, b, 1e-5), layer_norm64, [x, w, b], dtype)


# ---- attention --------------------------------------------------------------------------------------
ATTENTION_CPU = ["sdpa", "sdpa(math)", "sdpa(flash)", "unfused"]
ATTENTION_GPU = ["sdpa(efficient)", "sdpa(cudnn)"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("groups", [4, 2])  # MHA and GQA
@pytest.mark.parametrize("impl", ATTENTION_CPU + [pytest.param(i, marks=needs_cuda) for i in ATTENTION_GPU]
                         + [pytest.param("te", marks=needs_te)])
def test_attention_matches_reference(impl: str, groups: int, dtype: torch.dtype) -> None:
    if impl in ("sdpa(flash)", "sdpa(cudnn)", "sdpa(efficient)", "te") and dtype == torch.float32 and CUDA:
        pytest.skip("GPU flash/fused kernels take fp16/bf16 only")
    fast = with_impls(REFERENCE, attention=impl)
    q, k, v = _inputs((2, 4, 16, 32), (2, groups, 16, 32), (2, groups, 16, 32), dtype=dtype)
    _compare(fast.attention_fn, REFERENCE.attention_fn, [q, k, v], dtype)


@pytest.mark.parametrize("impl", ["sdpa", "unfused"])
def test_attention_with_explicit_mask(impl: str) -> None:
    """A document mask (--reset-attention-mask): True = masked, and it replaces the causal mask."""
    fast = with_impls(REFERENCE, attention=impl)
    q, k, v = _inputs((2, 4, 8, 16), (2, 2, 8, 16), (2, 2, 8, 16), dtype=torch.float32)
    mask = torch.ones(8, 8, dtype=torch.bool, device=DEVICE).triu(1)
    mask[4:, :4] = True  # two documents of four tokens
    mask = mask.expand(2, 1, 8, 8)
    _compare(lambda q, k, v: fast.attention_fn(q, k, v, mask), lambda q, k, v: REFERENCE.attention_fn(q, k, v, mask),
             [q, k, v], torch.float32)


# ---- elementwise fusions (torch.compile) ------------------------------------------------------------
# The registry picks these only on CUDA (Triton), but torch.compile runs on CPU too (C++ codegen), so the
# semantics are checked here on any machine. Slow: compiling takes 30-90 s on a busy 2-core box.
@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_activations_and_rope_match_reference(dtype: torch.dtype) -> None:
    fast = with_impls(REFERENCE, bias_gelu="compiled", swiglu="compiled", rope="compiled")
    (h,) = _inputs((8, 2, 128), dtype=dtype)
    _compare(fast.bias_gelu_fn, REFERENCE.bias_gelu_fn, [h], dtype)
    _compare(fast.swiglu_fn, REFERENCE.swiglu_fn, [h], dtype)
    from megatron_lite.kernels.rope import rope_cos_sin
    cos, sin = rope_cos_sin(torch.arange(8, device=DEVICE).expand(2, 8), 16, 10000.0, dtype=dtype)
    (x,) = _inputs((8, 2, 4, 32), dtype=dtype)  # rotary_percent 0.5: half the channels pass through
    _compare(lambda x: fast.apply_rotary(x, cos, sin), lambda x: REFERENCE.apply_rotary(x, cos, sin), [x], dtype)


# ---- cross entropy ----------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_cross_entropy_matches_vocab_parallel_at_tp1(dtype: torch.dtype) -> None:
    fast = with_impls(REFERENCE, cross_entropy="torch")
    (logits,) = _inputs((8, 2, 256), dtype=dtype)
    with torch.no_grad():
        logits[..., 250:] = float("-inf")  # padded vocabulary entries, as mask_padded_vocab leaves them
    target = torch.randint(0, 250, (8, 2), device=DEVICE)
    _compare(lambda x: fast.cross_entropy_fn(x, target), lambda x: REFERENCE.cross_entropy_fn(x, target), [logits], dtype)


def _fused_linear_case(dtype: torch.dtype, upstream: str, chunk_tokens: int) -> None:
    """fused_linear (chunked output GEMM + CE) against GEMM -> mask_padded_vocab -> vocab-parallel CE:
    loss, d x and d weight, with a padded vocabulary (250 real of 256) and a masked-mean upstream gradient
    (the fast path: d weight computed during forward) or an arbitrary one (backward recomputes)."""
    from megatron_lite.kernels.linear_cross_entropy import linear_cross_entropy
    from megatron_lite.tensor_parallel.layers import mask_padded_vocab
    x, weight = _inputs((8, 3, 64), (256, 64), dtype=dtype)
    target = torch.randint(0, 250, (8, 3), generator=torch.Generator().manual_seed(2)).to(DEVICE)
    mask = (torch.arange(24, device=DEVICE) % 5 != 0).float().view(8, 3)
    upstream_grad = mask * 0.37 if upstream == "masked_mean" else torch.rand(8, 3, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    outs = []
    for use_fused in (True, False):
        xs, w = x.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
        if use_fused:
            loss = linear_cross_entropy(xs, w, target, vocab_size=250, grad_weights=mask, chunk_tokens=chunk_tokens)
        else:
            loss = REFERENCE.cross_entropy_fn(mask_padded_vocab(xs @ w.t(), 0, 250), target)
        loss.backward(upstream_grad)
        outs.append((loss.detach(), xs.grad.float(), w.grad.float()))
    for fast, ref in zip(*outs):
        torch.testing.assert_close(fast, ref, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("upstream", ["masked_mean", "arbitrary"])
def test_fused_linear_cross_entropy_matches_reference(dtype: torch.dtype, upstream: str) -> None:
    _fused_linear_case(dtype, upstream, chunk_tokens=5)  # chunks of 5 of 24 tokens: a ragged last chunk


def test_fused_linear_cross_entropy_chunking_and_eval() -> None:
    from megatron_lite.kernels.linear_cross_entropy import default_chunk_tokens, linear_cross_entropy
    for chunk in (1, 24, 1000):
        _fused_linear_case(torch.float32, "masked_mean", chunk)
    assert default_chunk_tokens(8192, "cpu") == 512 and default_chunk_tokens(10 ** 9, "cpu") == 1
    x, w = torch.randn(4, 16), torch.randn(32, 16)
    target = torch.randint(0, 32, (4,))
    with torch.no_grad():  # evaluation: the loss only, equal to the training path's
        eval_loss = linear_cross_entropy(x, w, target)
    train_loss = linear_cross_entropy(x.requires_grad_(), w, target)
    torch.testing.assert_close(eval_loss, train_loss.detach(), rtol=0, atol=0)
    with pytest.raises(ValueError, match="leading"):
        linear_cross_entropy(x, w, target[:3])
    empty = torch.zeros(0, 16, requires_grad=True)  # a micro-batch with no tokens: zero gradients
    wz = w.detach().clone().requires_grad_()
    linear_cross_entropy(empty, wz, target[:0]).sum().backward()
    assert wz.grad is not None and not wz.grad.any()
    loss = linear_cross_entropy(x, w.requires_grad_(), target).sum()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward per forward"):
        loss.backward()


@needs_te
def test_te_cross_entropy_matches_reference() -> None:
    if not external.te_cross_entropy_available():
        pytest.skip("this Transformer Engine has no parallel_cross_entropy")
    fast = with_impls(REFERENCE, cross_entropy="te")
    (logits,) = _inputs((8, 2, 256), dtype=torch.bfloat16)
    target = torch.randint(0, 256, (8, 2), device=DEVICE)
    _compare(lambda x: fast.cross_entropy_fn(x, target), lambda x: REFERENCE.cross_entropy_fn(x, target),
             [logits], torch.bfloat16)


# ---- Adam -------------------------------------------------------------------------------------------
def _adam_run(impl: str, device: str, steps: int = 3) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(17, 9, generator=gen).to(device), torch.randn(33, generator=gen).to(device)]
    groups = [{"params": [params[0]], "weight_decay": 0.1}, {"params": [params[1]], "weight_decay": 0.0}]
    opt = adam.build_adam(groups, impl, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    for step in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(step)).to(device)
        opt.step()
    return [p.cpu() for p in params]


ADAM_CPU = ["foreach"] + (["torch_fused"] if adam.torch_fused_supported("cpu") else [])


@pytest.mark.parametrize("impl", ADAM_CPU + [pytest.param("apex", marks=pytest.mark.skipif(
    not external.apex_adam_available(), reason="needs Apex and a CUDA GPU")), pytest.param("te", marks=needs_te)])
def test_adam_matches_for_loop(impl: str) -> None:
    device = "cuda" if impl in ("apex", "te") else "cpu"
    for fast, ref in zip(_adam_run(impl, device), _adam_run("for_loop", device)):
        torch.testing.assert_close(fast, ref, atol=1e-6, rtol=1e-6)


@needs_cuda
def test_torch_fused_adam_cuda_matches_for_loop() -> None:
    for fast, ref in zip(_adam_run("torch_fused", "cuda"), _adam_run("for_loop", "cuda")):
        torch.testing.assert_close(fast, ref, atol=1e-6, rtol=1e-6)


def test_adam_selection() -> None:
    assert adam.select_adam_impl(False, "cpu") == "for_loop"  # --no-fused-adam
    assert adam.select_adam_impl(True, "cpu") in ("torch_fused", "foreach")


# ---- selection rules --------------------------------------------------------------------------------
def _config(**model: object) -> Config:
    cfg = Config()
    cfg.model.vocab_size = 256
    for key, value in model.items():
        setattr(cfg.model, key, value)
    return cfg.validate()


@pytest.mark.skipif(CUDA, reason="checks the CPU defaults")
def test_cpu_defaults() -> None:
    choice = select_kernels(_config(), log=False)
    assert (choice.norm, choice.attention, choice.bias_gelu, choice.swiglu, choice.rope, choice.cross_entropy) == \
        ("reference", "sdpa", "reference", "reference", "reference", "fused_linear")
    assert choice.adam == adam.select_adam_impl(True, "cpu")
    assert not choice.torch_compile and choice.fp8 is None


def test_cross_entropy_selection() -> None:
    """Off Transformer Engine the fused output layer + CE is chosen on any device and any TP size;
    --no-cross-entropy-fusion restores the materialised-logits path."""
    for device in ("cpu", "cuda"):
        choice = select_kernels(_config(), device, log=False)
        expected = "te" if device == "cuda" and external.te_cross_entropy_available() else "fused_linear"
        assert choice.cross_entropy == expected and choice.fuses_output_layer == (expected == "fused_linear")
    assert select_kernels(_config(cross_entropy_fusion=False), "cpu", log=False).cross_entropy == "reference"


def test_switches_force_reference_paths() -> None:
    cfg = _config(attention_backend="local", persist_layer_norm=False, bias_gelu_fusion=False, bias_swiglu_fusion=False,
                  apply_rope_fusion=False, cross_entropy_fusion=False)
    cfg.optimizer.use_fused_adam = False
    for device in ("cpu", "cuda"):
        assert select_kernels(cfg, device, log=False) == REFERENCE
    assert select_kernels(_config(attention_backend="unfused"), "cpu", log=False).attention == "unfused"
    assert select_kernels(_config(attention_backend="flash"), "cpu", log=False).attention == "sdpa(flash)"


@pytest.mark.skipif(external.te_available(), reason="checks the error without Transformer Engine")
def test_transformer_engine_and_fp8_fail_at_start_up_without_te() -> None:
    with pytest.raises(ConfigError, match="--transformer-impl transformer_engine"):
        select_kernels(_config(transformer_impl="transformer_engine"), log=False)
    cfg = _config(transformer_impl="transformer_engine", fp8_format="hybrid")
    with pytest.raises(ConfigError, match="--transformer-impl transformer_engine"):
        select_kernels(cfg, log=False)
    # fp8 on its own is refused by config validation already; the registry says why as well.
    cfg = _config()
    cfg.model.fp8_format = "e4m3"
    with pytest.raises(ConfigError, match="--fp8-format e4m3"):
        select_kernels(cfg, log=False)


@pytest.mark.skipif(not external.te_available() or external.hopper_or_newer(), reason="needs TE on a pre-Hopper GPU")
def test_fp8_needs_hopper() -> None:
    with pytest.raises(ConfigError, match="--fp8-format hybrid.*Hopper"):
        select_kernels(_config(transformer_impl="transformer_engine", fp8_format="hybrid"), log=False)


def test_selection_is_logged_once(capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    from megatron_lite.kernels import registry
    monkeypatch.setattr(registry, "_LOGGED", set())  # forget what earlier tests in this process logged
    cfg = _config(attention_backend="unfused")
    capsys.readouterr()
    line = select_kernels(cfg).describe()
    select_kernels(cfg)
    select_kernels(cfg)
    out = capsys.readouterr().out
    assert out.count("kernels: ") == 1 and line in out
    assert line.startswith("kernels: norm=") and "attention=unfused" in line


# ---- the whole model: selected kernels vs all-reference ------------------------------------------------
@pytest.mark.parametrize("style", ["gpt2", "llama"])
def test_model_with_selected_kernels_matches_reference(style: str) -> None:
    from megatron_lite.models.gpt.model import GPTModel
    extra = {} if style == "gpt2" else dict(position_embedding_type="rope", normalization="RMSNorm", swiglu=True,
                                             add_bias_linear=False, group_query_attention=True, num_query_groups=2)
    fast_cfg = _config(num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=16, hidden_dropout=0.0,
                       attention_dropout=0.0, **extra)
    ref_cfg = _config(num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=16, hidden_dropout=0.0,
                      attention_dropout=0.0, attention_backend="local", persist_layer_norm=False, bias_gelu_fusion=False,
                      bias_swiglu_fusion=False, apply_rope_fusion=False, cross_entropy_fusion=False, **extra)
    tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    results = []
    for cfg in (fast_cfg, ref_cfg):
        model = GPTModel(cfg)
        loss = model(tokens, labels=torch.roll(tokens, -1, 1)).mean()
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    # The two configurations really select different kernels (else this compares a path with itself).
    fast_choice, ref_choice = select_kernels(fast_cfg, log=False), select_kernels(ref_cfg, log=False)
    assert fast_choice.attention != ref_choice.attention == "reference"
    assert fast_choice.cross_entropy == "fused_linear" != ref_choice.cross_entropy
    torch.testing.assert_close(results[0][0], results[1][0], atol=1e-6, rtol=1e-6)
    for name, grad in results[0][1].items():
        torch.testing.assert_close(grad, results[1][1][name], atol=1e-6, rtol=1e-5, msg=name)


def test_fp8_wiring_routes_layer_gemms_through_te(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under --fp8-format every GEMM of a transformer layer (not the output layer) goes through the TE
    linear. TE is faked here by F.linear plus a call counter, so the wiring is checked on any machine."""
    from megatron_lite.models.gpt.model import GPTModel
    calls = []

    def fake_te_linear(fp8_format: str):
        def linear(x, weight, bias=None):
            calls.append(fp8_format)
            return torch.nn.functional.linear(x, weight, bias)
        return linear

    monkeypatch.setattr(external, "te_fp8_linear", fake_te_linear)
    model = GPTModel(_config(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=8, hidden_dropout=0.0,
                             attention_dropout=0.0))
    tokens = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(0))
    expected = model(tokens, labels=tokens)
    fp8 = with_impls(select_kernels(model.config, log=False), fp8="hybrid")
    for layer in model.decoder.layers.values():
        fp8.compile_layer(layer)
    torch.testing.assert_close(model(tokens, labels=tokens), expected)
    assert calls == ["hybrid"] * 8  # 2 layers x (qkv, proj, fc1, fc2); the output layer stays bf16
