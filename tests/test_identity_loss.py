"""The R-Net's same-person identity term (``facerecon.train.rnet.identity_contrast_loss``) and its batch pairing."""

from __future__ import annotations

import numpy as np
import torch

from facerecon.train import data as D
from facerecon.train.rnet import RunData, _real_batch, identity_contrast_loss, paired_people


def _numpy_infonce(z: np.ndarray, pairs: int, t: float) -> float:
    """Independent expectation: per paired row, -log softmax over the other rows of cos / t at its partner."""
    z = z / np.linalg.norm(z, axis=1, keepdims=True)
    out = []
    for i in range(2 * pairs):
        logits = np.array([z[i] @ z[j] / t for j in range(len(z)) if j != i])
        others = [j for j in range(len(z)) if j != i]
        k = others.index(i ^ 1)
        out.append(-(logits[k] - np.log(np.exp(logits - logits.max()).sum()) - logits.max()))
    return float(np.mean(out))


def test_identity_term_matches_a_plain_softmax_and_rewards_agreeing_pairs() -> None:
    rng = np.random.default_rng(0)
    z = rng.normal(size=(7, 20)).astype(np.float32)
    loss = identity_contrast_loss(torch.from_numpy(z), pairs=3, temperature=0.2)
    assert abs(float(loss) - _numpy_infonce(z.astype(np.float64), 3, 0.2)) < 1e-4
    # partners equal, strangers far: the term is near zero; partners swapped with strangers: large
    base = rng.normal(size=(4, 20)).astype(np.float32)
    agree = np.stack([base[0], base[0], base[1], base[1], base[2], base[3]])
    assert float(identity_contrast_loss(torch.from_numpy(agree), 2, 0.05)) < 0.05
    disagree = np.stack([base[0], base[2], base[1], base[3], base[0], base[1]])
    assert float(identity_contrast_loss(torch.from_numpy(disagree), 2, 0.05)) > 2.0


def test_a_gradient_step_on_the_identity_term_brings_partners_together() -> None:
    rng = np.random.default_rng(1)
    z = torch.tensor(rng.normal(size=(8, 30)), dtype=torch.float32, requires_grad=True)

    def cos_pairs(v: torch.Tensor) -> float:
        n = torch.nn.functional.normalize(v, dim=1)
        return float((n[0::2][:3] * n[1::2][:3]).sum(1).mean())

    before = cos_pairs(z.detach())
    opt = torch.optim.SGD([z], lr=0.5)
    for _ in range(20):
        opt.zero_grad()
        identity_contrast_loss(z, pairs=3).backward()
        opt.step()
    assert cos_pairs(z.detach()) > before + 0.3


def test_pairs_are_two_photos_of_one_person_never_a_photo_id() -> None:
    # AFW / HELEN name faces by their photo's id: two faces of one group photo are two people
    identity = ["Ann_Lee", "1051618982", "Bob", "Ann_Lee", "1051618982", "", "cfp001", "cfp001", "Bob", "Cy"]
    people = paired_people(identity)
    assert sorted(sorted(identity[i] for i in p)[0] for p in people) == ["Ann_Lee", "Bob", "cfp001"]
    n = len(identity)
    real = D.RealSet(np.zeros((n, 224, 224, 3), np.uint8), np.zeros((n, 68, 2), np.float32),
                     np.zeros((n, 224, 224), np.uint8), identity, [f"p{i}.jpg" for i in range(n)],
                     np.zeros(n, bool))
    real.images[:] = np.arange(n, dtype=np.uint8)[:, None, None, None]  # each row's pixels carry its index
    rd = RunData(real, None, None, None)  # type: ignore[arg-type]
    for seed in range(5):
        img, *_ = _real_batch(rd, 6, np.random.default_rng(seed), torch.device("cpu"), False, people, 2)
        rows = [round(float(img[k].mean()) * 255) for k in range(6)]
        for p in range(2):
            a, b = rows[2 * p], rows[2 * p + 1]
            assert a != b and identity[a] == identity[b] and not identity[a].isdigit()
