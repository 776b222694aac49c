import sys

import pytest
import torch
import torch.nn.functional as F

import headzoo
from headzoo.heads.knn import ClassIndex, knn_negatives


def _setup(num_classes=20, k=7, backend="faiss", seed=0):
    torch.manual_seed(seed)
    head = headzoo.create_head("knn", 5, num_classes, k=k, knn_backend=backend)
    features = torch.randn(2, 5, 4, 4, 3)
    target = torch.randint(0, num_classes, (2, 1, 4, 4, 3))
    return head, head(features), target


def _exact_loss(head, output, target):
    """Full softmax CE over every class's logit plus eq. 7 by float64 brute force."""
    logits = head.logits(output, slice(None))
    ce = F.cross_entropy(logits, target[:, 0].long())
    mu = head.centroids().double()
    distance = torch.cdist(mu, mu) + torch.diag(torch.full((len(mu),), float("inf"), dtype=torch.float64))
    regulariser = F.relu(head.margin - distance.min(1).values).mean()
    return ce.double() + regulariser


@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_neighbours_equal_float64_brute_force(backend):
    generator = torch.Generator().manual_seed(0)
    classes = F.normalize(torch.randn(300, 12, generator=generator), dim=1)
    queries = F.normalize(torch.randn(1000, 12, generator=generator), dim=1)
    index = ClassIndex(backend)
    index.update(classes, "fixed")
    expected = torch.cdist(queries.double(), classes.double()).argsort(1)[:, :8]
    torch.testing.assert_close(index.search(queries, 8), expected)


@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_with_k_at_least_c_minus_1_the_loss_is_exact(backend):
    head, output, target = _setup(num_classes=9, k=8, backend=backend)
    torch.testing.assert_close(
        head.loss(output, target).double(), _exact_loss(head, output, target), rtol=1e-5, atol=1e-5
    )


def test_with_small_k_the_loss_is_never_above_the_exact_one():
    for seed in range(5):
        head, output, target = _setup(num_classes=40, k=3, seed=seed)
        assert head.loss(output, target) <= _exact_loss(head, output, target) + 1e-5


def test_target_is_never_among_its_negatives():
    head, output, target = _setup(num_classes=30, k=7)
    x = output.movedim(1, -1).reshape(-1, head.d)
    y = target.reshape(-1)
    head._indexed_centroids()
    negatives = knn_negatives(head.index.search(x, 8), y)
    assert negatives.shape == (len(y), 7)
    assert not (negatives == y[:, None]).any()


def test_index_is_rebuilt_only_when_embeddings_change():
    head, output, target = _setup()
    head.loss(output, target)
    built = head.index._index
    head.predict(output.detach())
    assert head.index._index is built
    with torch.no_grad():
        head.class_embeddings.add_(0.1)
    head.predict(output.detach())
    assert head.index._index is not built


def test_missing_faiss_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)
    head, output, target = _setup()
    with pytest.raises(headzoo.HeadzooError, match="pip install faiss-cpu"):
        head.loss(output, target)


def test_class_embeddings_get_their_own_optimizer_group():
    head, _, _ = _setup()
    groups = head.configure_optimizer(lr=0.01, betas=(0.9, 0.5), weight_decay=0.25)
    assert groups[0]["params"] == [head.class_embeddings] and groups[0]["betas"] == (head.embedding_beta1, 0.5)
    assert groups[0]["weight_decay"] == 0.25 and head.embedding_beta1 > 0.9


def test_auto_backend_picks_faiss_where_it_runs_on_the_device(monkeypatch):
    from headzoo.heads import knn

    head, output, target = _setup(backend="auto")
    head.loss(output, target)
    assert head.index._searcher == "faiss" and head.index.gpu_memory_bytes() == 0
    gpu_faiss = hasattr(knn._faiss(), "StandardGpuResources")
    assert knn._faiss_runs_on(torch.device("cuda")) == gpu_faiss  # faiss-cpu never searches CUDA tensors
    monkeypatch.setitem(sys.modules, "faiss", None)
    head, output, target = _setup(backend="auto")
    head.loss(output, target)
    assert head.index._searcher == "torch"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_index_shares_one_faiss_resources_and_reports_its_memory():
    from headzoo.heads import knn

    head, output, target = _setup(backend="auto")
    head, output, target = head.cuda(), output.cuda(), target.cuda()
    head.loss(output, target)
    with torch.no_grad():
        head.class_embeddings.add_(0.1)
    head.loss(output, target)
    if hasattr(knn._faiss(), "StandardGpuResources"):
        assert knn._gpu_resources.cache_info().misses == 1
        assert head.index.gpu_memory_bytes() >= head.num_classes * head.d * 4
    else:
        assert head.index._searcher == "torch"
