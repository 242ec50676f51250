"""The Transformer and the RNN model train under torch.distributed DDP (gloo,
2 CPU processes) to the same parameters as one process on the same data; the
Transformer also with its loss through the fused linear_cross_entropy."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import bigkernels

STEPS, VOCAB, T, BATCH = 8, 16, 10, 8


def make_model(kind):
    torch.manual_seed(0)
    if kind == "rnn":
        return bigkernels.models.RNNModel(8, 16, VOCAB, num_layers=2, cell="lstm", vocab_size=VOCAB,
                                          bidirectional=True)
    return bigkernels.models.Transformer(VOCAB, d_model=32, nhead=4, num_layers=2, max_len=T)


def data():
    gen = torch.Generator().manual_seed(1)
    return [(torch.randint(VOCAB, (1, 1), generator=gen) + torch.arange(T + 1)).remainder(VOCAB).repeat(BATCH, 1)
            + torch.randint(0, 2, (BATCH, T + 1), generator=gen) for _ in range(STEPS)]


def train(model, batches, rank=0, world=1, fused=False):
    # SGD, not Adam: Adam divides by the gradient's size, so the key bias's
    # gradient (exactly 0 in exact arithmetic: softmax ignores it) would turn
    # rounding noise into full-size steps and the two runs could not agree.
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for seq in batches:
        seq = seq.remainder(VOCAB).chunk(world)[rank]  # each process its share of the batch
        if fused:  # the model's own loss: the fused LM head + cross-entropy
            loss = model(seq[:, :-1], labels=seq[:, 1:])
        else:
            logits = model(seq[:, :-1])
            if isinstance(logits, tuple):  # the RNN model: (outputs, state)
                logits = logits[0]
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), seq[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def worker(rank, world, port, out_path, kind):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = torch.nn.parallel.DistributedDataParallel(make_model(kind))
        train(model, data(), rank, world, fused=kind == "transformer_fused_loss")
        if rank == 0:
            torch.save(model.module.state_dict(), out_path)
        # Without this barrier torch 2.14's gloo aborts about one exit in five
        # ("terminate called without an active exception"), with plain
        # torch.nn modules too: a rank tore its group down while the other
        # still had work in flight.
        dist.barrier()
    except BaseException:
        dist.destroy_process_group()
        raise
    # With the barrier it still aborted once in CI on 2026-12-06, at teardown
    # (the same message): the work is saved, so leave without tearing the
    # group down or running destructors.
    os._exit(0)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo")
@pytest.mark.parametrize("kind", ["transformer", "rnn", "transformer_fused_loss"])
def test_ddp_two_processes_match_one(tmp_path, kind):
    out = str(tmp_path / "ddp.pt")
    mp.spawn(worker, args=(2, free_port(), out, kind), nprocs=2, join=True)
    ddp = torch.load(out)
    single = train(make_model(kind), data(), fused=kind == "transformer_fused_loss").state_dict()
    assert ddp.keys() == single.keys()
    for name in single:
        torch.testing.assert_close(ddp[name], single[name], atol=2e-5, rtol=1e-4, msg=name)
