"""Megatron-LM checkpoints in and out (tools/checkpoint/convert.py --loader/--saver megatron), against
megatron-core itself (skipped when it is not installed: `pip install --no-deps megatron-core psutil`).

- megatron-core GPTModels (GPT-2 style: tied, learned positions, LayerNorm, biases; Llama style: RoPE,
  RMSNorm, SwiGLU, GQA, q/k layer norm, untied) at TP 2 x PP 2 on gloo, saved as Megatron-LM saves them in both formats
  (torch: per-rank model_optim_rng.pt with an args Namespace; torch_dist: megatron.core.dist_checkpointing),
- converted to megatron_lite by convert.py in a process where megatron-core cannot be imported,
- give in megatron_lite at TP 2 x PP 2 the same logits (fp32, atol 1e-4) and the same greedy tokens;
  both formats give exactly the same canonical tensors;
- and the reverse: --saver megatron at TP 2 x PP 2 writes per-rank files that megatron-core's
  GPTModel.load_state_dict(strict=True) accepts, with the same logits and greedy tokens, and every
  weight equal to the original's (the vocabulary padding rows aside, which megatron_lite zeroes).
Plus virtual-stage files (model0/model1) through our writer and reader, and the bad-input errors.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

import pytest
import torch

from megatron_lite.checkpoint_io import CheckpointError, CheckpointReader
from megatron_lite.config import ConfigError
from megatron_lite.testing import run_distributed

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
LOGIT_TOL = dict(rtol=0, atol=1e-4)
STYLES = ("gpt2", "llama")


def convert_without_megatron_core(*runs: list[str]) -> subprocess.CompletedProcess:
    """Run convert.py once per argument list in one fresh interpreter where `import megatron` fails."""
    code = ("import sys, runpy; sys.modules['megatron'] = None\n"
            f"for argv in {[list(r) for r in runs]!r}:\n"
            "    sys.argv = ['convert.py'] + argv\n"
            "    try:\n"
            "        runpy.run_path('tools/checkpoint/convert.py', run_name='__main__')\n"
            "    except SystemExit as exit:\n"
            "        if exit.code: raise\n")
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600)


def _megatron_lite_outputs(directories: dict) -> dict:
    from megatron_lite import parallel_state as ps
    from megatron_lite.inference import broadcast_from_last_stage, generate, inference_config, load_model, pipeline_forward
    import megatron_core_toys as toys
    ps.initialize_model_parallel(tensor_model_parallel_size=2, pipeline_model_parallel_size=2)
    out = {}
    for key, directory in directories.items():
        model = load_model(inference_config(directory, tp=2, pp=2))
        with torch.no_grad():
            logits = pipeline_forward(model, torch.tensor([toys.PROMPT]), torch.arange(len(toys.PROMPT))[None])
        logits = broadcast_from_last_stage(logits[0].contiguous() if logits is not None
                                           else torch.empty(len(toys.PROMPT), toys.VOCAB))
        out[key] = {"logits": logits, "greedy": generate(model, toys.PROMPT, toys.NEW_TOKENS)}
    return out


def _reference(directories: dict) -> dict:
    import megatron_core_toys as toys
    return {style: toys.save_reference(style, 2, 2, torch_dir, dist_dir)
            for style, (torch_dir, dist_dir) in directories.items()}


def _load_ours(directories: dict) -> dict:
    import megatron_core_toys as toys
    return {style: toys.load_ours(style, 2, 2, directory) for style, directory in directories.items()}


@pytest.fixture(scope="module")
def megatron_checkpoints(tmp_path_factory):
    pytest.importorskip("megatron.core", reason="megatron-core not installed (pip install --no-deps megatron-core)")
    pytest.importorskip("psutil", reason="megatron-core's dist_checkpointing needs psutil")
    base = tmp_path_factory.mktemp("megatron_lm")
    directories = {style: (str(base / f"{style}_torch"), str(base / f"{style}_dist")) for style in STYLES}
    ranks = run_distributed(_reference, 4, timeout=600, directories=directories)
    out = {}
    for style, (torch_dir, dist_dir) in directories.items():
        reference = ranks[0][style]
        assert all(r[style]["greedy"] == reference["greedy"] for r in ranks)
        assert len(set(reference["greedy"])) > 2  # varied continuation: a meaningful comparison
        out[style] = {"torch": torch_dir, "dist": dist_dir, "reference": reference,
                      "states": {i: r[style]["state"] for i, r in enumerate(ranks)}}
    return base, out


def test_megatron_lm_to_megatron_lite_and_back(megatron_checkpoints):
    base, checkpoints = megatron_checkpoints
    converted = {(style, fmt): str(base / f"{style}_{fmt}_ml") for style in STYLES for fmt in ("torch", "dist")}
    back = {style: str(base / f"{style}_back") for style in STYLES}
    runs = [["--loader", "megatron" if fmt == "torch" else "mcore", "--saver", "megatron_lite", "--load-dir",
             checkpoints[style][fmt], "--save-dir", target, "--target-tensor-parallel-size", "2"]
            for (style, fmt), target in converted.items()]
    # The reverse: megatron_lite -> Megatron-LM torch format at TP 2 x PP 2.
    runs += [["--loader", "megatron_lite", "--saver", "megatron", "--load-dir", converted[(style, "torch")],
              "--save-dir", target, "--target-tensor-parallel-size", "2", "--target-pipeline-parallel-size", "2"]
             for style, target in back.items()]
    result = convert_without_megatron_core(*runs)
    assert result.returncode == 0, result.stderr
    for style, info in checkpoints.items():
        # Both Megatron-LM formats hold the same model: identical canonical tensors.
        torch_reader, dist_reader = CheckpointReader(converted[(style, "torch")]), CheckpointReader(converted[(style, "dist")])
        assert torch_reader.param_names() == dist_reader.param_names()
        for name in torch_reader.param_names():
            assert torch.equal(torch_reader.full_tensor(name), dist_reader.full_tensor(name)), name
        assert torch_reader.config["model"]["vocab_size"] == 60  # NullTokenizer --vocab-size 59 + eod
        assert torch_reader.iteration == 7
        assert torch_reader.config["model"]["group_query_attention"] == (style == "llama")

    outputs = run_distributed(_megatron_lite_outputs, 4, timeout=600,
                              directories={f"{s}_{f}": d for (s, f), d in converted.items()})
    for rank_outputs in outputs:
        for (style, fmt) in converted:
            reference = checkpoints[style]["reference"]
            ours = rank_outputs[f"{style}_{fmt}"]
            torch.testing.assert_close(ours["logits"], reference["logits"], **LOGIT_TOL)
            assert ours["greedy"] == reference["greedy"], (style, fmt)

    # megatron-core loads what --saver megatron wrote.
    ranks = run_distributed(_load_ours, 4, timeout=600, directories=back)
    for style, info in checkpoints.items():
        target = back[style]
        for rank_loaded in ranks:
            loaded = rank_loaded[style]
            assert loaded["missing"] == [] and loaded["unexpected"] == []
            assert loaded["args_tp"] == 2 and loaded["padded"] == 64
            torch.testing.assert_close(loaded["logits"], info["reference"]["logits"], **LOGIT_TOL)
            assert loaded["greedy"] == info["reference"]["greedy"]
        # Per rank, every tensor equals the original Megatron-LM file's (vocabulary padding rows aside).
        for rank, original in info["states"].items():
            tp_rank, pp_rank = rank % 2, rank // 2
            written = torch.load(os.path.join(target, "iter_0000007", f"mp_rank_{tp_rank:02d}_{pp_rank:03d}",
                                              "model_optim_rng.pt"), weights_only=False)["model"]
            assert set(written) == set(original) | {k for k in written if k.endswith("_extra_state")}
            for key, tensor in original.items():
                if key in ("embedding.word_embeddings.weight", "output_layer.weight"):
                    real = 60 - 32 * tp_rank  # rows of this rank's vocabulary shard that are real tokens
                    tensor, mine = tensor[:real], written[key][:real]
                else:
                    mine = written[key]
                assert torch.equal(mine, tensor), (style, rank, key)


def _toy_megatron_lite(directory: str, style: str = "llama") -> None:
    """A small megatron_lite checkpoint (no megatron-core needed)."""
    from model_toys import tiny_config, write_model_checkpoint
    write_model_checkpoint(directory, tiny_config(style, vocab=50, seq=16), 3)


@pytest.mark.parametrize("style", STYLES)
def test_virtual_stages_round_trip(tmp_path, style):
    """--saver megatron with VP writes model0/model1 with layer numbers restarting per chunk; reading them
    back gives every tensor exactly (no megatron-core needed)."""
    from megatron_lite.megatron_lm import MegatronCheckpointReader
    sys.path.insert(0, os.path.join(ROOT, "tools", "checkpoint"))
    import convert
    src, out, back = str(tmp_path / "ml"), str(tmp_path / "mlm"), str(tmp_path / "ml2")
    _toy_megatron_lite(src, style)
    assert convert.main(["--loader", "megatron_lite", "--saver", "megatron", "--load-dir", src, "--save-dir", out,
                         "--target-tensor-parallel-size", "2", "--target-pipeline-parallel-size", "2",
                         "--target-virtual-pipeline-parallel-size", "2"]) == 0
    blob = torch.load(os.path.join(out, "iter_0000003", "mp_rank_01_001", "model_optim_rng.pt"), weights_only=False)
    assert sorted(k for k in blob if k.startswith("model")) == ["model0", "model1"]
    # PP 2 x VP 2 over 4 layers: rank 1 holds global layers 1 (chunk 0) and 3 (chunk 1), each as local layer 0.
    assert {k.split(".")[2] for k in blob["model1"] if k.startswith("decoder.layers.")} == {"0"}
    assert "output_layer.weight" in blob["model1"]  # the last stage: untied output layer, or the tied copy
    reader = MegatronCheckpointReader(out, vocab_size=50)
    original = CheckpointReader(src)
    for name in original.param_names():
        assert torch.equal(reader.full_tensor(name), original.full_tensor(name)), name
    assert convert.main(["--loader", "mcore", "--saver", "megatron_lite", "--load-dir", out, "--save-dir", back,
                         "--true-vocab-size", "50"]) == 0
    assert CheckpointReader(back).config["model"]["vocab_size"] == 50


def test_bad_megatron_inputs(tmp_path, capsys):
    from megatron_lite.megatron_lm import MegatronCheckpointReader, config_from_args
    sys.path.insert(0, os.path.join(ROOT, "tools", "checkpoint"))
    import convert
    src, out = str(tmp_path / "ml"), str(tmp_path / "mlm")
    _toy_megatron_lite(src, "gpt2")
    assert convert.main(["--loader", "megatron_lite", "--saver", "megatron", "--load-dir", src, "--save-dir", out]) == 0
    path = os.path.join(out, "iter_0000003", "mp_rank_00", "model_optim_rng.pt")
    good = torch.load(path, weights_only=False)

    def rewrite(blob):
        torch.save(blob, path)

    rewrite({k: v for k, v in good.items() if k != "args"})  # missing args
    with pytest.raises(CheckpointError, match=r"no 'args' \(found keys \['checkpoint_version', 'iteration', 'model'"):
        MegatronCheckpointReader(out)
    rewrite({"args": good["args"], "iteration": 3, "optimizer": {"state": {}}})  # optimizer state only
    with pytest.raises(CheckpointError, match=r"no model weights.*found keys \['args', 'iteration', 'optimizer'\].*optimizer-only"):
        MegatronCheckpointReader(out)
    bert = dict(good["model"], **{"lm_head.dense.weight": torch.zeros(2, 2), "binary_head.weight": torch.zeros(2, 2)})
    rewrite(dict(good, model=bert))  # another model type's weights
    with pytest.raises(CheckpointError, match=r"unexpected \['binary_head.weight', 'lm_head.dense.weight'\]"):
        MegatronCheckpointReader(out)
    args = argparse.Namespace(**vars(good["args"]))
    args.num_experts = 8
    with pytest.raises(ConfigError, match="num_experts=8 .mixture-of-experts"):
        config_from_args(args)
    args = argparse.Namespace(**vars(good["args"]))
    args.position_embedding_type = "yarn"
    with pytest.raises(ConfigError, match="position_embedding_type='yarn'"):
        config_from_args(args)
    # GPT-2 style args carry num_query_groups=1 with group_query_attention=False: multi-head attention.
    args = argparse.Namespace(**vars(good["args"]))
    args.num_query_groups, args.group_query_attention = 1, False
    assert config_from_args(args).model.num_query_groups == args.num_attention_heads
    # Through the tool: a clear message on stderr, exit status 2.
    rewrite({"iteration": 3, "model": good["model"]})
    assert convert.main(["--loader", "megatron", "--saver", "megatron_lite", "--load-dir", out,
                         "--save-dir", str(tmp_path / "x")]) == 2
    assert "no 'args'" in capsys.readouterr().err
    assert convert.main(["--loader", "megatron", "--saver", "megatron_lite", "--load-dir", src,
                         "--save-dir", str(tmp_path / "x")]) == 2
    assert "a megatron_lite checkpoint, not a Megatron-LM one" in capsys.readouterr().err
    assert convert.main(["--loader", "megatron", "--saver", "megatron_lite", "--load-dir", out, "--ckpt-format",
                         "torch_dist", "--save-dir", str(tmp_path / "x")]) == 2
    assert "this is a torch checkpoint" in capsys.readouterr().err
