"""tools/generate.py on HF-imported checkpoints (models built from a config, random weights).

- Greedy ids equal transformers' greedy `generate` (GPT-2 and Llama with GQA), with and without KV cache.
- --prompt TEXT goes through the checkpoint's tokenizer (copied by convert.py); --output-jsonl holds
  prompt, prompt_ids, generated_ids and generated_text.
- Sampling is reproducible per --seed; top-k 1 is greedy; generation stops at the tokenizer's eod.
"""
from __future__ import annotations

import json
import os
import sys

import model_toys
import pytest
import torch

transformers = pytest.importorskip("transformers")

sys.path.insert(0, os.path.dirname(__file__))
from test_convert_hf import load_tool, make_hf  # noqa: E402


def load_generate():
    return model_toys.load_tool("generate.py")


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def imported(request, tmp_path_factory):
    base = tmp_path_factory.mktemp(f"gen_{request.param}")
    hf_dir, ml_dir = str(base / "hf"), str(base / "ml")
    hf_model = make_hf(request.param, hf_dir)
    assert load_tool("convert").main(["--loader", "hf", "--saver", "megatron_lite", "--load-dir", hf_dir,
                                      "--save-dir", ml_dir]) == 0
    return hf_model, ml_dir


def hf_greedy(hf_model, prompt: list[int], new_tokens: int) -> list[int]:
    hf_model.generation_config.eos_token_id = None  # run the full length, like --ignore-eod
    hf_model.generation_config.pad_token_id = 0
    with torch.no_grad():
        out = hf_model.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, do_sample=False,
                                attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    return out[0, len(prompt):].tolist()


def test_greedy_matches_transformers(imported, tmp_path):
    hf_model, ml_dir = imported
    generate = load_generate()
    prompts = [[3, 14, 15, 92, 65], [7]]
    out = str(tmp_path / "out.jsonl")
    argv = ["--load", ml_dir, "--max-new-tokens", "20", "--greedy", "--ignore-eod"]
    for prompt in prompts:
        argv += ["--prompt-ids", ",".join(map(str, prompt))]
    results = generate.main(argv + ["--output-jsonl", out])
    lines = [json.loads(line) for line in open(out)]
    assert [r["generated_ids"] for r in lines] == [r["generated_ids"] for r in results]
    for prompt, result in zip(prompts, lines):
        assert result["prompt_ids"] == prompt and result["prompt"] is None
        assert result["generated_ids"] == hf_greedy(hf_model, prompt, 20)
        assert len(set(result["generated_ids"])) > 3  # a varied continuation, not one repeated token
    uncached = generate.main(argv + ["--no-kv-cache"])
    assert [r["generated_ids"] for r in uncached] == [r["generated_ids"] for r in results]


def test_text_prompt_sampling_and_eod(imported, tmp_path):
    _, ml_dir = imported
    generate = load_generate()
    from megatron_lite.data.tokenizers import HuggingFaceTokenizer
    tokenizer = HuggingFaceTokenizer(os.path.join(ml_dir, "tokenizer"))
    prompt = "w5 w17 w42"
    out = str(tmp_path / "text.jsonl")
    [greedy] = generate.main(["--load", ml_dir, "--prompt", prompt, "--max-new-tokens", "12", "--greedy",
                              "--ignore-eod", "--output-jsonl", out])
    record = json.loads(open(out).read())
    assert record["prompt"] == prompt and record["prompt_ids"] == tokenizer.tokenize(prompt) == [5, 17, 42]
    assert record["generated_text"] == tokenizer.detokenize(record["generated_ids"])
    assert record["generated_ids"] == greedy["generated_ids"] and len(greedy["generated_ids"]) == 12
    sampling = ["--load", ml_dir, "--prompt", prompt, "--max-new-tokens", "12", "--ignore-eod", "--temperature", "1.5"]
    first = generate.main(sampling + ["--seed", "1"])[0]["generated_ids"]
    assert first == generate.main(sampling + ["--seed", "1"])[0]["generated_ids"]
    others = [generate.main(sampling + ["--seed", str(s)])[0]["generated_ids"] for s in (2, 3)]
    assert any(o != first for o in others)  # 12 tokens at temperature 1.5 over 96 ids: never all equal
    top1 = generate.main(sampling + ["--top-k", "1", "--seed", "5"])[0]["generated_ids"]
    assert top1 == greedy["generated_ids"]
    nucleus = generate.main(sampling + ["--top-p", "1e-6", "--seed", "6"])[0]["generated_ids"]
    assert nucleus == greedy["generated_ids"]  # a tiny nucleus keeps only the most likely token
    # Stop at eod, forced: a copy of the tokenizer whose end-of-document token is the 4th greedy token, so
    # generation must stop right after producing it (where that token first appears).
    import shutil
    forced_dir = tmp_path / "tokenizer_eod"
    shutil.copytree(os.path.join(ml_dir, "tokenizer"), forced_dir)
    greedy_ids = greedy["generated_ids"]
    stop_token = greedy_ids[3]
    with open(forced_dir / "tokenizer_config.json", "w") as handle:
        json.dump({"eos_token": tokenizer.detokenize([stop_token]).strip()}, handle)
    assert HuggingFaceTokenizer(str(forced_dir)).eod == stop_token
    stop = generate.main(["--load", ml_dir, "--prompt", prompt, "--max-new-tokens", "12", "--greedy",
                          "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", str(forced_dir)])
    ids = stop[0]["generated_ids"]
    assert ids == greedy_ids[:greedy_ids.index(stop_token) + 1] and len(ids) < len(greedy_ids)
    # and with the checkpoint's own tokenizer, a greedy run that stops stops at its eod
    plain = generate.main(["--load", ml_dir, "--prompt", prompt, "--max-new-tokens", "12", "--greedy"])[0]["generated_ids"]
    eod = tokenizer.eod
    assert plain == (greedy_ids[:greedy_ids.index(eod) + 1] if eod in greedy_ids else greedy_ids)


def test_context_parallel_is_refused_clearly(tmp_path):
    """CP is for training: generate.py says so before touching the checkpoint or any process group."""
    with pytest.raises(SystemExit, match="--context-parallel-size 2: context parallelism is for training"):
        load_generate().main(["--load", str(tmp_path), "--prompt", "hi", "--context-parallel-size", "2"])
