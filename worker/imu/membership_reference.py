"""The local non-member reference of the membership test (membership.py, ALGORITHM.md §6):
for each record, its nearest non-members in input space, found once per request and split
into folds so that every non-member's own score is calibrated leave-one-out."""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass

import torch

NEIGHBOURS = 10  # non-members per record in its reference


def _flat(x: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(x).detach().double().cpu().reshape(len(x), -1)


@dataclass(frozen=True)
class Fold:
    """One half of the non-members as the reference pool, the other half as the null: the
    forget records, the members and the null records are all scored against the same pool,
    so an unseen record and a null record are exchangeable (leave-one-out references are
    not: they biased unseen records' z by -0.3 at k = 10 on the digits models)."""

    calib: torch.Tensor  # indices of the non-members scored as the null
    # (n, k) indices into the non-members (all in the pool); None = no local reference
    forget_nn: torch.Tensor | None
    member_nn: torch.Tensor | None
    calib_nn: torch.Tensor | None


@dataclass(frozen=True)
class Reference:
    """The model-independent half of the test: who the neighbours are (computed once)."""

    folds: tuple[Fold, ...]
    forget_labels: torch.Tensor
    member_labels: torch.Tensor
    nonmember_labels: torch.Tensor


def _nearest(query: torch.Tensor, pool: torch.Tensor, k: int) -> torch.Tensor:
    out = []
    sq = (pool * pool).sum(1)
    for s in range(0, query.shape[0], 1024):
        q = query[s : s + 1024]
        dist = (q * q).sum(1, keepdim=True) - 2 * q @ pool.T + sq[None, :]
        out.append(torch.topk(dist, k, dim=1, largest=False).indices)
    return torch.cat(out)


@dataclass(frozen=True)
class _Pools:
    """The non-members' half of a local reference: the same for every request on a model
    with the same eval set, so a worker computes it once (a third of the neighbour search)."""

    halves: tuple[torch.Tensor, torch.Tensor]
    mean: torch.Tensor
    scale: torch.Tensor
    e_n: torch.Tensor
    calib_nn: tuple[torch.Tensor, ...]  # per fold, into the non-members


_POOLS: OrderedDict[tuple[str, int, int], _Pools] = OrderedDict()
_POOLS_KEPT = 4  # eval sets of the models a worker serves in turn
_POOL_MAX_BYTES = 32 << 20  # a larger eval set is searched afresh rather than kept


def _halves(n_e: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    order = torch.randperm(n_e, generator=torch.Generator().manual_seed(seed))
    return order[: n_e // 2], order[n_e // 2 :]


def _pools(e: torch.Tensor, k: int, seed: int) -> _Pools:
    digest = hashlib.blake2b(e.numpy().tobytes(), digest_size=16)
    digest.update(repr(tuple(e.shape)).encode())
    key = (digest.hexdigest(), k, seed)
    if (hit := _POOLS.get(key)) is not None:
        _POOLS.move_to_end(key)
        return hit
    halves = _halves(e.shape[0], seed)
    mean, std = e.mean(0), e.std(0)
    floor = 0.1 * float(std.median()) if float(std.median()) > 0 else 1.0
    scale = std.clamp_min(floor)
    e_n = (e - mean) / scale
    calib_nn = tuple(
        pool[_nearest(e_n[calib], e_n[pool], max(1, min(k, pool.numel())))]
        for pool, calib in (halves, halves[::-1])
    )
    made = _Pools(halves, mean, scale, e_n, calib_nn)
    if e.numel() * e.element_size() <= _POOL_MAX_BYTES:
        _POOLS[key] = made
        while len(_POOLS) > _POOLS_KEPT:
            _POOLS.popitem(last=False)
    return made


def build_reference(
    forget: tuple[torch.Tensor, torch.Tensor],
    members: tuple[torch.Tensor, torch.Tensor],
    nonmembers: tuple[torch.Tensor, torch.Tensor],
    k: int = NEIGHBOURS,
    seed: int = 0,
    local: bool = True,
) -> Reference:
    """Nearest non-members of every record in input space (two folds, cross-fitted), each
    feature standardised on the non-members (a floor on the scale keeps constant pixels
    from dominating).

    ``local=False`` (class-wise requests) scores φ itself against the non-members of the
    same class: a model that never saw the class treats its forget records and its unseen
    records alike, while neighbours in input space mix in other classes' records, whose φ
    for the forgotten class is lower still (measured: z ≈ −0.3 per record on retrained
    digits models, read as over-forgetting)."""
    e = _flat(nonmembers[0])
    if e.shape[0] < 6:
        raise ValueError("the membership test needs at least 6 non-member records")
    labels = (
        torch.as_tensor(forget[1]).long().cpu(),
        torch.as_tensor(members[1]).long().cpu(),
        torch.as_tensor(nonmembers[1]).long().cpu(),
    )
    if not local:
        bare = tuple(Fold(calib, None, None, None) for calib in _halves(e.shape[0], seed))
        return Reference(bare, *labels)
    made = _pools(e, k, seed)
    f_n, m_n = ((_flat(x) - made.mean) / made.scale for x in (forget[0], members[0]))
    folds = []
    for (pool, calib), calib_nn in zip(
        (made.halves, made.halves[::-1]), made.calib_nn, strict=True
    ):
        kk = max(1, min(k, pool.numel()))
        pool_n = made.e_n[pool]
        folds.append(
            Fold(
                calib=calib,
                forget_nn=pool[_nearest(f_n, pool_n, kk)],
                member_nn=pool[_nearest(m_n, pool_n, kk)],
                calib_nn=calib_nn,
            )
        )
    return Reference(tuple(folds), *labels)
