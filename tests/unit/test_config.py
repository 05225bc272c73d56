"""Every cross-field rule of config.validate(): the error names the flag, the values and a fix."""
import pytest

from megatron_lite.arguments import build_parser, parse
from megatron_lite.config import ConfigError

BASE = ["--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "8", "--seq-length", "32",
        "--micro-batch-size", "2"]


def cfg(*flags, world=8):
    return parse(BASE + list(flags), world_size=world)


def test_defaults_and_derived_fields():
    c = cfg("--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2")
    assert c.data_parallel_size == 2
    assert c.training.global_batch_size == 4 and c.num_microbatches == 1
    assert c.model.ffn_hidden_size == 256 and c.model.num_query_groups == 8
    assert c.model.max_position_embeddings == 32
    c = cfg("--swiglu", "--hidden-size", "192", "--num-attention-heads", "4")
    assert c.model.ffn_hidden_size == int((4 * 192 * 2 / 3) / 64) * 64
    c = cfg("--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1",
            "--global-batch-size", "16")
    assert c.parallel.virtual_pipeline_model_parallel_size == 2


def test_sharding_strategy_and_its_alias():
    assert cfg().parallel.data_parallel_sharding_strategy == "no_shard"
    c = cfg("--use-distributed-optimizer")
    assert c.parallel.data_parallel_sharding_strategy == "optim" and c.parallel.sharding_strategy == "optim"
    for strategy in ("optim", "optim_grads", "optim_grads_params"):
        c = cfg("--data-parallel-sharding-strategy", strategy)
        assert c.parallel.use_distributed_optimizer and c.parallel.sharding_strategy == strategy
        assert c.parallel.shards_grads == (strategy != "optim")
    c = cfg("--data-parallel-sharding-strategy", "optim_grads_params", "--context-parallel-size", "2",
            "--attention-dropout", "0", "--overlap-param-gather")  # ZeRO-3 with CP (the layout matrix runs it)
    assert c.parallel.overlap_param_gather and c.parallel.sharding_strategy == "optim_grads_params"
    c = cfg("--data-parallel-sharding-strategy", "optim_grads", "--use-distributed-optimizer", "--overlap-param-gather")
    assert c.parallel.overlap_param_gather and c.parallel.shards_grads
    assert any("--use-distributed-optimizer turned on" in n for n in cfg("--data-parallel-sharding-strategy", "optim_grads").notes)
    with pytest.raises(SystemExit):  # argparse refuses an unknown strategy, listing the choices
        cfg("--data-parallel-sharding-strategy", "zero2")


def test_context_parallel_configurations_validate():
    c = cfg("--context-parallel-size", "2", "--tensor-model-parallel-size", "2", "--sequence-parallel", "--attention-dropout", "0")
    assert c.parallel.cp_comm_type == "p2p" and c.data_parallel_size == 2
    c = cfg("--context-parallel-size", "4", "--cp-comm-type", "a2a", "--attention-dropout", "0.1")
    assert c.parallel.cp_comm_type == "a2a" and c.data_parallel_size == 2


@pytest.mark.parametrize("flags,world,needle", [
    (["--tensor-model-parallel-size", "3"], 8, "--tensor-model-parallel-size/--pipeline-model-parallel-size"),
    (["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "8"], 8, "not divisible by TP x PP x CP"),
    (["--context-parallel-size", "3"], 6, "--context-parallel-size: --seq-length 32 is not divisible by 2 x CP"),
    (["--num-attention-heads", "6", "--hidden-size", "60", "--tensor-model-parallel-size", "4"], 8, "--num-attention-heads"),
    (["--group-query-attention", "--num-query-groups", "2", "--tensor-model-parallel-size", "4"], 8, "query groups are not divisible"),
    (["--group-query-attention"], 8, "--num-query-groups: is required"),
    (["--group-query-attention", "--num-query-groups", "3"], 8, "not divisible by 3 query groups"),
    (["--num-query-groups", "2"], 8, "without --group-query-attention"),
    (["--pipeline-model-parallel-size", "8", "--num-layers", "4"], 8, "--num-layers: 4 layers are not divisible"),
    (["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "3"], 8, "--num-layers-per-virtual-pipeline-stage"),
    (["--num-layers-per-virtual-pipeline-stage", "1"], 8, "needs --pipeline-model-parallel-size > 1"),
    (["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "0"], 8,
     "--num-layers-per-virtual-pipeline-stage: must be at least 1, got 0"),
    (["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1", "--global-batch-size", "24",
      "--microbatch-group-size-per-virtual-pipeline-stage", "8"], 8,
     "needs at least --microbatch-group-size-per-virtual-pipeline-stage 8 micro-batches"),
    (["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1",
      "--microbatch-group-size-per-virtual-pipeline-stage", "1"], 8, "--microbatch-group-size-per-virtual-pipeline-stage: 1 is smaller"),
    (["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1", "--pipeline-schedule", "zb-h1"],
     8, "--pipeline-schedule zb-h1: does not support virtual stages"),
    (["--global-batch-size", "10"], 8, "--global-batch-size: 10 is not divisible by --micro-batch-size x DP"),
    (["--tensor-model-parallel-size", "4", "--sequence-parallel", "--seq-length", "30"], 8, "--sequence-parallel"),
    (["--fp16", "--bf16"], 8, "--fp16/--bf16: both given"),
    (["--loss-scale", "128"], 8, "--loss-scale: only applies with --fp16"),
    (["--hidden-dropout", "1.5"], 8, "--hidden-dropout"),
    (["--recompute-granularity", "full"], 8, "--recompute-method: is required"),
    (["--recompute-method", "uniform"], 8, "only applies with --recompute-granularity full"),
    (["--overlap-param-gather"], 8, "needs --use-distributed-optimizer"),
    (["--train-iters", "5", "--train-samples", "10"], 8, "both given"),
    (["--expert-model-parallel-size", "3"], 8, "--expert-model-parallel-size"),
    (["--tokenizer-type", "SentencePieceTokenizer"], 8, "--tokenizer-model: is required"),
    (["--tokenizer-type", "GPT2BPETokenizer"], 8, "--vocab-file/--merge-file"),
    (["--split", "a,b"], 8, "--split"),
    (["--position-embedding-type", "learned_absolute", "--max-position-embeddings", "16"], 8, "--max-position-embeddings"),
    (["--fp8-format", "hybrid"], 8, "--fp8-format"),
    (["--train-iters", "4", "--lr-warmup-iters", "4"], 8, "--lr-warmup-iters"),
    (["--context-parallel-size", "2", "--tensor-model-parallel-size", "2", "--sequence-parallel", "--seq-length", "36"], 8,
     "--context-parallel-size: --seq-length 36 is not divisible by 2 x CP x TP"),
    (["--context-parallel-size", "4", "--cp-comm-type", "a2a", "--num-attention-heads", "6", "--hidden-size", "48"], 8,
     "--cp-comm-type: a2a splits each TP rank's 6 attention heads"),
    (["--expert-model-parallel-size", "2"], 8, "set without --num-experts"),
    # Mixture of experts: refused before any process group exists.
    (["--num-experts", "6", "--expert-model-parallel-size", "4", "--disable-bias-linear"], 8,
     "--num-experts: 6 experts are not divisible by --expert-model-parallel-size 4"),
    (["--num-experts", "4", "--moe-router-topk", "5", "--disable-bias-linear"], 8, "--moe-router-topk: 5 is more than --num-experts 4"),
    (["--num-experts", "8", "--expert-model-parallel-size", "8", "--expert-tensor-parallel-size", "2",
      "--disable-bias-linear"], 8, "world size 8 is not divisible by ETP x EP x PP = 2 x 8 x 1"),
    (["--num-experts", "8", "--expert-model-parallel-size", "4", "--pipeline-model-parallel-size", "4",
      "--disable-bias-linear"], 8, "not divisible by ETP x EP x PP = 1 x 4 x 4"),
    (["--num-experts", "4", "--tensor-model-parallel-size", "2", "--disable-bias-linear"], 8, "needs --sequence-parallel"),
    (["--num-experts", "4"], 8, "Add --disable-bias-linear"),
    (["--num-experts", "4", "--disable-bias-linear", "--expert-model-parallel-size", "2", "--moe-expert-capacity-factor",
      "1", "--moe-pad-expert-input-to-capacity"], 8, "the allgather dispatcher does not pad"),
    (["--num-experts", "8", "--disable-bias-linear", "--moe-router-num-groups", "3", "--moe-router-group-topk", "1"], 8,
     "--moe-router-num-groups: 3 groups"),
    (["--num-experts", "4", "--disable-bias-linear", "--moe-layer-freq", "[1]*3", "--num-layers", "2"], 8, "--moe-layer-freq"),
    (["--num-experts", "4", "--disable-bias-linear", "--moe-router-enable-expert-bias"], 8, "needs --moe-router-score-function sigmoid"),
    (["--num-experts", "4", "--disable-bias-linear", "--moe-ffn-hidden-size", "33", "--expert-tensor-parallel-size", "2"], 8,
     "--moe-ffn-hidden-size: 33 is not divisible by --expert-tensor-parallel-size 2"),
    (["--moe-shared-expert-intermediate-size", "64"], 8, "needs --num-experts"),
    (["--num-experts", "4", "--disable-bias-linear", "--data-parallel-sharding-strategy", "optim_grads_params"], 8,
     "optim_grads_params (ZeRO-3) with --num-experts"),
    (["--decoder-first-pipeline-num-layers", "1"], 8, "needs --pipeline-model-parallel-size > 1"),
    (["--pipeline-model-parallel-size", "2", "--decoder-first-pipeline-num-layers", "5"], 8, "do not add up"),
    (["--use-distributed-optimizer", "--data-parallel-sharding-strategy", "no_shard"], 8,
     "--data-parallel-sharding-strategy: no_shard contradicts --use-distributed-optimizer"),
    # ZeRO-3 with layouts it cannot support: named flag, before any process group exists
    (["--data-parallel-sharding-strategy", "optim_grads_params", "--torch-compile"], 8,
     "--data-parallel-sharding-strategy: optim_grads_params (ZeRO-3) with --torch-compile"),
    (["--data-parallel-sharding-strategy", "optim_grads_params", "--transformer-impl", "transformer_engine"], 8,
     "--data-parallel-sharding-strategy: optim_grads_params (ZeRO-3) with --transformer-impl transformer_engine"),
    (["--optimizer-cpu-offload", "--optimizer-offload-fraction", "1.5"], 8, "--optimizer-offload-fraction: 1.5 is outside [0, 1]"),
    (["--optimizer-cpu-offload", "--optimizer-offload-fraction", "-0.1"], 8, "--optimizer-offload-fraction: -0.1"),
    (["--optimizer-cpu-offload", "--optimizer", "sgd"], 8, "--optimizer-cpu-offload: steps Adam on the host"),
])
def test_invalid_configurations_fail_with_named_flag(flags, world, needle):
    with pytest.raises(ConfigError) as info:
        cfg(*flags, world=world)
    message = str(info.value)
    assert needle in message, message
    assert "." in message  # a sentence with a fix follows the problem


def test_moe_parallel_folding_and_layer_pattern():
    # EP need not divide DP: TP 2 x DP 2 for attention, ETP 1 x EP 4 for experts, on 4 ranks.
    c = cfg("--num-experts", "8", "--tensor-model-parallel-size", "2", "--sequence-parallel", "--expert-model-parallel-size",
            "4", "--expert-tensor-parallel-size", "1", "--disable-bias-linear", "--num-layers", "4", "--moe-layer-freq",
            "[0]+[1]*3", world=4)
    assert c.parallel.expert_tp_size == 1 and c.moe.layer_pattern(4) == [0, 1, 1, 1]
    assert c.moe.moe_ffn_hidden_size == c.model.ffn_hidden_size  # megatron-core's default
    assert cfg("--num-experts", "4", "--disable-bias-linear", "--moe-layer-freq", "2", "--num-layers", "4",
               world=1).moe.layer_pattern(4) == [1, 0, 1, 0]
    assert cfg("--num-experts", "4", "--tensor-model-parallel-size", "2", "--sequence-parallel", "--disable-bias-linear",
               world=2).parallel.expert_tp_size == 2  # ETP defaults to TP


def test_uneven_first_last_stage_layers_are_accepted():
    c = cfg("--pipeline-model-parallel-size", "4", "--num-layers", "6", "--decoder-first-pipeline-num-layers", "1",
            "--decoder-last-pipeline-num-layers", "1", world=8)
    assert c.parallel.decoder_first_pipeline_num_layers == 1


def test_yaml_config_and_flag_override(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  num_layers: 6\n  hidden-size: 96\nparallel:\n  tensor_model_parallel_size: 2\n"
                    "lr: 0.003\nbf16: true\n")
    c = parse(["--config", str(path), "--num-attention-heads", "4", "--num-layers", "2"], world_size=4)
    assert c.model.num_layers == 2          # flag overrides YAML
    assert c.model.hidden_size == 96        # YAML overrides default
    assert c.parallel.tensor_model_parallel_size == 2 and c.optimizer.lr == 0.003 and c.optimizer.bf16
    bad = tmp_path / "bad.yaml"
    bad.write_text("num_layerz: 3\n")
    with pytest.raises(ConfigError, match="unknown key 'num_layerz'"):
        parse(["--config", str(bad)], world_size=1)


def test_megatron_flag_spellings_exist():
    flags = set(build_parser()._option_string_actions)
    for flag in ["--tensor-model-parallel-size", "--pipeline-model-parallel-size", "--num-layers-per-virtual-pipeline-stage",
                 "--context-parallel-size", "--expert-model-parallel-size", "--sequence-parallel", "--use-distributed-optimizer",
                 "--num-layers", "--hidden-size", "--ffn-hidden-size", "--num-attention-heads", "--group-query-attention",
                 "--num-query-groups", "--seq-length", "--max-position-embeddings", "--position-embedding-type", "--normalization",
                 "--swiglu", "--disable-bias-linear", "--untie-embeddings-and-output-weights", "--hidden-dropout",
                 "--attention-dropout", "--init-method-std", "--make-vocab-size-divisible-by", "--micro-batch-size",
                 "--global-batch-size", "--train-iters", "--lr", "--min-lr", "--lr-decay-style", "--lr-warmup-iters",
                 "--weight-decay", "--clip-grad", "--adam-beta1", "--adam-beta2", "--adam-eps", "--bf16", "--fp16",
                 "--loss-scale", "--seed", "--distributed-backend", "--distributed-timeout-minutes", "--config"]:
        assert flag in flags, flag
    c = cfg("--disable-bias-linear")
    assert c.model.add_bias_linear is False


def test_config_round_trips_through_dict():
    from megatron_lite.config import Config
    c = cfg("--tensor-model-parallel-size", "2", "--bf16")
    again = Config.from_dict(c.to_dict())
    assert again == c


def test_derived_changes_to_user_values_are_reported_not_silent(capsys):
    c = cfg("--sequence-parallel")  # TP = 1: nothing to split
    assert c.parallel.sequence_parallel is False
    assert any("--sequence-parallel turned off" in note for note in c.notes)
    assert "note: --sequence-parallel turned off" in capsys.readouterr().err
    c = cfg("--pipeline-model-parallel-size", "2", "--num-virtual-stages-per-pipeline-rank", "1")
    assert c.parallel.virtual_pipeline_model_parallel_size is None
    assert any("no interleaving" in note for note in c.notes)
    assert cfg().notes == []


def test_sections_validate_themselves_and_derive_defaults_is_separate():
    from megatron_lite.config import Config
    c = Config(world_size=8)
    c.model.num_attention_heads, c.model.hidden_size = 8, 64
    notes = c.derive_defaults()  # fills, checks nothing
    assert notes == [] and c.model.ffn_hidden_size == 256 and c.training.global_batch_size == 8
    c.parallel.tensor_model_parallel_size = 3
    with pytest.raises(ConfigError, match="world size 8 is not divisible"):
        c.parallel.validate(c)
    c.parallel.tensor_model_parallel_size = 16
    with pytest.raises(ConfigError, match="--num-attention-heads: 8 heads are not divisible"):
        c.model.validate(c)


def test_inference_and_conversion_drop_training_only_sharding_and_offload(tmp_path, monkeypatch):
    """A ZeRO-2 + NVMe-offload training config, read back from a checkpoint, neither re-enables the
    distributed optimizer for inference nor checks a scratch directory of the training machine."""
    import types
    from megatron_lite import inference
    from tools.checkpoint.convert import target_config
    trained = cfg("--data-parallel-sharding-strategy", "optim_grads", "--optimizer-cpu-offload",
                  "--optimizer-nvme-offload-dir", str(tmp_path / "nvme"), "--vocab-size", "128", world=2)
    values = trained.to_dict()
    (tmp_path / "a_file").write_text("")  # another machine's scratch path, unusable here (under a file)
    values["optimizer"]["optimizer_nvme_offload_dir"] = str(tmp_path / "a_file" / "x")
    monkeypatch.setattr(inference, "CheckpointReader", lambda load_dir: types.SimpleNamespace(config=values))
    infer = inference.inference_config(str(tmp_path))
    assert infer.parallel.sharding_strategy == "no_shard" and not infer.parallel.use_distributed_optimizer
    assert not infer.optimizer.optimizer_cpu_offload and infer.optimizer.optimizer_nvme_offload_dir is None
    converted = target_config(values, 1, 1, None)
    assert converted["optimizer"]["optimizer_nvme_offload_dir"] is None
    assert converted["parallel"]["data_parallel_sharding_strategy"] == "optim_grads"


def test_nan_check_flags_megatron_spelling_both_forms():
    assert parse([]).training.check_for_nan_in_loss_and_grad is True  # on by default, as in Megatron
    assert parse(["--no-check-for-nan-in-loss-and-grad"]).training.check_for_nan_in_loss_and_grad is False
    assert parse(["--check-for-nan-in-loss-and-grad"]).training.check_for_nan_in_loss_and_grad is True
    assert parse([]).training.on_nan == "exit" and parse(["--on-nan", "skip"]).training.on_nan == "skip"
    with pytest.raises(SystemExit):
        parse(["--on-nan", "ignore"])
