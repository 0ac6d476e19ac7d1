"""Losses checked against a plain loop computation in float64 (math.exp / math.log, no torch)."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

from train.losses import (
    CusaLoss,
    LossConfig,
    Temperature,
    TemperatureConfig,
    contrastive_loss,
    csa_loss,
    usa_loss,
)

REPEATED_IDS = [0, 0, 1, 2, 2, 2, 3, 4]
NEG_INF = float("-inf")


# --------------------------------------------------------------------------------------------
# The loop reference: one row at a time, skipping zero-probability (masked) entries.


def ref_log_softmax(row: list[float], tau: float) -> list[float]:
    scaled = [x / tau for x in row]
    finite = [x for x in scaled if not math.isinf(x)]
    top = max(finite)
    log_norm = top + math.log(sum(math.exp(x - top) for x in finite))
    return [x - log_norm for x in scaled]


def ref_softmax(row: list[float], tau: float) -> list[float]:
    return [0.0 if math.isinf(x) else math.exp(x) for x in ref_log_softmax(row, tau)]


def ref_kl_batchmean(targets: list[list[float]], logits: list[list[float]], tau: float) -> float:
    total = 0.0
    for target_row, logit_row in zip(targets, logits):
        log_q = ref_log_softmax(logit_row, tau)
        for p, lq in zip(target_row, log_q):
            if p > 0:
                total += p * (math.log(p) - lq)
    return total / len(logits)


def ref_soft_ce(targets: list[list[float]], logits: list[list[float]], tau: float, reduction: str) -> float:
    rows = []
    for target_row, logit_row in zip(targets, logits):
        log_q = ref_log_softmax(logit_row, tau)
        row_loss = -sum(p * lq for p, lq in zip(target_row, log_q) if p > 0)
        if reduction == "mean":
            row_loss /= len(logit_row)
        rows.append(row_loss)
    return sum(rows) / len(rows)


def ref_align(targets, logits, tau, form, reduction):
    if form == "kl":
        return ref_kl_batchmean(targets, logits, tau)
    return ref_soft_ce(targets, logits, tau, reduction)


def transpose(m: list[list[float]]) -> list[list[float]]:
    return [list(col) for col in zip(*m)]


def ref_contrastive(sim, ids, tau, reduction):
    n = len(ids)
    targets = []
    for r in range(n):
        count = sum(1 for s in range(n) if ids[s] == ids[r])
        targets.append([(1.0 / count if ids[s] == ids[r] else 0.0) for s in range(n)])
    i2t = ref_soft_ce(targets, sim, tau, reduction)
    t2i = ref_soft_ce(targets, transpose(sim), tau, reduction)
    return (i2t + t2i) / 2


def ref_csa_teacher(t_ii, t_tt, mode):
    n = len(t_ii)
    if mode == "each":
        return t_ii, t_tt
    combined = [[0.0] * n for _ in range(n)]
    for r in range(n):
        for s in range(n):
            a, b = t_ii[r][s], t_tt[r][s]
            if math.isinf(a) or math.isinf(b):
                combined[r][s] = NEG_INF
            elif mode == "add":
                combined[r][s] = (a + b) / 2
            else:
                combined[r][s] = math.sqrt(max(a, 0.0) * max(b, 0.0))
    return combined, combined


def ref_csa(sim, t_ii, t_tt, tau, tau_soft, mode, form, reduction):
    target_i2t, target_t2i = ref_csa_teacher(t_ii, t_tt, mode)
    p_i2t = [ref_softmax(row, tau_soft) for row in target_i2t]
    p_t2i = [ref_softmax(row, tau_soft) for row in target_t2i]
    i2t = ref_align(p_i2t, sim, tau, form, reduction)
    t2i = ref_align(p_t2i, transpose(sim), tau, form, reduction)
    return (i2t + t2i) / 2


def ref_usa(s_ii, s_tt, t_ii, t_tt, tau_i, tau_t, tau_soft, form, reduction):
    p_i = [ref_softmax(row, tau_soft) for row in t_ii]
    p_t = [ref_softmax(row, tau_soft) for row in t_tt]
    return (ref_align(p_i, s_ii, tau_i, form, reduction) + ref_align(p_t, s_tt, tau_t, form, reduction)) / 2


# --------------------------------------------------------------------------------------------
# Random inputs


def unit_rows(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def cosine_block(rng: np.random.Generator, n: int, d: int = 6) -> np.ndarray:
    x = unit_rows(rng, n, d)
    return x @ x.T


def mask_block(rng: np.random.Generator, block: np.ndarray, keep: float = 0.4) -> np.ndarray:
    """Sparse soft-label block: off-diagonal pairs outside the 'neighbors' become -inf."""
    masked = block.copy()
    drop = rng.random(block.shape) > keep
    np.fill_diagonal(drop, False)
    masked[drop] = NEG_INF
    return masked


def as_list(x: np.ndarray) -> list[list[float]]:
    return [[float(v) for v in row] for row in x]


def t32(x: np.ndarray) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float32)


@pytest.fixture
def batch():
    rng = np.random.default_rng(7)
    n = len(REPEATED_IDS)
    img, txt = unit_rows(rng, n, 5), unit_rows(rng, n, 5)
    return {
        "sim": img @ txt.T,
        "s_ii": cosine_block(rng, n),
        "s_tt": cosine_block(rng, n),
        "t_ii": cosine_block(rng, n),
        "t_tt": cosine_block(rng, n),
        "rng": rng,
    }


def close(actual: torch.Tensor, expected: float, rel: float = 2e-5) -> bool:
    assert actual.dtype in (torch.float32, torch.float64) and actual.shape == ()
    return math.isclose(actual.item(), expected, rel_tol=rel, abs_tol=1e-7)


# --------------------------------------------------------------------------------------------
# Hand-made 2×2 values: pin the formulas, including the KL argument order.


def test_contrastive_2x2_matches_hand_computed_value():
    sim = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    per_row = -math.log(math.e / (math.e + 1))  # 0.31326...
    assert contrastive_loss(sim, [0, 1], 1.0, reduction="sum").item() == pytest.approx(0.3132617, abs=1e-6)
    assert contrastive_loss(sim, [0, 1], 1.0, reduction="sum").item() == pytest.approx(per_row, rel=1e-6)
    # "mean" also divides by the number of columns.
    assert contrastive_loss(sim, [0, 1], 1.0, reduction="mean").item() == pytest.approx(per_row / 2, rel=1e-6)
    # Both rows showing the same image: the target is uniform and the loss is log 2 (sum).
    assert contrastive_loss(sim, ["a", "a"], 1.0, reduction="sum").item() == pytest.approx(
        -0.5 * math.log(math.e / (math.e + 1)) - 0.5 * math.log(1 / (math.e + 1)), rel=1e-6
    )


def test_csa_2x2_is_kl_of_teacher_to_student_not_reverse():
    sim = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    teacher = torch.tensor([[1.0, -1.0], [-1.0, 1.0]])
    p = [math.exp(1) / (math.exp(1) + math.exp(-1)), math.exp(-1) / (math.exp(1) + math.exp(-1))]
    q = [math.e / (math.e + 1), 1 / (math.e + 1)]
    forward_kl = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    reverse_kl = sum(qi * math.log(qi / pi) for pi, qi in zip(p, q))
    value = csa_loss(sim, teacher, teacher, tau=1.0, tau_soft=1.0).item()
    # Both rows and both directions are alike, so batchmean equals one row's KL.
    assert value == pytest.approx(0.0671308, abs=1e-6)
    assert value == pytest.approx(forward_kl, rel=1e-5)
    assert abs(forward_kl - reverse_kl) > 1e-2  # a swapped implementation would fail above
    usa_value = usa_loss(sim, sim, teacher, teacher, 1.0, 1.0).item()
    assert usa_value == pytest.approx(forward_kl, rel=1e-5)


# --------------------------------------------------------------------------------------------
# Random batches with repeated images against the loop reference


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("tau", [0.05, 0.3])
def test_contrastive_matches_loop_reference_with_repeated_images(batch, reduction, tau):
    expected = ref_contrastive(as_list(batch["sim"]), REPEATED_IDS, tau, reduction)
    got = contrastive_loss(t32(batch["sim"]), torch.tensor(REPEATED_IDS), tau, reduction=reduction)
    assert got.shape == () and got.dtype == torch.float32
    assert close(got, expected)


def test_contrastive_id_forms_agree_and_sum_is_batch_times_mean(batch):
    sim = t32(batch["sim"])
    as_tensor = contrastive_loss(sim, torch.tensor(REPEATED_IDS), 0.05)
    as_strings = contrastive_loss(sim, [f"img{i}" for i in REPEATED_IDS], 0.05)
    as_numpy = contrastive_loss(sim, np.array(REPEATED_IDS), 0.05)
    assert as_tensor.item() == as_strings.item() == as_numpy.item()
    summed = contrastive_loss(sim, REPEATED_IDS, 0.05, reduction="sum")
    assert summed.item() == pytest.approx(len(REPEATED_IDS) * as_tensor.item(), rel=1e-6)
    # Ignoring the repeats (identity targets) must give a different value: the ids matter.
    assert abs(contrastive_loss(sim, list(range(8)), 0.05).item() - as_tensor.item()) > 1e-3


def test_contrastive_float64_input_is_exact(batch):
    expected = ref_contrastive(as_list(batch["sim"]), REPEATED_IDS, 0.05, "sum")
    got = contrastive_loss(torch.tensor(batch["sim"]), REPEATED_IDS, 0.05, reduction="sum")
    assert got.dtype == torch.float64
    assert got.item() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("mode", ["each", "add", "dot"])
@pytest.mark.parametrize("form", ["kl", "contrastive"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_csa_matches_loop_reference(batch, mode, form, reduction):
    expected = ref_csa(
        as_list(batch["sim"]), as_list(batch["t_ii"]), as_list(batch["t_tt"]),
        0.45, 0.7, mode, form, reduction,
    )
    got = csa_loss(
        t32(batch["sim"]), t32(batch["t_ii"]), t32(batch["t_tt"]), tau=0.45, tau_soft=0.7,
        mode=mode, form=form, reduction=reduction,
    )
    assert close(got, expected)


def test_csa_detects_swapped_kl_and_swapped_directions(batch):
    sim, t_ii, t_tt = as_list(batch["sim"]), as_list(batch["t_ii"]), as_list(batch["t_tt"])
    got = csa_loss(t32(batch["sim"]), t32(batch["t_ii"]), t32(batch["t_tt"]), tau=0.45).item()
    p_i = [ref_softmax(row, 1.0) for row in t_ii]
    p_t = [ref_softmax(row, 1.0) for row in t_tt]
    q_i2t = [ref_softmax(row, 0.45) for row in sim]
    q_t2i = [ref_softmax(row, 0.45) for row in transpose(sim)]
    swapped_kl = (ref_kl_batchmean(q_i2t, [[math.log(p) for p in row] for row in p_i], 1.0)
                  + ref_kl_batchmean(q_t2i, [[math.log(p) for p in row] for row in p_t], 1.0)) / 2
    swapped_directions = (ref_kl_batchmean(p_t, sim, 0.45) + ref_kl_batchmean(p_i, transpose(sim), 0.45)) / 2
    assert got == pytest.approx(ref_csa(sim, t_ii, t_tt, 0.45, 1.0, "each", "kl", "mean"), rel=2e-5)
    assert abs(got - swapped_kl) > 1e-3
    assert abs(got - swapped_directions) > 1e-3


def test_csa_kl_form_ignores_reduction(batch):
    args = (t32(batch["sim"]), t32(batch["t_ii"]), t32(batch["t_tt"]))
    mean = csa_loss(*args, tau=0.45, reduction="mean")
    assert mean.item() == csa_loss(*args, tau=0.45, reduction="sum").item()


@pytest.mark.parametrize("form", ["kl", "contrastive"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_usa_matches_loop_reference(batch, form, reduction):
    keys = ("s_ii", "s_tt", "t_ii", "t_tt")
    expected = ref_usa(*(as_list(batch[k]) for k in keys), 0.3, 0.6, 1.0, form, reduction)
    got = usa_loss(*(t32(batch[k]) for k in keys), 0.3, 0.6, 1.0, form=form, reduction=reduction)
    assert close(got, expected)
    # The two student temperatures are separate: exchanging them changes the value.
    swapped = usa_loss(*(t32(batch[k]) for k in keys), 0.6, 0.3, 1.0, form=form, reduction=reduction)
    assert abs(swapped.item() - got.item()) > 1e-4


# --------------------------------------------------------------------------------------------
# Sparse (masked) teacher blocks


@pytest.mark.parametrize("mode", ["each", "add", "dot"])
@pytest.mark.parametrize("form", ["kl", "contrastive"])
def test_csa_with_masked_teacher_blocks_matches_loop_reference(batch, mode, form):
    rng = batch["rng"]
    t_ii, t_tt = mask_block(rng, batch["t_ii"]), mask_block(rng, batch["t_tt"])
    expected = ref_csa(as_list(batch["sim"]), as_list(t_ii), as_list(t_tt), 0.45, 1.0, mode, form, "mean")
    sim = t32(batch["sim"]).requires_grad_(True)
    got = csa_loss(sim, t32(t_ii), t32(t_tt), tau=0.45, mode=mode, form=form)
    assert torch.isfinite(got)
    assert close(got, expected)
    got.backward()
    assert torch.isfinite(sim.grad).all()


@pytest.mark.parametrize("form", ["kl", "contrastive"])
def test_usa_with_masked_teacher_blocks_matches_loop_reference(batch, form):
    rng = batch["rng"]
    t_ii, t_tt = mask_block(rng, batch["t_ii"], keep=0.2), mask_block(rng, batch["t_tt"], keep=0.2)
    students = as_list(batch["s_ii"]), as_list(batch["s_tt"])
    expected = ref_usa(*students, as_list(t_ii), as_list(t_tt), 0.45, 0.45, 1.0, form, "sum")
    s_ii = t32(batch["s_ii"]).requires_grad_(True)
    got = usa_loss(s_ii, t32(batch["s_tt"]), t32(t_ii), t32(t_tt), 0.45, 0.45, form=form, reduction="sum")
    assert close(got, expected)
    got.backward()
    assert torch.isfinite(s_ii.grad).all()


def test_masked_entries_differ_from_dense_teacher(batch):
    # Guards against the mask being silently ignored (e.g. -inf replaced by 0).
    masked = mask_block(batch["rng"], batch["t_ii"])
    dense = csa_loss(t32(batch["sim"]), t32(batch["t_ii"]), t32(batch["t_ii"]), tau=0.45)
    sparse = csa_loss(t32(batch["sim"]), t32(masked), t32(masked), tau=0.45)
    zero_filled = t32(np.where(np.isinf(masked), 0.0, masked))
    zeros = csa_loss(t32(batch["sim"]), zero_filled, zero_filled, tau=0.45)
    assert abs(sparse.item() - dense.item()) > 1e-3
    assert abs(sparse.item() - zeros.item()) > 1e-3


# --------------------------------------------------------------------------------------------
# Gradients


def test_gradients_reach_student_and_temperature_but_never_teacher(batch):
    sim = t32(batch["sim"]).requires_grad_(True)
    s_ii = t32(batch["s_ii"]).requires_grad_(True)
    t_ii = t32(batch["t_ii"]).requires_grad_(True)
    t_tt = t32(batch["t_tt"]).requires_grad_(True)
    tau = torch.tensor(0.45, requires_grad=True)
    total = (
        contrastive_loss(sim, REPEATED_IDS, tau)
        + csa_loss(sim, t_ii, t_tt, tau, mode="dot")
        + csa_loss(sim, t_ii, t_tt, tau, mode="add", form="contrastive")
        + usa_loss(s_ii, s_ii, t_ii, t_tt, tau, tau)
    )
    total.backward()
    assert sim.grad is not None and sim.grad.abs().sum() > 0
    assert s_ii.grad is not None and s_ii.grad.abs().sum() > 0
    assert tau.grad is not None and tau.grad.item() != 0
    assert t_ii.grad is None and t_tt.grad is None


def test_cusa_loss_gradients_reach_embeddings_and_temperatures_not_teacher():
    torch.manual_seed(0)
    n, d = 8, 4
    embs = [torch.nn.functional.normalize(torch.randn(n, d), dim=1).requires_grad_(True) for _ in range(4)]
    teacher_feats = torch.nn.functional.normalize(torch.randn(n, 3), dim=1).requires_grad_(True)
    t_block = teacher_feats @ teacher_feats.T
    out = CusaLoss()(*embs, REPEATED_IDS, t_block, t_block)
    out["loss"].backward()
    assert all(e.grad is not None and e.grad.abs().sum() > 0 for e in embs)
    assert teacher_feats.grad is None
    module = CusaLoss()
    module(*embs, REPEATED_IDS, t_block, t_block)["loss"].backward()
    assert all(t.value.grad is not None for t in module.taus.values())


# --------------------------------------------------------------------------------------------
# Temperatures


def test_temperature_clamp_keeps_raw_value_in_range():
    tau = Temperature(0.05, 0.01, 0.10)
    assert tau.learnable and tau().item() == pytest.approx(0.05)
    with torch.no_grad():
        tau.value.fill_(5.0)
    assert tau.clamp_().item() == pytest.approx(0.10)
    with torch.no_grad():
        tau.value.fill_(-3.0)
    assert tau.clamp_().item() == pytest.approx(0.01)
    sim = torch.tensor([[0.9, 0.1], [0.2, 0.8]])
    assert contrastive_loss(sim, [0, 1], tau).item() == contrastive_loss(sim, [0, 1], 0.01).item()
    frozen = Temperature(1.0, 0.5, 2.0, learnable=False)
    assert not frozen.value.requires_grad and "value" in frozen.state_dict()


@pytest.mark.parametrize("init,low,high", [(0.5, 0.01, 0.10), (0.05, 0.0, 0.1), (0.05, 0.1, 0.01)])
def test_temperature_rejects_inconsistent_ranges(init, low, high):
    with pytest.raises(ValueError, match="min <= init <= max"):
        Temperature(init, low, high)


def test_cusa_loss_clamp_after_optimizer_step():
    module = CusaLoss()
    optimizer = torch.optim.SGD(module.parameters(), lr=1.0)
    for tau in module.taus.values():
        tau.value.grad = torch.tensor(-100.0)  # pushes every temperature far above its max
    optimizer.step()
    assert module.taus["tau"].item() > 0.10
    module.clamp_()
    assert module.temperatures() == pytest.approx(
        {"tau": 0.10, "tau_csa": 0.99, "tau_usa_images": 1.0, "tau_usa_texts": 1.0, "tau_soft": 1.0}
    )


def test_cusa_loss_defaults_follow_reference_config():
    module = CusaLoss()
    assert module.temperatures() == pytest.approx(
        {"tau": 0.05, "tau_csa": 0.45, "tau_usa_images": 0.45, "tau_usa_texts": 0.45, "tau_soft": 1.0}
    )
    cfg = module.config
    assert (cfg.contrastive.rate, cfg.csa.rate, cfg.usa.rate) == (1.0, 0.1, 0.5)
    assert (cfg.contrastive.tau.min, cfg.contrastive.tau.max) == (0.01, 0.10)
    assert (cfg.csa.tau.min, cfg.csa.tau.max) == (0.10, 0.99)
    assert (cfg.usa.tau_images.min, cfg.usa.tau_images.max) == (0.10, 1.00)
    assert (cfg.csa.mode, cfg.csa.form, cfg.contrastive.reduction) == ("each", "kl", "mean")
    assert all(t.learnable for t in module.taus.values())


# --------------------------------------------------------------------------------------------
# CusaLoss


def embeddings(seed: int, n: int = 8, d: int = 5) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.functional.normalize(torch.randn(n, d, generator=gen), dim=1) for _ in range(4)]


def test_cusa_loss_total_is_rates_times_terms():
    img, txt, img_u, txt_u = embeddings(1)
    t_ii = t32(cosine_block(np.random.default_rng(2), 8))
    t_tt = t32(cosine_block(np.random.default_rng(3), 8))
    cfg = LossConfig.from_dict(
        {"contrastive.rate": 2.0, "csa": {"rate": 0.3, "mode": "dot"}, "usa.rate": 0.7}
    )
    out = CusaLoss(cfg)(img, txt, img_u, txt_u, REPEATED_IDS, t_ii, t_tt)
    con = contrastive_loss(img @ txt.T, REPEATED_IDS, 0.05)
    csa = csa_loss(img @ txt.T, t_ii, t_tt, 0.45, mode="dot")
    usa = usa_loss(img_u @ img_u.T, txt_u @ txt_u.T, t_ii, t_tt, 0.45, 0.45)
    assert set(out) == {"loss", "contrastive", "csa", "usa"}
    assert out["contrastive"].item() == pytest.approx(2.0 * con.item(), rel=1e-6)
    assert out["csa"].item() == pytest.approx(0.3 * csa.item(), rel=1e-6)
    assert out["usa"].item() == pytest.approx(0.7 * usa.item(), rel=1e-6)
    expected_total = 2.0 * con.item() + 0.3 * csa.item() + 0.7 * usa.item()
    assert out["loss"].item() == pytest.approx(expected_total, rel=1e-6)


def test_cusa_loss_off_terms_are_zero_and_need_no_teacher():
    img, txt, _, _ = embeddings(4)
    cfg = LossConfig.from_dict({"csa.enabled": False, "usa.enabled": "false"})
    module = CusaLoss(cfg)
    out = module(img, txt, None, None, REPEATED_IDS)
    assert out["csa"].item() == 0.0 and out["usa"].item() == 0.0
    assert out["loss"].item() == pytest.approx(out["contrastive"].item()) and out["loss"].item() > 0
    assert set(module.taus) == {"tau"} and module.temperatures() == pytest.approx({"tau": 0.05})


def test_cusa_loss_image_ids_none_means_all_distinct():
    img, txt, _, _ = embeddings(5)
    module = CusaLoss(LossConfig.from_dict({"csa.enabled": False, "usa.enabled": False}))
    assert module(img, txt, None, None, None)["loss"].item() == pytest.approx(
        module(img, txt, None, None, list(range(8)))["loss"].item()
    )


def test_cusa_loss_csa_only_without_contrastive():
    img, txt, img_u, txt_u = embeddings(6)
    block = t32(cosine_block(np.random.default_rng(0), 8))
    out = CusaLoss(LossConfig.from_dict({"contrastive.enabled": False, "usa.enabled": False}))(
        img, txt, img_u, txt_u, REPEATED_IDS, block, block
    )
    assert out["contrastive"].item() == 0.0 and out["loss"].item() == pytest.approx(out["csa"].item())


def test_cusa_loss_rejects_missing_inputs_and_empty_config():
    img, txt, img_u, txt_u = embeddings(7)
    with pytest.raises(ValueError, match="teacher_images"):
        CusaLoss()(img, txt, img_u, txt_u, REPEATED_IDS)
    block = torch.eye(8)
    with pytest.raises(ValueError, match="img_uni"):
        CusaLoss()(img, txt, None, None, REPEATED_IDS, block, block)
    with pytest.raises(ValueError, match="rows"):
        CusaLoss()(img, txt[:7], img_u, txt_u, REPEATED_IDS, block, block)
    with pytest.raises(ValueError, match="no loss term"):
        CusaLoss(LossConfig.from_dict({t + ".enabled": False for t in ("contrastive", "csa", "usa")}))


def test_bf16_autocast_on_cpu_returns_finite_float32_matching_fp32():
    img, txt, img_u, txt_u = (e.to(torch.bfloat16) for e in embeddings(8))
    rng = np.random.default_rng(9)
    t_ii = torch.tensor(mask_block(rng, cosine_block(rng, 8)), dtype=torch.bfloat16)
    t_tt = torch.tensor(cosine_block(rng, 8), dtype=torch.float16)
    module = CusaLoss()
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        out = module(img, txt, img_u, txt_u, REPEATED_IDS, t_ii, t_tt)
    reference = module(
        img.float(), txt.float(), img_u.float(), txt_u.float(), REPEATED_IDS, t_ii.float(), t_tt.float()
    )
    for key, value in out.items():
        assert value.dtype == torch.float32 and torch.isfinite(value), key
        assert value.item() == pytest.approx(reference[key].item(), rel=1e-5), key


def test_pure_losses_under_autocast_stay_float32(batch):
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        sim = t32(batch["sim"]).to(torch.bfloat16)
        got = csa_loss(sim, t32(batch["t_ii"]), t32(batch["t_tt"]), tau=0.05)
    assert got.dtype == torch.float32
    expected = ref_csa(
        as_list(sim.float().numpy()), as_list(batch["t_ii"]), as_list(batch["t_tt"]),
        0.05, 1.0, "each", "kl", "mean",
    )
    assert close(got, expected, rel=1e-4)


# --------------------------------------------------------------------------------------------
# Input validation


def test_loss_functions_reject_bad_inputs_with_clear_messages(batch):
    sim, t = t32(batch["sim"]), t32(batch["t_ii"])
    cases = [
        (lambda: contrastive_loss(sim[:, :5], REPEATED_IDS, 0.05), "square"),
        (lambda: contrastive_loss(sim, REPEATED_IDS[:5], 0.05), "image_ids has 5 entries"),
        (lambda: contrastive_loss(sim, REPEATED_IDS, 0.05, reduction="avg"), "reduction must be one of mean"),
        (lambda: contrastive_loss(sim, REPEATED_IDS, 0.0), "tau must be a positive"),
        (lambda: contrastive_loss(sim, REPEATED_IDS, torch.ones(2)), "tau must be a scalar"),
        (lambda: csa_loss(sim, t[:4, :4], t, 0.45), "teacher_images must have the student's shape"),
        (lambda: csa_loss(sim, t, t, 0.45, mode="mul"), "mode must be one of each|add|dot"),
        (lambda: csa_loss(sim, t, t, 0.45, form="mse"), "form must be one of kl|contrastive"),
        (lambda: csa_loss(sim, t, t.numpy(), 0.45), "teacher_texts must be a torch.Tensor"),
        (lambda: csa_loss(sim, t, t, 0.45, tau_soft=-1.0), "tau_soft must be a positive"),
        (lambda: usa_loss(sim, sim[:4, :4], t, t, 0.45, 0.45), "must have the same batch size"),
        (lambda: usa_loss(sim, sim, t, t, 0.45, 0.45, reduction="none"), "reduction must be one of"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=re.escape(message)):
            call()


# --------------------------------------------------------------------------------------------
# LossConfig


def test_loss_config_round_trips_through_dict():
    cfg = LossConfig.from_dict(
        {
            "contrastive": {"reduction": "sum", "tau": {"init": 0.07, "learnable": False}},
            "csa": {"rate": 0.2, "mode": "add", "form": "contrastive", "tau": 0.3},
            "usa": {"enabled": False, "tau_texts": {"max": 0.9}},
            "tau_soft": 0.5,
        }
    )
    assert cfg.contrastive.tau == TemperatureConfig(0.07, 0.01, 0.10, learnable=False)
    assert cfg.csa.tau.init == 0.3 and cfg.csa.tau.max == 0.99
    assert cfg.usa.tau_texts.max == 0.9 and cfg.terms == ("contrastive", "csa")
    assert LossConfig.from_dict(cfg.to_dict()) == cfg
    assert LossConfig.from_dict(LossConfig().to_dict()) == LossConfig() == LossConfig.from_dict({})
    assert cfg.to_dict()["csa"] == {
        "enabled": True, "rate": 0.2, "tau": {"init": 0.3, "min": 0.10, "max": 0.99, "learnable": True},
        "mode": "add", "form": "contrastive", "reduction": "mean",
    }


def test_loss_config_accepts_dotted_cli_overrides():
    cfg = LossConfig.from_dict(
        {"csa.rate": "0.25", "csa.tau.init": 0.5, "csa.tau.max": "0.9", "usa.enabled": "no"}
    )
    assert cfg.csa.rate == 0.25 and cfg.csa.tau.init == 0.5 and cfg.csa.tau.max == 0.9
    assert not cfg.usa.enabled and cfg.needs_teacher
    again = cfg.updated({"usa.enabled": True, "contrastive.reduction": "SUM"})
    assert again.usa.enabled and again.contrastive.reduction == "sum" and cfg.csa == again.csa


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"csa.rte": 0.1}, "unknown loss setting 'csa.rte'"),
        ({"cross": {}}, "unknown loss setting 'cross'"),
        ({"csa.mode": "mul"}, "loss setting csa: mode must be one of"),
        ({"csa.rate": -1}, "loss setting csa: rate must be"),
        ({"csa.rate": "fast"}, "csa.rate must be a number"),
        ({"usa.enabled": "maybe"}, "usa.enabled must be true or false"),
        ({"contrastive.tau.init": 0.5}, "loss setting contrastive.tau: temperature needs"),
        ({"tau_soft": 0}, "tau_soft must be a positive"),
        ({"csa": 0.1}, "csa must be a mapping"),
        ({"csa.rate": 0.1, "csa": {"rate": 0.2}}, "given twice"),
    ],
)
def test_loss_config_rejects_bad_settings_naming_the_key(overrides, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        LossConfig.from_dict(overrides)
