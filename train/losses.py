"""CUSA losses: contrastive, cross-modal (CSA) and uni-modal (USA) soft-label alignment, and the triplet
ranking loss that region-based students (SGR, SAF) use as their own image-text retrieval (ITR) term.

The loss functions are pure functions of B×B similarity matrices, teacher similarity blocks
and temperatures, so any student that yields embeddings (or, like SGR/SAF, scores pairs) can use
them. `CusaLoss` is a thin module that owns the learnable temperatures and the rates and builds
the student similarity matrices from embeddings (`forward`) or takes a student's own B×B score
matrix (`forward_similarity`).

Conventions shared by every function here:

- Rows index the query side and softmax/log-softmax run over the B columns of each row.
- Results are scalar tensors *without* the rates applied (the rates live in `CusaLoss`).
- Everything is computed in at least float32, with autocast switched off: bf16 keeps about three
  significant digits, too coarse for logits scaled by 1/τ (up to 100) and for KL values that are
  small differences of large terms.
- Teacher blocks never receive gradients: they are detached and upcast before use.
- A teacher entry of ``-inf`` means "this pair is not among the cached top-K neighbors" (the
  sparse soft-label mode). It gets probability 0 in the teacher distribution and contributes
  nothing to the KL or the soft cross-entropy (0·log 0 = 0). Every row must keep at least one
  finite entry; the diagonal (self-similarity) always qualifies. Treating an unknown pair as
  probability 0 is an approximation: the dense softmax would give it a small positive mass.

Reductions (`reduction="mean" | "sum"`), which only affect the cross-entropy forms:

- ``"sum"`` is the usual cross-entropy: sum over the columns, mean over the rows.
- ``"mean"`` is the reference implementation's default: mean over the columns and then the rows,
  i.e. the usual cross-entropy divided by B. The paper's rates (w_con=1.0, w_csa=0.1,
  w_usa=0.5) were tuned with this mode, so with batch 128 the contrastive term is 128× smaller
  than a standard cross-entropy *relative to CSA/USA*, whose KL form is always "batchmean". Using
  ``"sum"`` with the paper's rates therefore hands almost all of the gradient to the contrastive
  term and makes the soft-label terms nearly inert; rescale the rates if you switch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from train.paper import PAPER
from train.settings import Naming, apply_settings

REDUCTIONS = ("mean", "sum")
FORMS = ("kl", "contrastive")
CSA_MODES = ("each", "add", "dot")
TERMS = ("contrastive", "csa", "usa")

TauLike = Union[float, Tensor, "Temperature"]


# --------------------------------------------------------------------------------------------
# Input checks and small numeric helpers


def _check_choice(value: str, choices: Sequence[str], name: str) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {'|'.join(choices)}, got {value!r}")


def _check_square(x: Any, name: str) -> int:
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2 or x.shape[0] != x.shape[1]:
        raise ValueError(f"{name} must be a square B×B matrix, got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} is empty: a batch needs at least one row")
    return int(x.shape[0])


def _compute_dtype(x: Tensor) -> torch.dtype:
    # float32 at least; a float64 caller (e.g. a precision check) keeps float64.
    return torch.promote_types(x.dtype, torch.float32)


def _teacher(block: Any, name: str, size: int, like: Tensor, dtype: torch.dtype) -> Tensor:
    if not isinstance(block, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(block).__name__}")
    if tuple(block.shape) != (size, size):
        raise ValueError(
            f"{name} must have the student's shape {(size, size)}, got {tuple(block.shape)}"
        )
    return block.detach().to(device=like.device, dtype=dtype)


def _tau(tau: TauLike, name: str, like: Tensor, dtype: torch.dtype) -> Tensor | float:
    if isinstance(tau, Temperature):
        tau = tau()
    if isinstance(tau, Tensor):
        if tau.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got shape {tuple(tau.shape)}")
        # No value check here: reading a GPU tensor would synchronise every step.
        return tau.reshape(()).to(device=like.device, dtype=dtype)
    if isinstance(tau, bool) or not isinstance(tau, (int, float)):
        raise ValueError(f"{name} must be a float or a scalar tensor, got {type(tau).__name__}")
    if not (math.isfinite(tau) and tau > 0):
        raise ValueError(f"{name} must be a positive finite number, got {tau!r}")
    return float(tau)


@contextlib.contextmanager
def _full_precision(device: torch.device) -> Iterator[None]:
    """Switch autocast off so that the loss arithmetic stays in float32 under bf16 training."""
    if torch.amp.is_autocast_available(device.type):
        with torch.autocast(device_type=device.type, enabled=False):
            yield
    else:
        yield


def _soft_targets(teacher: Tensor, tau_soft: Tensor | float) -> Tensor:
    # -inf entries (pairs outside the cached top-K) come out as exact zeros.
    if isinstance(tau_soft, float) and tau_soft == 1.0:
        return torch.softmax(teacher, dim=1)  # x / 1.0 is x exactly: the reference τ_s skips a B×B division
    return torch.softmax(teacher / tau_soft, dim=1)


def _target_dot_log(target: Tensor, log_q: Tensor) -> Tensor:
    """Row sums of target·log q.

    log q comes from log_softmax of finite logits, which is finite (its smallest value is bounded by the range of
    the row's logits), so a zero target entry (a masked pair, a non-positive) contributes exactly 0 without a
    special case; the masking sits in the target, never in q. A plain product also costs a third of a guarded one,
    which a cheap student's training step feels.
    """
    return (target * log_q).sum(dim=1)


class _TeacherTargets:
    """The teacher distributions softmax(T/τ_s) of one batch and their row sums Σ P·log P, each computed once.

    CSA and USA read the same distributions (in CSA's default "each" mode) and the same entropies: computing them
    once per batch instead of once per term leaves every value as it was and saves their arithmetic. Entries are
    keyed by the tensor they were computed from, which they keep alive so the key cannot be reused.
    """

    def __init__(self, tau_soft: Tensor | float):
        self.tau_soft = tau_soft
        self._distributions: dict[int, tuple[Tensor, Tensor]] = {}
        self._entropies: dict[int, tuple[Tensor, Tensor]] = {}

    def distribution(self, teacher: Tensor) -> Tensor:
        key = id(teacher)
        if key not in self._distributions:
            self._distributions[key] = (teacher, _soft_targets(teacher, self.tau_soft))
        return self._distributions[key][1]

    def entropy(self, target: Tensor) -> Tensor:
        key = id(target)
        if key not in self._entropies:
            # xlogy gives 0·log 0 = 0 for the masked entries.
            self._entropies[key] = (target, torch.xlogy(target, target).sum(dim=1))
        return self._entropies[key][1]


def _kl_batchmean(target: Tensor, logits: Tensor, tau: Tensor | float, entropy: Tensor | None = None) -> Tensor:
    """KL(target ‖ softmax(logits/τ)) summed over columns and divided by the number of rows; ``entropy`` is
    target's Σ P·log P per row when already known."""
    log_q = F.log_softmax(logits / tau, dim=1)
    # xlogy gives 0·log 0 = 0 for the masked entries.
    entropy_part = torch.xlogy(target, target).sum(dim=1) if entropy is None else entropy
    return (entropy_part - _target_dot_log(target, log_q)).sum() / logits.shape[0]


def _soft_cross_entropy(target: Tensor, logits: Tensor, tau: Tensor | float, reduction: str) -> Tensor:
    """−Σ_s target·log softmax(logits/τ), reduced as in the reference ("mean" divides by B too)."""
    log_q = F.log_softmax(logits / tau, dim=1)
    per_row = -_target_dot_log(target, log_q)
    if reduction == "mean":
        per_row = per_row / logits.shape[1]
    return per_row.mean()


def _alignment(target: Tensor, logits: Tensor, tau: Tensor | float, form: str, reduction: str,
               targets: _TeacherTargets) -> Tensor:
    if form == "kl":
        return _kl_batchmean(target, logits, tau, targets.entropy(target))
    return _soft_cross_entropy(target, logits, tau, reduction)


def _id_codes(image_ids: Any, size: int, device: torch.device) -> Tensor:
    """Image identities as a 1-D tensor on `device`; lists of any hashable ids are coded 0..n-1."""
    if isinstance(image_ids, Tensor):
        ids = image_ids
        if ids.dim() != 1:
            raise ValueError(f"image_ids must be 1-D, got shape {tuple(ids.shape)}")
    else:
        try:
            values = list(image_ids)
        except TypeError:
            raise ValueError(
                f"image_ids must be a tensor or a sequence, got {type(image_ids).__name__}"
            ) from None
        codes: dict[Any, int] = {}
        try:
            ids = torch.tensor([codes.setdefault(v, len(codes)) for v in values], dtype=torch.int64)
        except TypeError:
            raise ValueError("image_ids must hold hashable values (ints or strings)") from None
    if ids.shape[0] != size:
        raise ValueError(f"image_ids has {ids.shape[0]} entries but the batch has {size} rows")
    return ids.to(device)


def _multi_positive_targets(ids: Tensor, dtype: torch.dtype) -> Tensor:
    same = (ids[:, None] == ids[None, :]).to(dtype)
    return same / same.sum(dim=1, keepdim=True)


# --------------------------------------------------------------------------------------------
# The three losses


def contrastive_loss(sim: Tensor, image_ids: Any, tau: TauLike, reduction: str = "mean") -> Tensor:
    """Multi-positive image-text contrastive loss (L_i2t + L_t2i) / 2, rate not applied.

    sim: B×B image→text cosine matrix, rows images, columns captions.
    image_ids: B image identities (tensor or sequence of hashables); rows sharing an id are
        positives of each other, with target Y[r, s] = 1[id_r == id_s] / Σ_s 1[id_r == id_s].
    tau: temperature (float, scalar tensor or `Temperature`).
    reduction: "mean" (reference default: cross-entropy / B) or "sum" (usual cross-entropy).
        See the module docstring for why the choice interacts with the paper's rates.
    """
    size = _check_square(sim, "sim")
    _check_choice(reduction, REDUCTIONS, "reduction")
    dtype = _compute_dtype(sim)
    with _full_precision(sim.device):
        s = sim.to(dtype)
        t = _tau(tau, "tau", s, dtype)
        targets = _multi_positive_targets(_id_codes(image_ids, size, s.device), dtype)
        # Y is symmetric (same-id relation, row counts equal along the relation), so the
        # caption→image direction uses the same targets on the transposed matrix.
        loss_i2t = _soft_cross_entropy(targets, s, t, reduction)
        loss_t2i = _soft_cross_entropy(targets, s.T, t, reduction)
        return (loss_i2t + loss_t2i) / 2


def _csa_targets(
    teacher_images: Tensor, teacher_texts: Tensor, mode: str
) -> tuple[Tensor, Tensor]:
    """Teacher logits for the (image→text, text→image) directions under each CSA mode."""
    if mode == "each":
        return teacher_images, teacher_texts
    if mode == "add":
        # -inf in either block stays -inf: a pair unknown to one teacher has no combined score.
        combined = (teacher_images + teacher_texts) / 2
        return combined, combined
    unknown = torch.isneginf(teacher_images) | torch.isneginf(teacher_texts)
    combined = torch.sqrt(torch.relu(teacher_images) * torch.relu(teacher_texts))
    combined = combined.masked_fill(unknown, float("-inf"))
    return combined, combined


def csa_loss(
    sim: Tensor,
    teacher_images: Tensor,
    teacher_texts: Tensor,
    tau: TauLike,
    tau_soft: TauLike = 1.0,
    mode: str = "each",
    form: str = "kl",
    reduction: str = "mean",
) -> Tensor:
    """Cross-modal soft-label alignment, (term_i2t + term_t2i) / 2, rate not applied.

    With P_i = softmax(T_ii/τ_s) and P_t = softmax(T_tt/τ_s):
    term_i2t = KL(P_i ‖ softmax(sim/τ)), term_t2i = KL(P_t ‖ softmax(simᵀ/τ)), each KL summed over
    columns and divided by B ("batchmean"). mode "add" uses (T_ii+T_tt)/2 for both directions,
    "dot" uses sqrt(relu(T_ii)·relu(T_tt)); in both, a pair masked (-inf) in either block stays
    masked. form "contrastive" replaces the KL with the soft-target cross-entropy reduced by
    `reduction` ("mean" | "sum", as in `contrastive_loss`); the KL form ignores `reduction`.
    """
    size = _check_square(sim, "sim")
    _check_choice(mode, CSA_MODES, "mode")
    _check_choice(form, FORMS, "form")
    _check_choice(reduction, REDUCTIONS, "reduction")
    dtype = _compute_dtype(sim)
    with _full_precision(sim.device):
        s = sim.to(dtype)
        t_ii = _teacher(teacher_images, "teacher_images", size, s, dtype)
        t_tt = _teacher(teacher_texts, "teacher_texts", size, s, dtype)
        t = _tau(tau, "tau", s, dtype)
        t_soft = _tau(tau_soft, "tau_soft", s, dtype)
        return _csa(s, t_ii, t_tt, t, mode, form, reduction, _TeacherTargets(t_soft))


def _csa(s: Tensor, t_ii: Tensor, t_tt: Tensor, t: Tensor | float, mode: str, form: str, reduction: str,
         targets: _TeacherTargets) -> Tensor:
    """`csa_loss` on checked inputs of one dtype, the teacher distributions read from ``targets``."""
    logits_i2t, logits_t2i = _csa_targets(t_ii, t_tt, mode)
    term_i2t = _alignment(targets.distribution(logits_i2t), s, t, form, reduction, targets)
    term_t2i = _alignment(targets.distribution(logits_t2i), s.T, t, form, reduction, targets)
    return (term_i2t + term_t2i) / 2


def usa_loss(
    sim_images: Tensor,
    sim_texts: Tensor,
    teacher_images: Tensor,
    teacher_texts: Tensor,
    tau_images: TauLike,
    tau_texts: TauLike,
    tau_soft: TauLike = 1.0,
    form: str = "kl",
    reduction: str = "mean",
) -> Tensor:
    """Uni-modal soft-label alignment, (term_images + term_texts) / 2, rate not applied.

    term_images = KL(softmax(T_ii/τ_s) ‖ softmax(S_ii'/τ_ui)), term_texts likewise with T_tt,
    S_tt' and τ_ut; batchmean KL. form "contrastive" uses the soft-target cross-entropy with
    `reduction` instead (the KL form ignores `reduction`).
    """
    size = _check_square(sim_images, "sim_images")
    if _check_square(sim_texts, "sim_texts") != size:
        raise ValueError(
            f"sim_images and sim_texts must have the same batch size, got {size} and {sim_texts.shape[0]}"
        )
    _check_choice(form, FORMS, "form")
    _check_choice(reduction, REDUCTIONS, "reduction")
    dtype = torch.promote_types(_compute_dtype(sim_images), _compute_dtype(sim_texts))
    with _full_precision(sim_images.device):
        s_ii = sim_images.to(dtype)
        s_tt = sim_texts.to(device=s_ii.device, dtype=dtype)
        t_ii = _teacher(teacher_images, "teacher_images", size, s_ii, dtype)
        t_tt = _teacher(teacher_texts, "teacher_texts", size, s_ii, dtype)
        tau_i = _tau(tau_images, "tau_images", s_ii, dtype)
        tau_t = _tau(tau_texts, "tau_texts", s_ii, dtype)
        t_soft = _tau(tau_soft, "tau_soft", s_ii, dtype)
        return _usa(s_ii, s_tt, t_ii, t_tt, tau_i, tau_t, form, reduction, _TeacherTargets(t_soft))


def _usa(s_ii: Tensor, s_tt: Tensor, t_ii: Tensor, t_tt: Tensor, tau_i: Tensor | float, tau_t: Tensor | float,
         form: str, reduction: str, targets: _TeacherTargets) -> Tensor:
    """`usa_loss` on checked inputs of one dtype, the teacher distributions read from ``targets``."""
    term_images = _alignment(targets.distribution(t_ii), s_ii, tau_i, form, reduction, targets)
    term_texts = _alignment(targets.distribution(t_tt), s_tt, tau_t, form, reduction, targets)
    return (term_images + term_texts) / 2


def triplet_loss(sim: Tensor, image_ids: Any, margin: float = 0.2, max_violation: bool = True,
                 reduction: str = "sum") -> Tensor:
    """Hinge triplet ranking loss of VSE++ (Faghri et al.), the base loss of SCAN/SGRAF, rate not applied.

    sim: B×B scores, rows images, columns captions; row r and column r are the pair of batch row r.
    image_ids: B image identities (as in `contrastive_loss`); pairs showing the same image are never
        negatives of each other.
    For each pair r, with d_r = sim[r, r]:
      image→caption costs [margin + sim[r, s] − d_r]₊ over captions s of other images,
      caption→image costs [margin + sim[s, r] − d_r]₊ over images s of other images;
    max_violation keeps only the hardest negative of each direction (VSE++, SGRAF), otherwise all are summed.
    The loss is the sum over both directions and all rows ("sum", as VSE++ and SGRAF), or that sum divided
    by B ("mean").
    """
    size = _check_square(sim, "sim")
    _check_choice(reduction, REDUCTIONS, "reduction")
    if not (isinstance(margin, (int, float)) and math.isfinite(margin) and margin >= 0):
        raise ValueError(f"margin must be a finite number >= 0, got {margin!r}")
    dtype = _compute_dtype(sim)
    with _full_precision(sim.device):
        s = sim.to(dtype)
        ids = _id_codes(image_ids, size, s.device)
        negative = ids[:, None] != ids[None, :]
        positive = s.diagonal()
        zero = torch.zeros((), dtype=dtype, device=s.device)
        # hinge costs are >= 0, so a masked (0) entry never wins the max over a row that has negatives
        cost_captions = torch.where(negative, (margin + s - positive[:, None]).clamp(min=0), zero)
        cost_images = torch.where(negative, (margin + s - positive[None, :]).clamp(min=0), zero)
        if max_violation:
            total = cost_captions.max(dim=1).values.sum() + cost_images.max(dim=0).values.sum()
        else:
            total = cost_captions.sum() + cost_images.sum()
        return total / size if reduction == "mean" else total


# --------------------------------------------------------------------------------------------
# Configuration: the defaults are the paper's (train/paper.py); overrides go through train/settings.py


def _check_rate(rate: float, name: str) -> None:
    if not (math.isfinite(rate) and rate >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {rate!r}")


@dataclass
class TemperatureConfig:
    """A temperature's initial raw value, its clamp range and whether it is trained."""

    init: float
    min: float
    max: float
    learnable: bool = True

    SHORTHAND = "init"  # a bare number (``csa.tau=0.3``) sets the initial value and keeps the clamp range

    def __post_init__(self) -> None:
        if not all(math.isfinite(v) for v in (self.init, self.min, self.max)):
            raise ValueError(f"temperature values must be finite, got {self}")
        if not (0 < self.min <= self.init <= self.max):
            raise ValueError(
                "temperature needs 0 < min <= init <= max, "
                f"got init={self.init} min={self.min} max={self.max}"
            )


def _paper_temperature(term: str, name: str = "tau"):
    """A default factory: the paper's temperature ``name`` of ``term``."""
    return lambda: TemperatureConfig(**PAPER[term][name])


@dataclass
class ContrastiveConfig:
    enabled: bool = True
    rate: float = PAPER["contrastive"]["rate"]
    tau: TemperatureConfig = field(default_factory=_paper_temperature("contrastive"))
    reduction: str = PAPER["contrastive"]["reduction"]

    def __post_init__(self) -> None:
        _check_rate(self.rate, "rate")
        _check_choice(self.reduction, REDUCTIONS, "reduction")


ITR_LOSSES = ("auto", "contrastive", "triplet")


@dataclass
class ItrConfig:
    """Which image-text retrieval loss the `contrastive` term is: "contrastive" (InfoNCE, the dual encoders'),
    "triplet" (VSE++ hardest-negative hinge, the region students'), or "auto" (each student's own). The term's
    `enabled` and `rate` stay under `contrastive`. The triplet defaults are VSE++'s and SGRAF's."""

    loss: str = "auto"
    margin: float = 0.2
    max_violation: bool = True
    reduction: str = "sum"  # triplet: sum over the batch as VSE++/SGRAF, or "mean" (divided by B)

    def __post_init__(self) -> None:
        _check_choice(self.loss, ITR_LOSSES, "loss")
        _check_choice(self.reduction, REDUCTIONS, "reduction")
        if not (math.isfinite(self.margin) and self.margin >= 0):
            raise ValueError(f"margin must be a finite number >= 0, got {self.margin!r}")


@dataclass
class CsaConfig:
    enabled: bool = True
    rate: float = PAPER["csa"]["rate"]
    tau: TemperatureConfig = field(default_factory=_paper_temperature("csa"))
    mode: str = PAPER["csa"]["mode"]
    form: str = PAPER["csa"]["form"]
    reduction: str = "mean"

    def __post_init__(self) -> None:
        _check_rate(self.rate, "rate")
        _check_choice(self.mode, CSA_MODES, "mode")
        _check_choice(self.form, FORMS, "form")
        _check_choice(self.reduction, REDUCTIONS, "reduction")


@dataclass
class UsaConfig:
    enabled: bool = True
    rate: float = PAPER["usa"]["rate"]
    tau_images: TemperatureConfig = field(default_factory=_paper_temperature("usa", "tau_images"))
    tau_texts: TemperatureConfig = field(default_factory=_paper_temperature("usa", "tau_texts"))
    form: str = PAPER["usa"]["form"]
    reduction: str = "mean"

    def __post_init__(self) -> None:
        _check_rate(self.rate, "rate")
        _check_choice(self.form, FORMS, "form")
        _check_choice(self.reduction, REDUCTIONS, "reduction")


@dataclass
class LossConfig:
    """Every knob of the CUSA loss, nested as {"contrastive": {...}, "itr": {...}, "csa": {...}, "usa": {...},
    "tau_soft": float}. Defaults are the paper's (train/paper.py).

    `from_dict` and `updated` take nested or dotted keys (``csa.rate=0.1``, ``usa.enabled=false``,
    ``csa.tau.max=0.9``; a temperature given as a bare number, ``csa.tau=0.3``, sets its initial value), through
    the settings engine every configuration shares (train/settings.py). Messages name "loss setting" KEY, keys
    counted from here, and names such as modes are read case-insensitively.
    """

    contrastive: ContrastiveConfig = field(default_factory=ContrastiveConfig)
    itr: ItrConfig = field(default_factory=ItrConfig)
    csa: CsaConfig = field(default_factory=CsaConfig)
    usa: UsaConfig = field(default_factory=UsaConfig)
    # Teacher soft-label temperature τ_s: frozen and shared by CSA and USA, as in the reference.
    tau_soft: float = PAPER["tau_soft"]

    SETTINGS_NAMING = Naming("loss setting", top="loss", dotted_sections=True, fold_case=True)

    def __post_init__(self) -> None:
        if not (math.isfinite(self.tau_soft) and self.tau_soft > 0):
            raise ValueError(f"tau_soft must be a positive finite number, got {self.tau_soft!r}")

    @property
    def terms(self) -> tuple[str, ...]:
        """Names of the enabled terms, in the order contrastive, csa, usa."""
        return tuple(name for name in TERMS if getattr(self, name).enabled)

    @property
    def needs_teacher(self) -> bool:
        return self.csa.enabled or self.usa.enabled

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None = None) -> LossConfig:
        """Build from defaults plus a (possibly partial, possibly dotted-key) nested mapping."""
        if data is None:
            return cls()
        if not isinstance(data, Mapping):
            raise ValueError(f"loss settings must be a mapping, got {type(data).__name__}")
        return apply_settings(cls(), data)

    def updated(self, overrides: Mapping[str, Any]) -> LossConfig:
        """A copy with `overrides` (same shapes as `from_dict`) applied on top of this config."""
        return apply_settings(self, overrides)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------
# Modules


class Temperature(nn.Module):
    """A temperature stored as its raw value (not its log), as the reference does.

    Learnable temperatures are parameters with requires_grad=True; frozen ones keep
    requires_grad=False so that state dicts look the same either way. Call `clamp_()` after each
    optimizer step to keep the value inside [min, max].
    """

    def __init__(self, init: float, min: float, max: float, learnable: bool = True) -> None:
        super().__init__()
        TemperatureConfig(float(init), float(min), float(max), bool(learnable))  # validates
        self.min = float(min)
        self.max = float(max)
        self.value = nn.Parameter(
            torch.tensor(float(init), dtype=torch.float32), requires_grad=bool(learnable)
        )

    @classmethod
    def from_config(cls, config: TemperatureConfig) -> Temperature:
        return cls(config.init, config.min, config.max, config.learnable)

    @property
    def learnable(self) -> bool:
        return self.value.requires_grad

    def forward(self) -> Tensor:
        return self.value

    @torch.no_grad()
    def clamp_(self) -> Temperature:
        self.value.clamp_(self.min, self.max)
        return self

    def item(self) -> float:
        return float(self.value.detach().item())

    def extra_repr(self) -> str:
        return f"value={self.item():.4g}, min={self.min}, max={self.max}, learnable={self.learnable}"


def _embeddings(x: Any, name: str, size: int | None = None) -> Tensor:
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be a B×D matrix, got shape {tuple(x.shape)}")
    if size is not None and x.shape[0] != size:
        raise ValueError(f"{name} has {x.shape[0]} rows but the batch has {size}")
    return x


def _similarity(a: Tensor, b: Tensor, name: str) -> Tensor:
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"{name}: embedding widths differ ({a.shape[1]} vs {b.shape[1]})")
    dtype = torch.promote_types(_compute_dtype(a), _compute_dtype(b))
    return a.to(dtype) @ b.to(dtype).T


class CusaLoss(nn.Module):
    """Contrastive + CSA + USA with rates applied; owns the temperatures of the enabled terms.

    Only enabled terms get a temperature module, so a disabled term leaves no unused parameter
    behind (DistributedDataParallel would otherwise demand find_unused_parameters). The ITR term
    ("contrastive") is InfoNCE unless `itr.loss` is "triplet" (which needs no temperature).

    `forward` takes embeddings (dual encoders); `forward_similarity` takes the student's B×B
    image→caption score matrix directly (region students, which score pairs) and the uni-modal
    embeddings for USA.
    """

    def __init__(self, config: LossConfig | None = None) -> None:
        super().__init__()
        self.config = config if config is not None else LossConfig()
        if not self.config.terms:
            raise ValueError("no loss term is enabled: enable at least one of contrastive, csa, usa")
        taus: dict[str, Temperature] = {}
        if self.config.contrastive.enabled and not self.triplet:
            taus["tau"] = Temperature.from_config(self.config.contrastive.tau)
        if self.config.csa.enabled:
            taus["tau_csa"] = Temperature.from_config(self.config.csa.tau)
        if self.config.usa.enabled:
            taus["tau_usa_images"] = Temperature.from_config(self.config.usa.tau_images)
            taus["tau_usa_texts"] = Temperature.from_config(self.config.usa.tau_texts)
        self.taus = nn.ModuleDict(taus)

    def clamp_(self) -> CusaLoss:
        """Clamp every temperature into its range; call after each optimizer step."""
        for tau in self.taus.values():
            tau.clamp_()
        return self

    def temperatures(self) -> dict[str, float]:
        """Current temperature values (this reads them to the host: use for logging)."""
        values = {name: tau.item() for name, tau in self.taus.items()}
        if self.config.needs_teacher:
            values["tau_soft"] = self.config.tau_soft
        return values

    @property
    def triplet(self) -> bool:
        """True when the ITR term is the triplet ranking loss ("auto" means InfoNCE here; a trainer
        resolves it per student before building the loss)."""
        return self.config.itr.loss == "triplet"

    def forward(
        self,
        img_cross: Tensor,
        txt_cross: Tensor,
        img_uni: Tensor | None,
        txt_uni: Tensor | None,
        image_ids: Any,
        teacher_images: Tensor | None = None,
        teacher_texts: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Loss terms for one batch of L2-normalised embeddings.

        img_cross/txt_cross feed the contrastive and CSA terms (S_it = img_cross·txt_crossᵀ),
        img_uni/txt_uni feed USA (S_ii' and S_tt'; may be None when USA is off). image_ids may be
        None, meaning every row shows a different image. Returns {"loss", "contrastive", "csa",
        "usa"}, each term with its rate applied and a zero tensor when the term is off.
        """
        cfg = self.config
        size = _embeddings(img_cross, "img_cross").shape[0]
        _embeddings(txt_cross, "txt_cross", size)
        with _full_precision(img_cross.device):
            s_it = None
            if cfg.contrastive.enabled or cfg.csa.enabled:
                s_it = _similarity(img_cross, txt_cross, "img_cross/txt_cross")
            return self.forward_similarity(s_it, img_uni, txt_uni, image_ids, teacher_images, teacher_texts,
                                           size=size)

    def forward_similarity(
        self,
        sim: Tensor | None,
        img_uni: Tensor | None,
        txt_uni: Tensor | None,
        image_ids: Any,
        teacher_images: Tensor | None = None,
        teacher_texts: Tensor | None = None,
        size: int | None = None,
    ) -> dict[str, Tensor]:
        """Loss terms for one batch given the B×B image→caption similarity matrix `sim` (rows images,
        columns captions; may be None when neither the ITR term nor CSA is on, with `size` given).

        The ITR term and CSA consume `sim` as it is: cosines for dual encoders, scores in (0, 1) for
        region students (whose logits sim/τ then span half the range a cosine gives at the same τ).
        USA uses img_uni/txt_uni. Same returns as `forward`.
        """
        cfg = self.config
        if sim is not None:
            size = _check_square(sim, "sim")
        elif cfg.contrastive.enabled or cfg.csa.enabled or size is None:
            raise ValueError("the contrastive and csa terms need the similarity matrix sim, got None")
        if cfg.needs_teacher and (teacher_images is None or teacher_texts is None):
            raise ValueError(
                f"the {'/'.join(t for t in cfg.terms if t != 'contrastive')} term needs teacher_images "
                "and teacher_texts blocks, got None"
            )
        if cfg.usa.enabled:
            if img_uni is None or txt_uni is None:
                raise ValueError("the usa term needs img_uni and txt_uni embeddings, got None")
            _embeddings(img_uni, "img_uni", size)
            _embeddings(txt_uni, "txt_uni", size)
        device = sim.device if sim is not None else img_uni.device
        if image_ids is None:
            image_ids = torch.arange(size, device=device)

        zero = torch.zeros((), dtype=torch.float32, device=device)
        out = {"contrastive": zero, "csa": zero, "usa": zero}
        with _full_precision(device):
            if cfg.contrastive.enabled:
                if self.triplet:
                    term = triplet_loss(sim, image_ids, cfg.itr.margin, cfg.itr.max_violation, cfg.itr.reduction)
                else:
                    term = contrastive_loss(sim, image_ids, self.taus["tau"](), cfg.contrastive.reduction)
                out["contrastive"] = cfg.contrastive.rate * term
            # What csa_loss and usa_loss compute, with the teacher blocks checked and converted once and the
            # teacher distributions and entropies they share computed once (the values are the same).
            converted: dict[torch.dtype, tuple[Tensor, Tensor]] = {}
            targets = _TeacherTargets(cfg.tau_soft)

            def teacher_blocks(like: Tensor) -> tuple[Tensor, Tensor]:
                if like.dtype not in converted:
                    converted[like.dtype] = (_teacher(teacher_images, "teacher_images", size, like, like.dtype),
                                             _teacher(teacher_texts, "teacher_texts", size, like, like.dtype))
                return converted[like.dtype]

            if cfg.csa.enabled:
                s = sim.to(_compute_dtype(sim))
                term = _csa(s, *teacher_blocks(s), _tau(self.taus["tau_csa"](), "tau", s, s.dtype), cfg.csa.mode,
                            cfg.csa.form, cfg.csa.reduction, targets)
                out["csa"] = cfg.csa.rate * term
            if cfg.usa.enabled:
                s_ii = _similarity(img_uni, img_uni, "img_uni")
                s_tt = _similarity(txt_uni, txt_uni, "txt_uni")
                dtype = torch.promote_types(_compute_dtype(s_ii), _compute_dtype(s_tt))
                s_ii, s_tt = s_ii.to(dtype), s_tt.to(device=s_ii.device, dtype=dtype)
                term = _usa(s_ii, s_tt, *teacher_blocks(s_ii), _tau(self.taus["tau_usa_images"](), "tau_images",
                                                                    s_ii, dtype),
                            _tau(self.taus["tau_usa_texts"](), "tau_texts", s_ii, dtype), cfg.usa.form,
                            cfg.usa.reduction, targets)
                out["usa"] = cfg.usa.rate * term
        total = sum((out[name] for name in cfg.terms), start=zero)
        return {"loss": total, **out}
