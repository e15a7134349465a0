"""ranks.py: the ranks of a multi-GPU (or multi-process CPU) run: the process group, FSDP2 sharding of the policy and
the copy of its weights into an unsharded inference model, and the rules that keep ranks from hanging.

Every rank runs the same collectives in the same order, whatever its data: a collective whose count depended on a
rank's shapes would pair with a different one on another rank and hang the run. Rank-local work of any length (a
rollout, an evaluation, a checkpoint that rank 0 writes) ends in `arrive`/`wait_all`, a rendezvous on the process
group's store rather than a collective, so the collective timeout only ever measures lockstep work. A rank that
fails posts its error on the store, and the others end with it (`fail_together`) instead of waiting forever.
"""
import datetime
import itertools
import os
import time

import torch
import torch.distributed as dist


def setup(timeout_s=600):
    """The process group (NCCL on GPUs, gloo on CPUs) when launched by torchrun; `timeout_s` bounds each collective:
    a mismatch becomes an error naming the collective. Returns (rank, world size)."""
    if "RANK" not in os.environ:
        return 0, 1
    if not torch.cuda.is_available():
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # machines without a network interface
    dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else None
    if dev is not None:
        torch.cuda.set_device(dev)
    dist.init_process_group("nccl" if dev is not None else "gloo", timeout=datetime.timedelta(seconds=timeout_s),
                            device_id=dev)
    return dist.get_rank(), dist.get_world_size()


class RankFailed(RuntimeError):
    """Another rank failed first: its error, ending this rank too."""


_ERROR, _arrivals = "nanotlt/error", itertools.count()


def arrive():
    """This rank reached the next rendezvous. Returns all_arrived(): True once every rank has; it raises
    RankFailed if a rank failed meanwhile (see fail_together). Polled, so a rank can work while it waits."""
    if not dist.is_initialized():
        return lambda: True
    store, world, key = dist.distributed_c10d._get_default_store(), dist.get_world_size(), f"nanotlt/{next(_arrivals)}"
    store.add(key, 1)

    def all_arrived():
        if store.check([_ERROR]):
            raise RankFailed(store.get(_ERROR).decode())
        return store.add(key, 0) >= world
    return all_arrived


def wait_all():
    """Block until every rank gets here (a barrier with no timeout, that ends when another rank fails)."""
    all_arrived = arrive()
    while not all_arrived():
        time.sleep(0.01)


def fail_together(e):
    """The error this rank ends with: the first one any rank reported. This rank's own is posted on the store,
    where the others' rendezvous see it at once, and a rank whose collective timed out reads it."""
    if not dist.is_initialized() or isinstance(e, RankFailed):
        return e
    mine = f"rank {dist.get_rank()} failed: {type(e).__name__}: {(str(e).splitlines() or [''])[0]}"
    try:
        first = dist.distributed_c10d._get_default_store().compare_set(_ERROR, "", mine).decode()
    except Exception:  # the store is gone (its host exited): this rank's own error it is
        return e
    return e if first == mine else RankFailed(first)


def all_reduce_dict(d, device, op=None):
    """All-reduce a dict of numbers (the same keys on every rank) in one collective."""
    return dict(zip(d, all_reduce(torch.tensor(list(d.values()), dtype=torch.float64, device=device), op).tolist()))


def teardown():
    """Every rank arrives before any closes its connections: gloo aborts a rank whose peer hung up mid-teardown."""
    if dist.is_initialized():
        wait_all()
        dist.destroy_process_group()


def all_reduce(x, op=None):  # a no-op in a single process
    if dist.is_initialized():
        dist.all_reduce(x, op=op or dist.ReduceOp.SUM)
    return x


def is_sharded(model):
    from torch.distributed.fsdp import FSDPModule
    return isinstance(model, FSDPModule)


def shard(model, device):
    """FSDP2 over all ranks: each block is a unit, the root (embedding, final norm, head, tied or not) the last.
    On a GPU the compute is bf16 and gradients are reduced in fp32. Gradients are summed, not averaged: the loss
    is already divided by the global token count. The policy is only ever called whole (rl.token_logprobs), so each
    micro-batch gathers the root's weights once on every rank."""
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
    mp = MixedPrecisionPolicy(torch.bfloat16, torch.float32) if device.type == "cuda" else MixedPrecisionPolicy()
    for block in model.layers:
        fully_shard(block, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)  # a plain sum (gloo has no pre-multiplied sum)
    return model


@torch.no_grad()
def copy_weights(src, dst):
    """Policy -> inference copy, one FSDP unit at a time (a block, then the root's own weights): the whole
    policy is never gathered at once."""
    sharded = is_sharded(src)
    for s, d, own in [(s, d, lambda n: True) for s, d in zip(src.layers, dst.layers)] + \
                     [(src, dst, lambda n: not n.startswith("layers."))]:
        if sharded:
            s.unshard()
        for (name, p), q in zip(s.named_parameters(), d.parameters()):
            if own(name):
                if q.numel() != p.numel():  # freed for the update
                    q.data = torch.empty(p.shape, dtype=q.dtype, device=q.device)
                q.copy_(p)
        if sharded:
            s.reshard()
