"""Deferred initialisation in one process: a GPTModel built on the meta device and initialised by
DistributedDataParallel(init_device=...) is the model built whole, bit for bit (parameters, buffers, the
first loss), for every data-parallel sharding strategy (each materialises differently: in place, into the
distributed optimizer's buffer, ZeRO-3's shard) and for a MoE model (a frozen expert bias, router
buffers). A small tile grid makes every weight span several tiles. The multi-rank ZeRO-3 case is in
tests/distributed/test_zero3.py."""
import pytest
import torch

from megatron_lite.arguments import parse
from megatron_lite.distributed import DistributedDataParallel
from megatron_lite.models.gpt import GPTModel
from megatron_lite.tensor_parallel import utils

BASE = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--vocab-size", "61", "--seq-length", "8",
        "--hidden-dropout", "0", "--attention-dropout", "0", "--init-method-std", "0.5"]
CASES = {
    "no_shard": [],
    "zero1": ["--use-distributed-optimizer"],
    "zero2": ["--data-parallel-sharding-strategy", "optim_grads"],
    "zero3": ["--data-parallel-sharding-strategy", "optim_grads_params"],
    "moe_zero1": ["--use-distributed-optimizer", "--disable-bias-linear", "--num-experts", "4", "--moe-ffn-hidden-size", "16",
                  "--moe-router-enable-expert-bias", "--moe-router-score-function", "sigmoid"],
}


@pytest.mark.parametrize("case", list(CASES))
def test_deferred_model_is_the_model_built_whole(monkeypatch, case):
    monkeypatch.setattr(utils, "INIT_TILE_COLS", 8)
    monkeypatch.setattr(utils, "INIT_TILE_ELEMENTS", 64)
    cfg = parse(BASE + CASES[case], world_size=1)
    whole = DistributedDataParallel(cfg, GPTModel(cfg))
    with torch.device("meta"):
        module = GPTModel(cfg)
    deferred = DistributedDataParallel(cfg, module, init_device=torch.device("cpu"))
    assert not any(t.is_meta for t in [*module.parameters(), *module.buffers()])
    expected, got = whole.state_dict(), deferred.state_dict()
    assert got.keys() == expected.keys() and all(torch.equal(got[k], v) for k, v in expected.items())
    buffers = dict(whole.module.named_buffers())
    assert {k: torch.equal(v, buffers[k]) for k, v in module.named_buffers()} == {k: True for k in buffers}
    tokens = torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(0))
    losses = [model(tokens[:, :-1], None, None, tokens[:, 1:]).mean() for model in (whole, deferred)]
    assert torch.equal(losses[0], losses[1])
    losses[1].backward()  # the deferred parameters take gradients like any other
    assert all(p.main_grad is not None or getattr(p, "main_grad_shard", None) is not None
               for p in module.parameters() if p.requires_grad)


def test_dropped_ddp_is_freed():
    """DDP's gradient hooks live in autograd's C++ state, out of reach of Python's cycle collector: if they
    held the DDP object, every model built in a process (tests, the planner's measurements) would keep
    its buffers and its process groups' threads until exit (it did: 6 gloo threads per layout)."""
    import gc
    import weakref
    cfg = parse(BASE + CASES["zero1"], world_size=1)
    ddp = DistributedDataParallel(cfg, GPTModel(cfg))
    tokens = torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(0))
    ddp(tokens[:, :-1], None, None, tokens[:, 1:]).mean().backward()  # the hooks have run
    ref = weakref.ref(ddp)
    del ddp
    gc.collect()
    assert ref() is None
