"""Streaming over class chunks, shared by the compact heads (chunked, sigmoid rank=R): the logits of a
class range are Eᵀ·B for a basis B (b, R, *spatial) and an operator E (R, C), so no helper here ever
holds more than one chunk's logits per voxel."""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import Tensor


def chunks(num_classes: int, chunk: int) -> Iterator[tuple[int, int]]:
    """[start, stop) class ranges of at most `chunk` classes."""
    for start in range(0, num_classes, chunk):
        yield start, min(start + chunk, num_classes)


def flatten_basis(basis: Tensor) -> Tensor:
    """(b, R, *spatial) → (R, b·S): one copy, so every chunk's logits are a single 2-D matmul."""
    b, rank = basis.shape[:2]
    return basis.detach().reshape(b, rank, -1).transpose(0, 1).reshape(rank, -1)


def chunked_logsumexp(operator: Tensor, x: Tensor, chunk: int) -> Tensor:
    """log Σ_c exp (Eᵀ·x)_c per voxel (N,), online over class chunks."""
    lse = torch.full((x.shape[1],), -math.inf, device=x.device, dtype=x.dtype)
    for start, stop in chunks(operator.shape[1], chunk):
        lse = torch.logaddexp(lse, torch.logsumexp(torch.mm(operator[:, start:stop].T, x), 0))
    return lse


def probabilities(
    operator: Tensor, x: Tensor, start: int, stop: int, lse: Tensor, weight: Tensor | None = None
) -> Tensor:
    """Softmax probabilities of classes [start, stop) for every voxel, (k, N), computed in place;
    zero at voxels whose `weight` is 0 (the ignore label)."""
    p = torch.mm(operator[:, start:stop].T, x).sub_(lse).exp_()
    return p if weight is None else p.mul_(weight)


def chunked_max(basis: Tensor, operator: Tensor, chunk: int) -> tuple[Tensor, Tensor]:
    """max and argmax_c of (Eᵀ·B)_c per voxel, by a running (value, index) over class chunks: O(R + chunk) per voxel."""
    x = flatten_basis(basis).to(operator.dtype)
    best_value = torch.full((x.shape[1],), -math.inf, device=x.device, dtype=x.dtype)
    best_index = torch.zeros(x.shape[1], device=x.device, dtype=torch.long)
    for start, stop in chunks(operator.shape[1], chunk):
        value, index = torch.mm(operator[:, start:stop].T, x).max(0)
        better = value > best_value
        best_value = torch.where(better, value, best_value)
        best_index = torch.where(better, index + start, best_index)
    shape = (basis.shape[0], *basis.shape[2:])
    return best_value.view(shape), best_index.view(shape)


def chunked_argmax(basis: Tensor, operator: Tensor, chunk: int) -> Tensor:
    """argmax_c (Eᵀ·B)_c per voxel without holding all C logits."""
    return chunked_max(basis, operator, chunk)[1]
