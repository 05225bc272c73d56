"""Pipeline schedules on real gloo ranks with a toy stage model: every schedule's loss and every gradient
(GPipe, 1F1B, ZB-H1, interleaved, ZB-V; with and without --overlap-p2p-comm; exchanged through shared
memory, --pipeline-p2p-transport auto on one host, and through gloo, process-group)
equal the single-process run with gradient accumulation over the same micro-batches (fp32, rtol 1e-5),
tied embeddings included; memory bounds and refusal of invalid layouts before any send."""
from __future__ import annotations

import contextlib

import pytest
import torch
import torch.distributed as dist

from megatron_lite import collectives
from megatron_lite import parallel_state as ps
from megatron_lite.config import ConfigError
from megatron_lite.pipeline import allreduce_embedding_grads, build_model_chunks, get_forward_backward_func
from megatron_lite.pipeline.schedules import build_schedule
from megatron_lite.pipeline.simulator import max_in_flight
from megatron_lite.testing import run_distributed
from pipeline_toy import ToyStage, toy_config, toy_forward_step, toy_microbatches

SEQ, MBS, HIDDEN = 6, 2, 8
RTOL, ATOL = 1e-5, 1e-6


def _reference(num_layers: int, num_microbatches: int, tied: bool) -> dict:
    """One process, no groups: the whole model, gradient accumulation over the micro-batches."""
    model = ToyStage(True, True, list(range(num_layers)), hidden=HIDDEN, tied=tied)
    losses = []
    for batch in toy_microbatches(num_microbatches, MBS, SEQ):
        loss = model(batch["tokens"], batch["labels"]).mean()
        (loss / num_microbatches).backward()
        losses.append(loss.item())
    return {"losses": losses, "grads": {name: p.grad.clone() for name, p in model.named_parameters()}}


def _run_cases(pp: int, num_layers: int, cases: list[dict], tied: bool = True) -> dict:
    """On every rank: for each case (vp, schedule, m, first/last layers) build the chunks, run one step,
    and return losses, gradients by global name and the runner's memory stats."""
    rank = dist.get_rank()
    references = {}
    if rank == 0:
        for case in cases:
            references.setdefault(case["m"], _reference(num_layers, case["m"], tied))
    results = []
    current_vp = "unset"
    for case in cases:
        vp = case.get("vp")
        if vp != current_vp:
            if ps.model_parallel_is_initialized():
                ps.destroy_model_parallel()
            ps.initialize_model_parallel(1, pp, vp)
            current_vp = vp
        cfg = toy_config(num_layers, pp, vp, case.get("schedule", "auto"), HIDDEN, SEQ, MBS, num_microbatches=case["m"],
                         group_size=case.get("group"), overlap_p2p_comm=case.get("overlap", False))
        cfg.parallel.pipeline_p2p_transport = case.get("transport", "auto")  # auto: shared memory here
        cfg.parallel.decoder_first_pipeline_num_layers = case.get("first")
        cfg.parallel.decoder_last_pipeline_num_layers = case.get("last")
        groups = ps.get_process_groups()
        chunks = build_model_chunks(cfg, lambda pre, post, layers: ToyStage(pre, post, layers, hidden=HIDDEN, tied=tied),
                                    groups)
        m = case["m"]
        data = toy_microbatches(m, MBS, SEQ)
        iterators = [iter(data) for _ in chunks] if len(chunks) > 1 else iter(data)
        no_sync_calls = [0] * len(chunks)

        def no_sync_for(chunk: int):
            def no_sync():
                no_sync_calls[chunk] += 1
                return contextlib.nullcontext()
            return no_sync

        stats: dict = {}
        forward_backward = get_forward_backward_func(cfg, groups)
        scale = case.get("grad_scale", 1.0)
        losses = forward_backward(
            forward_step_func=toy_forward_step, data_iterator=iterators, model=chunks, num_microbatches=m,
            seq_length=SEQ, micro_batch_size=MBS, config=cfg, no_sync_func=[no_sync_for(c) for c in range(len(chunks))],
            finalize_model_grads_func=allreduce_embedding_grads,
            grad_scale_func=(lambda loss: loss * scale) if scale != 1.0 else None, stats=stats)
        grads = {name: p.grad.clone() / scale for chunk in chunks for name, p in chunk.named_parameters()}
        # forward_only gives the same losses and leaves gradients alone
        eval_iterators = [iter(data) for _ in chunks] if len(chunks) > 1 else iter(data)
        eval_losses = forward_backward(forward_step_func=toy_forward_step, data_iterator=eval_iterators, model=chunks,
                                       num_microbatches=m, seq_length=SEQ, micro_batch_size=MBS, config=cfg,
                                       forward_only=True)
        unchanged = all(torch.equal(p.grad / scale, grads[n]) for c in chunks for n, p in c.named_parameters())
        schedule = build_schedule(forward_backward.schedule, pp, ps.get_pipeline_model_parallel_rank(), len(chunks), m,
                                  group_size=case.get("group"))
        results.append({"case": case, "schedule": forward_backward.schedule,
                        "losses": [d["lm loss"].item() for d in losses], "eval_losses": [d["lm loss"].item() for d in eval_losses],
                        "grads": grads, "stats": stats, "no_sync_calls": no_sync_calls, "grads_unchanged": unchanged,
                        "expected_in_flight": max_in_flight(schedule)})
    return {"references": references, "results": results}


def _check(outputs: list[dict], pp: int) -> None:
    references = outputs[0]["references"]
    for rank, out in enumerate(outputs):
        for result in out["results"]:
            case, m = result["case"], result["case"]["m"]
            ref = references[m]
            label = f"rank {rank} {result['schedule']} {case}"
            loss_rank = 0 if result["schedule"] == "zbv" else pp - 1  # ZB-V's V ends on rank 0
            if rank == loss_rank:
                assert torch.allclose(torch.tensor(result["losses"]), torch.tensor(ref["losses"]), rtol=RTOL, atol=ATOL), label
                assert torch.allclose(torch.tensor(result["eval_losses"]), torch.tensor(ref["losses"]), rtol=RTOL, atol=ATOL), label
            else:
                assert result["losses"] == [] and result["eval_losses"] == [], label
            assert result["grads"], label
            for name, grad in result["grads"].items():
                # the tied copy on the last stage gets the tied weight's full gradient
                ref_name = name if name in ref["grads"] else "embedding.word_embeddings.weight"
                torch.testing.assert_close(grad, ref["grads"][ref_name], rtol=RTOL, atol=ATOL, msg=f"{label}: {name}")
            assert result["grads_unchanged"], label
            # each chunk's backwards but its last run under no_sync
            # (ZB-H1, ZB-V: its B's and its W's)
            split = 2 if result["schedule"] in ("zb-h1", "zbv") else 1
            assert result["no_sync_calls"] == [split * (m - 1)] * len(result["no_sync_calls"]), label
            stats = result["stats"]
            assert stats["max_in_flight"] == result["expected_in_flight"], label
            if result["schedule"] == "1f1b":
                assert stats["max_in_flight"] == min(pp - rank, m), label
            if result["schedule"] == "gpipe":
                assert stats["max_in_flight"] == m, label
            assert stats["deallocated"] == stats["sent"], label  # every activation sent downstream was freed
            assert stats["p2p_transport"] == ("shm" if case.get("transport", "auto") == "auto" else "process-group"), label
    # every layer's gradient was produced by exactly one rank (plus the tied copy)
    names = {n for out in outputs for r in out["results"][:1] for n in r["grads"]}
    reference_names = set(references[outputs[0]["results"][0]["case"]["m"]]["grads"])
    assert names - {"output_layer.weight"} == reference_names - {"output_layer.weight"}


def test_pp2_1f1b_gpipe_all_microbatch_counts():
    # (auto without virtual stages is ZB-H1)
    cases = [{"m": 2}, {"m": 4, "grad_scale": 4.0}, {"m": 3, "schedule": "1f1b"}, {"m": 1, "schedule": "1f1b"},
             {"m": 3}, {"m": 3, "schedule": "gpipe"},
             {"m": 4, "first": 1, "last": 3}, {"m": 3, "overlap": True}, {"m": 4, "schedule": "gpipe", "overlap": True},
             {"m": 3, "schedule": "zb-h1"}, {"m": 4, "schedule": "zb-h1", "overlap": True},
             {"m": 3, "transport": "process-group"}, {"m": 4, "schedule": "zb-h1", "overlap": True, "transport": "process-group"}]
    _check(run_distributed(_run_cases, 2, pp=2, num_layers=4, cases=cases), 2)


def test_pp2_interleaved_and_zbv():
    # m = 3, 5: not a multiple of PP (the last micro-batch group takes the remainder); group size 3
    interleaved = [{"m": 2, "vp": 2}, {"m": 4, "vp": 2}, {"m": 6, "vp": 2}, {"m": 3, "vp": 2}, {"m": 5, "vp": 2},
                   {"m": 7, "vp": 2, "group": 3}, {"m": 5, "vp": 2, "overlap": True}, {"m": 2, "vp": 2, "overlap": True}]
    # ZB-V (auto's pick at VP 2): m = PP, odd, below the pattern's 2 PP - 1; tied embeddings local on rank 0
    cases = [{**case, "schedule": "interleaved"} for case in interleaved] + \
        [{"m": 2, "vp": 2}, {"m": 3, "vp": 2, "schedule": "zbv"}, {"m": 1, "vp": 2, "schedule": "zbv"},
         {"m": 5, "vp": 2, "schedule": "zbv", "overlap": True}, {"m": 2, "vp": 2, "schedule": "zbv", "overlap": True},
         {"m": 3, "vp": 2, "schedule": "zbv", "overlap": True, "transport": "process-group"}]
    _check(run_distributed(_run_cases, 2, pp=2, num_layers=4, cases=cases), 2)


def test_pp4_1f1b_interleaved_uneven():
    cases = [{"m": 4}, {"m": 8, "schedule": "1f1b"}, {"m": 5}, {"m": 5, "schedule": "1f1b"}, {"m": 4, "vp": 2, "schedule": "interleaved"},
             {"m": 8, "vp": 2, "schedule": "interleaved"}, {"m": 5, "first": 1, "last": 3},
             {"m": 6, "vp": 2, "schedule": "interleaved"}, {"m": 9, "vp": 2, "group": 4, "schedule": "interleaved"},
             {"m": 5, "overlap": True}, {"m": 7, "vp": 2, "overlap": True, "schedule": "interleaved"},
             {"m": 5, "schedule": "zb-h1", "overlap": True},
             {"m": 4, "vp": 2, "schedule": "zbv"}, {"m": 6, "vp": 2}, {"m": 5, "vp": 2, "schedule": "zbv", "overlap": True},
             {"m": 7, "vp": 2, "overlap": True, "schedule": "interleaved", "transport": "process-group"}]
    _check(run_distributed(_run_cases, 4, pp=4, num_layers=8, cases=cases), 4)


@pytest.mark.slow
def test_pp4_sweep_slow():
    cases = [{"m": m} for m in (1, 2, 3, 6, 7, 16)] + [{"m": m, "schedule": "1f1b"} for m in (2, 7)] + \
            [{"m": m, "vp": 2, "schedule": "interleaved"} for m in (12, 16, 7, 11)] + \
            [{"m": m, "vp": 2, "schedule": "zbv", "overlap": overlap} for m in (1, 3, 7, 8, 13) for overlap in (False, True)] + \
            [{"m": 5, "schedule": "gpipe"}, {"m": 8, "vp": 4}, {"m": 5, "vp": 4}, {"m": 13, "vp": 2, "group": 5, "schedule": "interleaved"}] + \
            [{"m": m, "overlap": True} for m in (1, 4, 8)] + [{"m": m, "vp": 2, "overlap": True, "schedule": "interleaved"} for m in (4, 9)] + \
            [{"m": 6, "schedule": "gpipe", "overlap": True}, {"m": 11, "vp": 2, "group": 5, "overlap": True, "schedule": "interleaved"}]
    _check(run_distributed(_run_cases, 4, pp=4, num_layers=16, cases=cases), 4)


def _untied_pp2() -> dict:
    return _run_cases(2, 4, [{"m": 3}], tied=False)


def test_untied_embeddings_pp2():
    outputs = run_distributed(_untied_pp2, 2)
    _check(outputs, 2)
    assert "output_layer.weight" in outputs[1]["results"][0]["grads"]


def _refuse_interleaving_with_too_few_microbatches() -> dict:
    ps.initialize_model_parallel(1, 2, 2)
    cfg = toy_config(4, 2, 2, "interleaved", HIDDEN, SEQ, MBS, num_microbatches=3, group_size=3)
    groups = ps.get_process_groups()
    chunks = build_model_chunks(cfg, lambda pre, post, layers: ToyStage(pre, post, layers, hidden=HIDDEN), groups)
    collectives.reset_comm_stats()
    try:
        get_forward_backward_func(cfg, groups)(forward_step_func=toy_forward_step, data_iterator=[iter([])] * 2, model=chunks,
                                       num_microbatches=2, seq_length=SEQ, micro_batch_size=MBS, config=cfg)
    except ConfigError as error:
        return {"error": str(error), "p2p_bytes": collectives.bytes_for("send") + collectives.bytes_for("recv")}
    return {"error": None}


def test_invalid_microbatch_count_refused_before_any_send():
    for out in run_distributed(_refuse_interleaving_with_too_few_microbatches, 2):
        assert out["error"] and "at least --microbatch-group-size-per-virtual-pipeline-stage 3" in out["error"]
        assert out["p2p_bytes"] == 0
