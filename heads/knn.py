"""``knn``: ESSNet's embedding head (essnet.md §3) with FAISS k-nearest-class hard negatives.

Voxels and classes live on the unit sphere in d dimensions; the logit of class c is −‖x − μ_c‖²/τ.
The loss is cross-entropy over the target and its k nearest other classes (eq. 6), found by exact
FAISS search under no_grad, plus the max-margin regulariser of eq. 7.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from headzoo.errors import HeadzooError
from headzoo.head import Head

PREDICT_CHUNK = 65536  # voxels per nearest-class search at prediction
TORCH_SEARCH_ELEMENTS = 2**20  # query × class distances per block of the torch backend's search (4 MiB)


def _faiss():
    try:
        import faiss
        import faiss.contrib.torch_utils  # noqa: F401  (torch tensors in, torch tensors out)
    except ImportError as error:
        raise HeadzooError("the knn head's FAISS backend needs FAISS: pip install faiss-cpu "
                           "(or faiss-gpu on a CUDA machine), or pass --option knn_backend=torch") from error
    return faiss


class ClassIndex:
    """Exact L2 nearest-class search over the class embeddings, rebuilt only when they change."""

    def __init__(self, backend: str):
        if backend not in ("faiss", "torch"):
            raise HeadzooError(f"knn_backend must be 'faiss' or 'torch', got '{backend}'")
        self.backend = backend
        self._key = None
        self._index = None
        self._classes = None

    def update(self, classes: Tensor, key: object) -> None:
        """Index `classes` unless `key` (identifying the embeddings' state) is the one already indexed."""
        if key == self._key:
            return
        self._key, self._classes = key, classes.detach().float().contiguous()
        if self.backend == "faiss":
            faiss = _faiss()
            d = self._classes.shape[1]
            if self._classes.is_cuda and hasattr(faiss, "StandardGpuResources"):
                self._resources = faiss.StandardGpuResources()
                self._index = faiss.GpuIndexFlatL2(self._resources, d)
            else:
                self._index = faiss.IndexFlatL2(d)
            self._index.add(self._classes if self._index_takes(self._classes) else self._classes.cpu())

    def _index_takes(self, tensor: Tensor) -> bool:
        return not tensor.is_cuda or type(self._index).__name__.startswith("Gpu")

    @torch.no_grad()
    def search(self, queries: Tensor, k: int) -> Tensor:
        """Indices (n, k) of the k nearest classes to each query, nearest first."""
        queries = queries.detach().float().contiguous()
        if self.backend == "torch":  # in blocks of queries, so the distance matrix never holds N×C
            rows = max(1, TORCH_SEARCH_ELEMENTS // len(self._classes))
            return torch.cat([torch.cdist(part, self._classes).topk(k, dim=1, largest=False).indices
                              for part in queries.split(rows)])
        if self._index_takes(queries):
            return self._index.search(queries, k)[1].long()
        return self._index.search(queries.cpu(), k)[1].long().to(queries.device)  # CUDA tensors, faiss-cpu


def knn_negatives(neighbours: Tensor, target: Tensor) -> Tensor:
    """Drop the target from each row of k+1 neighbours (or the farthest one when the target is absent)."""
    is_target = neighbours == target[:, None]
    drop = is_target.clone()
    drop[:, -1] |= ~is_target.any(1)
    return neighbours[~drop].view(neighbours.shape[0], neighbours.shape[1] - 1)


class KnnHead(Head):
    """ESSNet embeddings: d-dim unit voxel embeddings, CE over target + k FAISS-nearest classes, margin reg."""

    variants = ({"knn_backend": "torch"},)

    def __init__(self, in_channels: int, num_classes: int, batch_dice: bool = False,
                 ignore_label: int | None = None, d: int | None = None, k: int = 7, tau: float = 0.05,
                 margin: float = 0.2, knn_backend: str = "faiss", embedding_beta1: float = 0.95):
        """``batch_dice`` is unused (no Dice term); voxels labelled ``ignore_label`` are left out of the loss."""
        super().__init__(in_channels, num_classes, batch_dice, ignore_label)
        d = min(12, num_classes) if d is None else d
        if not 1 <= d <= num_classes:
            raise HeadzooError(f"d must be in [1, {num_classes}] (at most C), got {d}")
        if k < 1 or tau <= 0 or margin < 0:
            raise HeadzooError(f"knn needs k ≥ 1, tau > 0 and margin ≥ 0 (got k={k}, tau={tau}, margin={margin})")
        self.d, self.k, self.tau, self.margin, self.embedding_beta1 = d, k, tau, margin, embedding_beta1
        self.embed = nn.Conv3d(in_channels, d, kernel_size=1)
        self.class_embeddings = nn.Parameter(torch.randn(num_classes, d))
        self.index = ClassIndex(knn_backend)

    def forward(self, features: Tensor) -> Tensor:
        return F.normalize(self.embed(features), dim=1)

    def centroids(self) -> Tensor:
        return F.normalize(self.class_embeddings, dim=1)

    def _indexed_centroids(self) -> Tensor:
        centroids = self.centroids()
        parameter = self.class_embeddings
        self.index.update(centroids, (parameter.data_ptr(), parameter._version, parameter.device))
        return centroids

    def logits(self, output: Tensor, classes: slice) -> Tensor:
        mu = self.centroids()[classes]
        distance = (output.unsqueeze(1) - mu.view(1, *mu.shape, *[1] * (output.ndim - 2))).pow(2).sum(2)
        return -distance / self.tau

    def margin_regulariser(self, centroids: Tensor) -> Tensor:
        """(1/C) Σ_i max(0, m − min_{j≠i} ‖μ_i − μ_j‖), the nearest j found by the same search."""
        nearest = knn_negatives(self.index.search(centroids, 2),
                                torch.arange(self.num_classes, device=centroids.device))[:, 0]
        distance = (centroids - centroids[nearest]).norm(dim=1)
        return F.relu(self.margin - distance).mean()

    def loss(self, output: Tensor, target: Tensor, annotated: Tensor | None = None) -> Tensor:
        self.check_target(output, target, annotated)
        centroids = self._indexed_centroids()
        x = output.movedim(1, -1).reshape(-1, self.d)
        y = target.reshape(-1).long()
        if self.ignore_label is not None:
            keep = y != self.ignore_label
            x, y = x[keep], y[keep]
        k = min(self.k, self.num_classes - 1)
        negatives = knn_negatives(self.index.search(x, k + 1), y)
        candidates = torch.cat([y[:, None], negatives], dim=1)           # target in slot 0
        logits = -(x.unsqueeze(1) - centroids[candidates]).pow(2).sum(-1) / self.tau
        classification = F.cross_entropy(logits, torch.zeros_like(y))
        return classification + self.margin_regulariser(centroids)

    @torch.no_grad()
    def predict(self, output: Tensor) -> Tensor:
        self._indexed_centroids()
        x = output.movedim(1, -1).reshape(-1, self.d)
        labels = torch.cat([self.index.search(part, 1)[:, 0] for part in x.split(PREDICT_CHUNK)])
        return labels.view(output.shape[0], *output.shape[2:])

    def param_groups(self, lr: float) -> list[dict]:
        """Class embeddings get their own group with higher momentum (ESSNet §3.3)."""
        return [{"params": [self.class_embeddings], "betas": (self.embedding_beta1, 0.995)}]
