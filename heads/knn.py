"""``knn``: ESSNet's embedding head (Jain et al., ICCV 2021, https://arxiv.org/abs/2012.07489, §3) with FAISS
k-nearest-class hard negatives.

Voxels and classes live on the unit sphere in d dimensions; the logit of class c is −‖x − μ_c‖²/τ.
The loss is cross-entropy over the target and its k nearest other classes (eq. 6), found by exact
FAISS search under no_grad, plus the max-margin regulariser of eq. 7.

Search backends (``knn_backend``): ``faiss`` (IndexFlatL2; GpuIndexFlatL2 on CUDA tensors when FAISS
has GPU support), ``torch`` (cdist + topk, on any device) and ``auto`` (the default): FAISS where it
runs on the tensors' device (faiss-cpu for CPU tensors; for CUDA tensors only a FAISS with GPU
support, since faiss-cpu would copy every query batch to the host), else torch. GPU FAISS is the
``faiss-gpu`` wheel (CUDA 12 runtime), which replaces faiss-cpu (``pip uninstall faiss-cpu`` first:
both install the ``faiss`` module) and sits beside torch's own CUDA runtime. On the CPU, FAISS is
2–36× faster than torch (leaderboard/knn_backends.md); on a GPU the two have not been measured yet.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from headzoo.errors import HeadzooError
from headzoo.head import Head, check_option, is_fake

PREDICT_CHUNK = 65536  # voxels per nearest-class search at prediction
#: the torch backend's search holds one block of query × class fp32 distances at a time. On the CPU 4 MiB (cache-
#: sized; the CPU peaks measured so far include it). On CUDA 1/512 of the device's memory (H100 80 GB: 160 MB):
#: every block is a few kernel launches, and 4 MiB blocks would be ~13.5k of them per step at 2×192³, C = 1000.
CPU_SEARCH_BLOCK_BYTES, CUDA_SEARCH_BLOCK_FRACTION = 2**22, 512


def _faiss():
    try:
        import faiss
        import faiss.contrib.torch_utils  # noqa: F401  (torch tensors in, torch tensors out)
    except ImportError as error:
        raise HeadzooError(
            "the knn head's FAISS backend needs FAISS: pip install faiss-cpu "
            "(or faiss-gpu on a CUDA machine), or pass --option knn_backend=torch"
        ) from error
    return faiss


@functools.cache
def _gpu_resources():
    """FAISS's GPU resources (streams, cuBLAS handles, temporary-memory pool), made once per process."""
    return _faiss().StandardGpuResources()


def _faiss_runs_on(device: torch.device) -> bool:
    """Whether FAISS imports and searches on `device` itself (for CUDA: a FAISS with GPU support)."""
    try:
        faiss = _faiss()
    except HeadzooError:
        return False
    return device.type != "cuda" or hasattr(faiss, "StandardGpuResources")


def resolve_backend(backend: str, device: torch.device) -> str:
    """The search backend that runs on `device`: ``auto`` becomes ``faiss`` where FAISS searches there, else ``torch``."""
    if backend != "auto":
        return backend
    return "faiss" if _faiss_runs_on(device) else "torch"


def search_block_rows(num_classes: int, device: torch.device) -> int:
    """Queries per block of the torch backend's search: as many as the block's memory budget holds distances for."""
    if device.type == "cuda":
        budget = torch.cuda.get_device_properties(device).total_memory // CUDA_SEARCH_BLOCK_FRACTION
    else:
        budget = CPU_SEARCH_BLOCK_BYTES
    return max(1, budget // (4 * num_classes))


class ClassIndex:
    """Exact L2 nearest-class search over the class embeddings, rebuilt only when they change."""

    def __init__(self, backend: str):
        if backend not in ("auto", "faiss", "torch"):
            raise HeadzooError(f"knn_backend must be 'auto', 'faiss' or 'torch', got '{backend}'")
        self.backend = backend
        self._key = None
        self._index = None
        self._classes = None
        self._searcher = None  # the backend in use: resolve_backend on the embeddings' device

    def update(self, classes: Tensor, key: object) -> None:
        """Index `classes` unless `key` (identifying the embeddings' state) is the one already indexed. Fake
        embeddings (`headzoo estimate`) have no values to index: FAISS is left out, `search` keeps its shapes."""
        if key is not None and key == self._key:
            return
        self._key, self._classes = key, classes.detach().float().contiguous()
        self._searcher = resolve_backend(self.backend, self._classes.device)
        if self._searcher == "faiss" and not is_fake(self._classes):
            faiss = _faiss()
            d = self._classes.shape[1]
            if self._classes.is_cuda and hasattr(faiss, "StandardGpuResources"):
                config, device = faiss.GpuIndexFlatConfig(), self._classes.device
                config.device = torch.cuda.current_device() if device.index is None else device.index
                self._index = faiss.GpuIndexFlatL2(_gpu_resources(), d, config)
            else:
                self._index = faiss.IndexFlatL2(d)
            self._index.add(self._classes if self._index_takes(self._classes) else self._classes.cpu())

    def gpu_memory_bytes(self) -> int:
        """GPU memory FAISS holds outside torch's allocator (its index vectors and temporary pool); 0 without one."""
        if self._searcher != "faiss" or not type(self._index).__name__.startswith("Gpu"):
            return 0
        usage = _gpu_resources().getMemoryInfo().get(self._index.getDevice(), {})
        return sum(size for _, size in usage.values())

    def _index_takes(self, tensor: Tensor) -> bool:
        return not tensor.is_cuda or type(self._index).__name__.startswith("Gpu")

    @torch.no_grad()
    def search(self, queries: Tensor, k: int) -> Tensor:
        """Indices (n, k) of the k nearest classes to each query, nearest first."""
        queries = queries.detach().float().contiguous()
        if self._searcher == "torch":  # in blocks of queries, so the distance matrix never holds N×C
            rows = search_block_rows(len(self._classes), queries.device)
            return torch.cat(
                [torch.cdist(part, self._classes).topk(k, dim=1, largest=False).indices for part in queries.split(rows)]
            )
        if is_fake(queries):  # what FAISS's torch wrapper allocates: distances (n, k) fp32, then indices (n, k) int64
            torch.empty(len(queries), k, device=queries.device)
            return torch.empty(len(queries), k, device=queries.device, dtype=torch.long)
        if self._index_takes(queries):
            return self._index.search(queries, k)[1].long()
        return self._index.search(queries.cpu(), k)[1].long().to(queries.device)  # CUDA tensors, faiss-cpu


def knn_negatives(neighbours: Tensor, target: Tensor) -> Tensor:
    """Drop the target from each row of k+1 neighbours (or the farthest one when the target is absent).

    By a gather of fixed shape (n, k), not a boolean mask: the result's shape never depends on values."""
    is_target = neighbours == target[:, None]
    last = neighbours.shape[1] - 1
    dropped = torch.where(is_target.any(1), is_target.to(torch.uint8).argmax(1), last)
    columns = torch.arange(last, device=neighbours.device)
    return neighbours.gather(1, columns + (columns >= dropped[:, None]))


class KnnHead(Head):
    """ESSNet embeddings: d-dim unit voxel embeddings, CE over target + k FAISS-nearest classes, margin reg."""

    variants = ({"knn_backend": "torch"},)

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        batch_dice: bool = False,
        ignore_label: int | None = None,
        d: int | None = None,
        k: int | None = None,
        tau: float = 0.05,
        margin: float = 0.2,
        knn_backend: str = "auto",
        embedding_beta1: float = 0.95,
    ):
        """``batch_dice`` is unused (no Dice term); voxels labelled ``ignore_label`` are left out of the loss.
        ``d`` defaults to min(12, C) and ``k`` to min(7, C−1): C−1 other classes are all there are."""
        super().__init__(in_channels, num_classes, batch_dice, ignore_label)
        d = min(12, num_classes) if d is None else d
        k = min(7, num_classes - 1) if k is None else k
        check_option("d", d, 1 <= d <= num_classes, f"in [1, {num_classes}] (at most C)")
        check_option("k", k, 1 <= k <= num_classes - 1, f"in [1, {num_classes - 1}] (at most C−1 other classes)")
        check_option("tau", tau, tau > 0, "above 0")
        check_option("margin", margin, margin >= 0, "at least 0")
        check_option("embedding_beta1", embedding_beta1, 0 <= embedding_beta1 < 1, "in [0, 1) (an Adam β1)")
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
        key = None if is_fake(parameter) else (parameter.data_ptr(), parameter._version, parameter.device)
        self.index.update(centroids, key)
        return centroids

    def logits(self, output: Tensor, classes: slice) -> Tensor:
        mu = self.centroids()[classes]
        distance = (output.unsqueeze(1) - mu.view(1, *mu.shape, *[1] * (output.ndim - 2))).pow(2).sum(2)
        return -distance / self.tau

    def margin_regulariser(self, centroids: Tensor) -> Tensor:
        """(1/C) Σ_i max(0, m − min_{j≠i} ‖μ_i − μ_j‖), the nearest j found by the same search."""
        nearest = knn_negatives(
            self.index.search(centroids, 2), torch.arange(self.num_classes, device=centroids.device)
        )[:, 0]
        distance = (centroids - centroids[nearest]).norm(dim=1)
        return F.relu(self.margin - distance).mean()

    def loss(self, output: Tensor, target: Tensor, annotated: Tensor | None = None) -> Tensor:
        self.check_target(output, target, annotated)
        centroids = self._indexed_centroids()
        x = output.movedim(1, -1).reshape(-1, self.d)
        y = target.reshape(-1).long()
        keep = None
        if self.ignore_label is not None:  # ignored voxels stay (fixed shapes), as class 0 with weight 0
            keep = y != self.ignore_label
            y = torch.where(keep, y, 0)
        k = min(self.k, self.num_classes - 1)
        negatives = knn_negatives(self.index.search(x, k + 1), y)
        candidates = torch.cat([y[:, None], negatives], dim=1)  # target in slot 0
        logits = -(x.unsqueeze(1) - centroids[candidates]).pow(2).sum(-1) / self.tau
        if keep is None:
            classification = F.cross_entropy(logits, torch.zeros_like(y))
        else:  # the mean over kept voxels; 0 when none is kept, as nnU-Net's masked CE
            per_voxel = F.cross_entropy(logits, torch.zeros_like(y), reduction="none")
            classification = (per_voxel * keep).sum() / keep.sum().clamp_min(1)
        return classification + self.margin_regulariser(centroids)

    @torch.no_grad()
    def predict(self, output: Tensor) -> Tensor:
        self._indexed_centroids()
        x = output.movedim(1, -1).reshape(-1, self.d)
        labels = torch.cat([self.index.search(part, 1)[:, 0] for part in x.split(PREDICT_CHUNK)])
        return labels.view(output.shape[0], *output.shape[2:])

    def external_memory_bytes(self) -> int:
        """The FAISS GPU index's memory (index vectors and its resources' temporary pool): outside torch's allocator."""
        return self.index.gpu_memory_bytes()

    def resolved_options(self, device: torch.device) -> dict:
        """The options as they resolve on `device`: the search backend ``auto`` picks there (faiss or torch)."""
        return {"knn_backend": resolve_backend(self.index.backend, device)}

    def configure_optimizer(self, lr: float, betas: tuple[float, float], weight_decay: float) -> list[dict]:
        """Class embeddings get their own group with higher momentum (ESSNet §3.3), the shared β2 and decay."""
        return [
            {"params": [self.class_embeddings], "betas": (self.embedding_beta1, betas[1]), "weight_decay": weight_decay}
        ]
