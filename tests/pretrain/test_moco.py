"""MoCo model invariants: InfoNCE vs a slow loop and in fp32 under autocast, momentum rule, queue FIFO,
key layout, shuffle BN groups (split BN against its slow reference: test_split_bn.py)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pretrain.moco import MoCo, build_encoder, info_nce_logits
from pretrain.shuffle_bn import balanced_shuffle, grouped_forward, shuffled_key_forward


def tiny_encoder(dim: int = 8) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, dim))


def test_info_nce_matches_slow_loop():
    torch.manual_seed(0)
    n, d, k, t = 5, 8, 12, 0.2
    q, kk = F.normalize(torch.randn(n, d), dim=1), F.normalize(torch.randn(n, d), dim=1)
    queue = F.normalize(torch.randn(d, k), dim=0)
    logits = info_nce_logits(q, kk, queue, t)
    loss = F.cross_entropy(logits, torch.zeros(n, dtype=torch.long))
    slow = 0.0
    for i in range(n):
        pos = torch.exp(torch.dot(q[i], kk[i]) / t)
        neg = sum(torch.exp(torch.dot(q[i], queue[:, j]) / t) for j in range(k))
        slow += -torch.log(pos / (pos + neg))
        assert torch.allclose(logits[i, 0], torch.dot(q[i], kk[i]) / t)
    assert torch.allclose(loss, slow / n, atol=1e-5)


def test_key_encoder_no_grad_and_exact_momentum():
    torch.manual_seed(0)
    m = MoCo(lambda: tiny_encoder(), dim=8, queue_size=16, momentum=0.9, temperature=0.2, bn_splits=2)
    assert all(not p.requires_grad for p in m.encoder_k.parameters())
    opt = torch.optim.SGD(m.parameters(), lr=0.5)
    x = torch.randn(4, 3, 8, 8)
    logits, labels = m(x, x + 0.1)
    F.cross_entropy(logits, labels).backward()
    assert all(p.grad is None for p in m.encoder_k.parameters())
    assert any(p.grad is not None for p in m.encoder_q.parameters())
    opt.step()
    q_before = [p.detach().clone() for p in m.encoder_q.parameters()]
    k_before = [p.detach().clone() for p in m.encoder_k.parameters()]
    m.momentum_update()
    for pq, pk0, pk in zip(q_before, k_before, m.encoder_k.parameters()):
        assert torch.allclose(pk, 0.9 * pk0 + 0.1 * pq, atol=1e-7)


def test_queue_fifo_wraps_and_checks_divisibility():
    m = MoCo(lambda: tiny_encoder(4), dim=4, queue_size=6, bn_splits=2)
    batches = [F.normalize(torch.randn(2, 4), dim=1) for _ in range(4)]
    for b in batches[:3]:
        m.dequeue_and_enqueue(b)
    assert int(m.queue_ptr) == 0  # wrapped around after 3 batches of 2
    assert torch.equal(m.queue.T, torch.cat(batches[:3]))
    m.dequeue_and_enqueue(batches[3])  # replaces the oldest entries (batch 0)
    assert torch.equal(m.queue.T, torch.cat([batches[3], batches[1], batches[2]]))
    assert int(m.queue_ptr) == 2
    with pytest.raises(ValueError, match="queue_size=6 is not a multiple of the global batch 4"):
        m.dequeue_and_enqueue(torch.randn(4, 4))


@pytest.mark.parametrize("mlp, head_keys", [(False, {"fc.weight", "fc.bias"}),
                                            (True, {"fc.0.weight", "fc.0.bias", "fc.2.weight", "fc.2.bias"})])
def test_official_key_layout(mlp, head_keys):
    m = MoCo(lambda: build_encoder("resnet18", 16, mlp, 32), dim=16, queue_size=8)
    keys = set(m.state_dict())
    assert {"queue", "queue_ptr"} <= keys
    assert {k[len("encoder_q."):] for k in keys if k.startswith("encoder_q.fc")} == head_keys
    assert {k.replace("encoder_k.", "encoder_q.", 1) for k in keys if k.startswith("encoder_k.")} == \
        {k for k in keys if k.startswith("encoder_q.")}
    with pytest.raises(ValueError, match="not a torchvision ResNet"):
        build_encoder("vit_b_16", 16, mlp)


@pytest.mark.parametrize("groups, size", [(2, 3), (4, 4), (8, 2), (3, 7), (2, 8)])
def test_balanced_shuffle_spreads_every_group(groups, size):
    perm = balanced_shuffle(groups, size)
    assert sorted(perm.tolist()) == list(range(groups * size))
    cap = -(-size // groups)
    for j in range(groups):
        counts = torch.bincount(perm[j * size:(j + 1) * size] // size, minlength=groups)
        assert int(counts.max()) <= cap


class RecordingEncoder(nn.Module):
    """Records which sample ids (stored in pixel [0, 0, 0]) each BN group saw: SplitBatchNorm2d's contract
    is that rows ``g::splits`` of the one batch it receives form group ``g``."""

    def __init__(self, splits: int):
        super().__init__()
        self.splits = splits
        self.calls: list[set[int]] = []
        self.w = nn.Parameter(torch.ones(1))

    def forward(self, x):
        ids = x[:, 0, 0, 0]
        self.calls += [{int(v) for v in ids[g::self.splits]} for g in range(self.splits)]
        return x[:, 0, 0, :2] * self.w


def test_single_device_split_bn_keeps_query_and_key_apart():
    ids = torch.arange(16).float().view(16, 1, 1, 1).expand(16, 3, 2, 2).contiguous()
    enc_q, enc_k = RecordingEncoder(4), RecordingEncoder(4)
    queries = grouped_forward(enc_q, ids, 4)
    keys = shuffled_key_forward(enc_k, ids, 4)
    assert torch.equal(queries[:, 0], torch.arange(16).float())  # back in input order
    assert torch.equal(keys[:, 0], torch.arange(16).float())  # unshuffled back to input order
    assert enc_q.calls == [set(range(4 * g, 4 * g + 4)) for g in range(4)]  # query groups: contiguous chunks
    assert len(enc_k.calls) == 4
    for i in range(16):
        q_batch = next(c for c in enc_q.calls if i in c)
        k_batch = next(c for c in enc_k.calls if i in c)
        # 4 groups of 4: the key meets none of its query's BN batch-mates, only itself
        assert q_batch & k_batch == {i}, (i, q_batch, k_batch)


def test_single_device_eval_keys_equal_plain_forward():
    torch.manual_seed(0)
    enc = tiny_encoder().eval()
    x = torch.randn(8, 3, 6, 6)
    assert torch.allclose(shuffled_key_forward(enc, x, 4), enc(x), atol=1e-6)


def test_logits_stay_fp32_under_bf16_autocast():
    """On CPU, autocast casts matmul to bf16 too: without the autocast-off region in info_nce_logits the
    negatives (q @ queue) are off by ~2e-2 here."""
    torch.manual_seed(0)
    q, kk = F.normalize(torch.randn(8, 128), dim=1), F.normalize(torch.randn(8, 128), dim=1)
    queue = F.normalize(torch.randn(128, 4096), dim=0)
    ref = info_nce_logits(q, kk, queue, 0.07)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = info_nce_logits(q.bfloat16(), kk.bfloat16(), queue, 0.07)
        assert logits.dtype == torch.float32
        assert torch.allclose(info_nce_logits(q, kk, queue, 0.07), ref, atol=1e-6, rtol=0)
    # bf16 features: only their own rounding (|q| <= 1, 8 bits) remains, not a bf16 matmul's
    assert torch.allclose(logits, ref, atol=0.15)


def test_queue_is_fp32_and_filled_without_host_sync():
    m = MoCo(lambda: tiny_encoder(8), dim=8, queue_size=16, bn_splits=2)
    x = torch.randn(4, 3, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, _ = m(x, x + 0.1)
    assert logits.dtype == m.queue.dtype == torch.float32
    assert m.to(torch.bfloat16).queue.dtype == torch.float32  # even when the model itself is cast
    assert int(m.queue_ptr) == 4


def test_train_step_never_reads_a_tensor_on_the_host(monkeypatch):
    """A CPU stand-in for a GPU sync check: no ``.item()``, ``float(t)``, ``int(t)``, ``if t:`` or
    ``.tolist()`` anywhere in a step (each would make the host wait for the GPU)."""
    from pretrain.engine import train_step

    m = MoCo(lambda: build_encoder("resnet18", 8, True, 16), dim=8, queue_size=16, bn_splits=4)
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(8, 3, 32, 32)
    train_step(m, opt, x, x + 0.1, amp_bf16=True)  # warm-up: optimizer state created outside the check

    def no_host_read(*_, **__):
        raise AssertionError("a tensor was read on the host inside the training step")
    for name in ("item", "tolist", "__float__", "__int__", "__bool__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, no_host_read)
    loss, logits = train_step(m, opt, x, x + 0.1, amp_bf16=True)
    monkeypatch.undo()
    assert loss.dtype == logits.dtype == torch.float32 and int(m.queue_ptr) == 0


def test_shuffle_bn_off_is_never_silent(caplog):
    with caplog.at_level("WARNING"):
        MoCo(lambda: tiny_encoder(4), dim=4, queue_size=8, bn_splits=1)
    assert "shuffle BN is OFF" in caplog.text
