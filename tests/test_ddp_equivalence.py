"""Distributed steps equal single-process steps on the global batch: two DDP workers over gloo,
with equal (8:8) and unequal (12:4) local batches, end with the parameters one worker reaches
with the whole batch (same seed, same data order)."""

import gc
import os
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from raydiff.config import load_config
from raydiff.diffusion import Draws, LossSpec, diffusion_losses
from raydiff.train.engine import DiffusionEngine
from tests.conftest import ROOT

GLOBAL_BATCH, SEQ_LEN, VOCAB, STEPS = 16, 16, 60, 4


def _cfg():
    return load_config(ROOT / "configs" / "smoke.yaml", [
        f"train.batch_size={GLOBAL_BATCH}", f"data.seq_len={SEQ_LEN}", "optim.lr=0.003"])


def _global_batches():
    gen = torch.Generator().manual_seed(123)
    for _ in range(STEPS):
        ids = torch.randint(2, VOCAB, (GLOBAL_BATCH, SEQ_LEN), generator=gen)
        lengths = torch.randint(4, SEQ_LEN + 1, (GLOBAL_BATCH,), generator=gen)
        mask = (torch.arange(SEQ_LEN)[None] < lengths[:, None]).long()
        yield {"input_ids": ids * mask, "attention_mask": mask}


def _train(rank: int, sizes: list[int], init_file: str, out: str) -> None:
    torch.set_num_threads(1)
    world = len(sizes)
    wrap = None
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                                world_size=world, timeout=timedelta(seconds=60))
        wrap = DistributedDataParallel
    engine = DiffusionEngine(_cfg(), VOCAB, torch.device("cpu"), seed=0, wrap_model=wrap)
    offset, local = sum(sizes[:rank]), sizes[rank]
    for batch in _global_batches():
        mine = {k: v[offset:offset + local] for k, v in batch.items()}
        engine.train_step(mine, loss_weight=local * world / GLOBAL_BATCH,
                          global_batch=GLOBAL_BATCH, offset=offset)
    if rank == 0:
        torch.save({k: v.clone() for k, v in engine.model.state_dict().items()}, out)
    if world > 1:
        # Free DDP's reducer before the process group: if the reducer held the last reference,
        # the group's destructor would join gloo threads while holding the GIL that they need
        # (a deadlock seen here 1 run in ~8).
        del engine
        gc.collect()
        dist.destroy_process_group()


def _run(sizes, tmp_path, name):
    out = str(tmp_path / f"{name}.pt")
    if len(sizes) == 1:
        _train(0, sizes, "", out)
    else:
        mp.spawn(_train, args=(sizes, str(tmp_path / f"{name}.init"), out), nprocs=len(sizes),
                 daemon=True)  # a hung child must not keep pytest from exiting
    return torch.load(out)


@pytest.mark.ray  # two spawned gloo processes
@pytest.mark.timeout(300)
@pytest.mark.parametrize("sizes", [[8, 8], [12, 4]], ids=["equal", "unequal-3to1"])
def test_two_workers_match_one_worker_on_the_global_batch(sizes, tmp_path):
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    single = _run([GLOBAL_BATCH], tmp_path, "single")
    distributed = _run(sizes, tmp_path, "ddp")
    initial = DiffusionEngine(_cfg(), VOCAB, torch.device("cpu"), seed=0).model.state_dict()
    moved = 0
    for name, value in single.items():
        torch.testing.assert_close(distributed[name], value, rtol=1e-4, atol=1e-5, msg=name)
        moved += not torch.equal(value, initial[name])
    assert moved > 10  # the parameters did train: equality is not trivially the init


def test_unweighted_unequal_batches_would_differ(tmp_path):
    """Guards the test above: without the loss weight, 12:4 batches give a different step."""
    torch.set_num_threads(1)
    engines = [DiffusionEngine(_cfg(), VOCAB, torch.device("cpu"), seed=0) for _ in range(2)]
    batch = next(_global_batches())
    # simulate DDP's average of two unweighted local means (12 and 4 examples)
    eng = engines[1]
    grads = []
    for offset, local in ((0, 12), (12, 4)):
        mine = {k: v[offset:offset + local] for k, v in batch.items()}
        eng.generator.manual_seed(0)
        eng.optimizer.zero_grad(set_to_none=True)
        t_all, _ = eng.timesteps.sample(GLOBAL_BATCH, "cpu", eng.generator)
        shape = (GLOBAL_BATCH, SEQ_LEN, eng.model.word_embedding.embedding_dim)
        draws = Draws.sample(t_all, shape, eng.generator)
        terms = diffusion_losses(eng.model, eng.schedule, mine, LossSpec(loss="anchor"),
                                 draws[offset:offset + local])
        terms.total.mean().backward()
        grads.append([p.grad.clone() for p in eng.model.parameters()])
    engines[0].optimizer.zero_grad(set_to_none=True)
    reference = diffusion_losses(engines[0].model, engines[0].schedule, batch,
                                 LossSpec(loss="anchor"), draws)
    reference.total.mean().backward()
    averaged = [(a + b) / 2 for a, b in zip(*grads, strict=True)]
    weighted = [(12 * a + 4 * b) / 16 for a, b in zip(*grads, strict=True)]
    ref = [p.grad for p in engines[0].model.parameters()]
    assert any(not torch.allclose(a, r, atol=1e-6) for a, r in zip(averaged, ref, strict=True))
    for w, r in zip(weighted, ref, strict=True):
        torch.testing.assert_close(w, r, rtol=1e-4, atol=1e-6)
