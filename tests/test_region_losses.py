"""The triplet ranking loss (VSE++ hardest negatives) against a plain loop, and CusaLoss fed a similarity matrix."""

from __future__ import annotations

import random

import pytest
import torch

from train.config import build_config, resolved_losses
from train.losses import CusaLoss, LossConfig, triplet_loss

REPEATED_IDS = [0, 0, 1, 2, 2, 2, 3, 4]


def ref_triplet(sim: list[list[float]], ids: list, margin: float, max_violation: bool, reduction: str) -> float:
    """For each pair r: hinge costs against every caption and every image of another image, hardest or summed."""
    n = len(ids)
    total = 0.0
    for r in range(n):
        positive = sim[r][r]
        to_captions = [max(0.0, margin + sim[r][s] - positive) for s in range(n) if ids[s] != ids[r]]
        to_images = [max(0.0, margin + sim[s][r] - positive) for s in range(n) if ids[s] != ids[r]]
        for costs in (to_captions, to_images):
            if costs:
                total += max(costs) if max_violation else sum(costs)
    return total / n if reduction == "mean" else total


def random_case(n: int, seed: int, ids=None):
    rnd = random.Random(seed)
    sim = [[rnd.uniform(0, 1) for _ in range(n)] for _ in range(n)]
    return sim, ids if ids is not None else list(range(n))


@pytest.mark.parametrize("ids", [None, REPEATED_IDS, [7, 7, 7, 9, 9, 9, 9, 9]])
@pytest.mark.parametrize("max_violation", [True, False])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("margin", [0.2, 0.7])
def test_triplet_matches_loop_reference_with_repeated_images(ids, max_violation, reduction, margin):
    sim, ids = random_case(8, seed=len(str(ids)) + int(margin * 10), ids=ids)
    got = triplet_loss(torch.tensor(sim, dtype=torch.float64), ids, margin, max_violation, reduction)
    want = ref_triplet(sim, ids, margin, max_violation, reduction)
    assert float(got) == pytest.approx(want, rel=1e-12, abs=1e-12)
    assert want > 0


def test_pairs_of_the_same_image_are_never_negatives():
    # every caption of image 0 scores higher with image 0's rows than its own pair does: with same-image pairs
    # counted as negatives the loss would be large, but they are positives, so only the other image counts
    sim = torch.tensor([[0.5, 0.9, 0.1], [0.9, 0.5, 0.1], [0.1, 0.1, 0.8]])
    assert float(triplet_loss(sim, [0, 0, 1], margin=0.2)) == pytest.approx(0.0)
    # as distinct images, each of rows 0 and 1 violates by 0.2 + 0.9 − 0.5 = 0.6 in both directions
    assert float(triplet_loss(sim, [0, 1, 2], margin=0.2)) == pytest.approx(4 * 0.6)


def test_hardest_negative_only_counts_the_worst_violator():
    sim = torch.tensor([[0.6, 0.5, 0.7], [0.0, 0.6, 0.0], [0.0, 0.0, 0.6]])
    # row 0: negatives 0.5 and 0.7 → hardest 0.2 + 0.7 − 0.6 = 0.3 (the sum would add 0.1); column 0: images
    # 1 and 2 score 0.0 → 0; rows/columns 1, 2: the hardest image→caption negative of caption 1 is image 0 (0.5):
    # 0.2 + 0.5 − 0.6 = 0.1; of caption 2 it is image 0 (0.7): 0.3
    assert float(triplet_loss(sim, [0, 1, 2], 0.2, True)) == pytest.approx(0.3 + 0.1 + 0.3)
    assert float(triplet_loss(sim, [0, 1, 2], 0.2, False)) == pytest.approx(0.3 + 0.1 + 0.1 + 0.3)


def test_triplet_gradient_reaches_only_the_violating_entries():
    sim = torch.tensor([[0.9, 0.1, 0.2], [0.3, 0.8, 0.75], [0.1, 0.2, 0.99]], requires_grad=True)
    triplet_loss(sim, [0, 1, 2], 0.2).backward()
    grad = sim.grad
    # only image 1 → caption 2 violates a margin (0.2 + 0.75 > 0.8), and only from pair 1's side (0.2 + 0.75 < 0.99)
    assert grad[1, 2] == 1 and grad[1, 1] == -1
    assert int((grad != 0).sum()) == 2


def test_triplet_rejects_bad_inputs():
    with pytest.raises(ValueError, match="square"):
        triplet_loss(torch.zeros(2, 3), [0, 1])
    with pytest.raises(ValueError, match="margin"):
        triplet_loss(torch.zeros(2, 2), [0, 1], margin=-0.1)
    with pytest.raises(ValueError, match="reduction"):
        triplet_loss(torch.zeros(2, 2), [0, 1], reduction="max")


# ------------------------------------------------------------------------------------------ CusaLoss on a matrix
def _batch(n=6, dim=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    unit = lambda x: torch.nn.functional.normalize(x, dim=1)  # noqa: E731
    img, txt, img_uni, txt_uni = (unit(torch.randn(n, dim, generator=g)) for _ in range(4))
    t_ii, t_tt = (unit(torch.randn(n, 7, generator=g)) for _ in range(2))
    return img, txt, img_uni, txt_uni, t_ii @ t_ii.T, t_tt @ t_tt.T


@pytest.mark.parametrize("itr", ["contrastive", "triplet"])
def test_the_similarity_path_gives_the_terms_of_the_embedding_path(itr):
    img, txt, img_uni, txt_uni, t_ii, t_tt = _batch()
    loss = CusaLoss(LossConfig().updated({"itr.loss": itr}))
    ids = [0, 0, 1, 2, 3, 4]
    a = loss(img, txt, img_uni, txt_uni, ids, t_ii, t_tt)
    b = loss.forward_similarity(img @ txt.T, img_uni, txt_uni, ids, t_ii, t_tt)
    for key in ("loss", "contrastive", "csa", "usa"):
        assert float(a[key].detach()) == pytest.approx(float(b[key].detach()), rel=1e-6), key
    assert float(b["contrastive"].detach()) > 0
    if itr == "triplet":
        assert float(b["contrastive"]) == pytest.approx(float(triplet_loss(img @ txt.T, ids)), rel=1e-6)


def test_a_triplet_itr_term_has_no_temperature_and_rates_apply():
    cfg = LossConfig().updated({"itr.loss": "triplet", "contrastive.rate": 2.0, "csa.rate": 0.6,
                                "usa.rate": 0.75})
    loss = CusaLoss(cfg)
    assert "tau" not in loss.taus and {"tau_csa", "tau_usa_images", "tau_usa_texts"} <= set(loss.taus)
    _, _, img_uni, txt_uni, t_ii, t_tt = _batch()
    sim = torch.rand(6, 6)
    out = loss.forward_similarity(sim, img_uni, txt_uni, None, t_ii, t_tt)
    assert float(out["contrastive"]) == pytest.approx(2.0 * float(triplet_loss(sim, list(range(6)))), rel=1e-6)
    assert float(out["loss"].detach()) == pytest.approx(float((out["contrastive"] + out["csa"] + out["usa"]).detach()),
                                                       rel=1e-6)


def test_itr_auto_is_the_triplet_loss_for_region_students_and_infonce_for_dual_encoders():
    region = build_config("sgraf-paper", flags={"student": "sgr:grid:efficientnet-lite0"})
    assert region.losses.itr.loss == "auto" and resolved_losses(region).itr.loss == "triplet"
    dual = build_config("paper")
    assert resolved_losses(dual).itr.loss == "contrastive"
    forced = build_config("sgraf-paper", flags={"student": "saf:grid:efficientnet-lite0"},
                          overrides=["itr.loss=contrastive"])
    assert resolved_losses(forced).itr.loss == "contrastive"
    assert "tau" in CusaLoss(resolved_losses(forced)).taus
