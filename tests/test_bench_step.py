"""scripts/bench_step.py's floor: the kernels it replays are all of the step's matrix products
and attention (what the floor claims no rewrite of the step would remove)."""

import importlib.util

import torch
from torch.utils.flop_counter import FlopCounterMode

from tests.conftest import ROOT


def _bench_step():
    spec = importlib.util.spec_from_file_location("bench_step", ROOT / "scripts" / "bench_step.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_floor_replays_every_matrix_product_and_attention_of_a_step(smoke_cfg):
    bench = _bench_step()
    timed = bench.Timed(smoke_cfg, "smoke", "fp32", torch.device("cpu"), warmup=0)
    recorder = bench._Recorder()
    with recorder, FlopCounterMode(display=False) as counter:
        timed.engine.train_step(timed.batch, diagnostics=False)
    # torch counts the products' FLOPs (not those of the CPU's flash attention kernels)
    counted = counter.get_flop_counts()["Global"]
    assert {str(op) for op in counted} <= {"aten.mm", "aten.addmm", "aten.bmm"}
    replayed = sum(2 * args[-2].numel() * args[-1].shape[-1]
                   for _, args, _ in recorder.calls["matmul"])
    assert replayed == sum(counted.values()) > 0
    # forward and backward of each layer's attention
    assert len(recorder.calls["attention"]) == 2 * smoke_cfg.model.num_layers

    floor = bench.step_floor(timed, repeats=2)
    assert floor["matmul_calls"] == len(recorder.calls["matmul"]) > 0
    assert floor["attention_calls"] == 2 * smoke_cfg.model.num_layers
    assert all(floor[k] > 0 for k in ("matmul_s", "attention_s", "update_s"))
