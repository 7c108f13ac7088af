"""Survival: labels, the two losses, the interval bins and the metrics (issue 19, the survival task's parts).

Losses, restated from their papers:

- **Discrete-time negative log-likelihood** (Zadeh & Mahmood, "Bias in cross-entropy-based training of deep
  survival networks", IEEE TPAMI 2021). Follow-up is cut into K intervals; the head gives one logit per
  interval, the hazard ``h_k = sigmoid(logit_k)`` is the probability of the event in interval k given
  survival to it, and ``S_k = prod_{j<=k} (1 - h_j)`` (``S_{-1} = 1``). A patient whose event falls in
  interval y contributes ``-log S_{y-1} - log h_y``; one censored in interval y contributes ``-log S_y``.
  With ``alpha`` the uncensored term is up-weighted: ``(1 - alpha) * L + alpha * L_uncensored``.
- **Cox partial likelihood** (Cox 1972), Breslow's handling of ties, over a mini-batch of bags:
  ``-1/d * sum_{i: event} [r_i - log sum_{j: t_j >= t_i} exp(r_j)]`` with d the number of events. A batch
  without an event has no partial likelihood: its loss is 0 (with a gradient of zeros), never NaN.

Metrics come from scikit-survival, the implementation Patho-Bench reports with: Harrell's and Uno's
c-index, the cumulative/dynamic AUC at the quartiles of follow-up, and the integrated Brier score for
heads that give survival curves.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import WsiMilError


@dataclass(frozen=True)
class SurvivalLabel:
    time: float
    event: int  # 1: the event was observed; 0: censored at ``time``


def lines_text(lines: list[int]) -> str:
    """CSV line numbers as an error shows them: the first five, then how many more."""
    return ", ".join(str(n) for n in lines[:5]) + (f" (+{len(lines) - 5} more)" if len(lines) > 5 else "")


def survival_labels(rows: list[dict], name: str, time_column: str = "time",
                    event_column: str = "event") -> list[SurvivalLabel]:
    """Each row's (time, event), or one error line naming the rows whose time is missing, not a number or
    negative, or whose event is not 0/1. ``rows`` are a labels CSV's rows (line 2 is the first)."""
    if rows and not {time_column, event_column} <= set(rows[0]):
        raise WsiMilError(f"{name}: survival labels need columns slide_id,{time_column},{event_column} "
                          f"(train.survival.time_column / event_column)")
    bad_time, bad_event, out = [], [], []
    for line, r in enumerate(rows, start=2):
        t = _number(r.get(time_column))
        e = str(r.get(event_column, "")).strip()
        if t is None or t < 0:
            bad_time.append(line)
        if e not in ("0", "1", "0.0", "1.0"):
            bad_event.append(line)
        out.append(SurvivalLabel(t if t is not None else math.nan, int(float(e)) if e in ("0", "1", "0.0", "1.0")
                                 else -1))
    if bad_time:
        raise WsiMilError(f"{name}: {time_column} missing, not a number or negative on line(s) {lines_text(bad_time)}")
    if bad_event:
        raise WsiMilError(f"{name}: {event_column} must be 0 (censored) or 1 (event) on line(s) "
                          f"{lines_text(bad_event)}")
    return out


def _number(text) -> float | None:
    try:
        value = float(str(text).strip())
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def interval_edges(times: np.ndarray, events: np.ndarray, bins: int) -> np.ndarray:
    """K + 1 edges cutting follow-up at the quantiles of the uncensored times (of the training fold), the
    first at 0 and the last at infinity, as Zadeh & Mahmood (2021) and PORPOISE do. Fewer distinct
    quantiles than ``bins`` (tiny folds) give fewer intervals."""
    observed = times[events == 1] if (events == 1).any() else times
    inner = np.unique(np.quantile(observed, np.linspace(0, 1, bins + 1)[1:-1]))
    return np.concatenate([[0.0], inner, [np.inf]])


def interval_of(times: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """The interval index (0..K-1) of each time: edges[k] <= t < edges[k+1]."""
    return np.clip(np.searchsorted(edges, times, side="right") - 1, 0, len(edges) - 2)


def nll_loss(logits: torch.Tensor, interval: torch.Tensor, event: torch.Tensor, alpha: float = 0.0,
             eps: float = 1e-7) -> torch.Tensor:
    """The discrete-time negative log-likelihood (Zadeh & Mahmood 2021), mean over the batch.

    ``logits`` [B, K] hazard logits; ``interval`` [B] the interval of each time; ``event`` [B] 1/0."""
    hazards = torch.sigmoid(logits.float())
    surv = torch.cumprod(1 - hazards, dim=1)
    surv_pad = torch.cat([torch.ones_like(surv[:, :1]), surv], dim=1)  # S_{-1} = 1
    y = interval.long().unsqueeze(1)
    e = event.float()
    s_before = torch.gather(surv_pad, 1, y).squeeze(1).clamp_min(eps)
    h_at = torch.gather(hazards, 1, y).squeeze(1).clamp_min(eps)
    s_at = torch.gather(surv_pad, 1, y + 1).squeeze(1).clamp_min(eps)
    uncensored = -e * (torch.log(s_before) + torch.log(h_at))
    censored = -(1 - e) * torch.log(s_at)
    loss = censored + uncensored
    return ((1 - alpha) * loss + alpha * uncensored).mean()


def cox_loss(risk: torch.Tensor, time: torch.Tensor, event: torch.Tensor) -> torch.Tensor:
    """The negative Cox partial log-likelihood with Breslow's ties, mean over the events of the batch;
    0 (with a zero gradient) when the batch holds no event."""
    risk, e = risk.float().reshape(-1), event.float().reshape(-1)
    n_events = e.sum()
    if n_events < 1:
        return risk.sum() * 0.0
    at_risk = (time.reshape(1, -1) >= time.reshape(-1, 1)).float()  # [i, j]: j still at risk at t_i
    log_denominator = torch.logsumexp(risk.reshape(1, -1).masked_fill(at_risk == 0, float("-inf")), dim=1)
    return -((risk - log_denominator) * e).sum() / n_events


def survival_curves(logits: torch.Tensor) -> torch.Tensor:
    """S_k per interval from the hazard logits of the NLL head: cumprod(1 - sigmoid(logit))."""
    return torch.cumprod(1 - torch.sigmoid(logits.float()), dim=1)


def risk_from_curves(surv: np.ndarray) -> np.ndarray:
    """The risk score of the discrete-time head: minus the sum of the survival curve (higher: shorter)."""
    return -surv.sum(1)


def _structured(time: np.ndarray, event: np.ndarray):
    from sksurv.util import Surv

    return Surv.from_arrays(event=np.asarray(event).astype(bool), time=np.asarray(time, float))


def survival_metrics(time: np.ndarray, event: np.ndarray, risk: np.ndarray, train_time: np.ndarray,
                     train_event: np.ndarray, curves: np.ndarray | None = None,
                     curve_times: np.ndarray | None = None) -> dict:
    """Harrell's and Uno's c-index, time-dependent AUC at the quartiles of follow-up and, given survival
    curves at ``curve_times``, the integrated Brier score, all from scikit-survival. A metric the data
    cannot support (no event, no comparable pair, times outside the training follow-up) is NaN."""
    from sksurv.metrics import concordance_index_censored, concordance_index_ipcw, cumulative_dynamic_auc

    time, event, risk = np.asarray(time, float), np.asarray(event).astype(bool), np.asarray(risk, float)
    if not np.isfinite(risk).all():
        raise WsiMilError("survival metrics: a risk score is not finite")
    out = {"n": int(len(time)), "events": int(event.sum()), "c_index": math.nan, "c_index_uno": math.nan,
           "td_auc": {}, "mean_td_auc": math.nan, "ibs": math.nan}
    if event.sum() == 0 or len(time) < 2:
        return out
    out["c_index"] = _float(_try(lambda: concordance_index_censored(event, time, risk)[0]))
    train, test = _structured(train_time, train_event), _structured(time, event)
    tau = float(min(train_time.max(), time.max()))
    out["c_index_uno"] = _float(_try(lambda: concordance_index_ipcw(train, test, risk, tau=tau)[0]))
    quartiles = _eval_times(time, event, train_time)
    if len(quartiles):
        aucs = _try(lambda: cumulative_dynamic_auc(train, test, risk, quartiles))
        if aucs is not None:
            out["td_auc"] = {f"{t:g}": float(a) for t, a in zip(quartiles, aucs[0])}
            out["mean_td_auc"] = float(aucs[1])
    if curves is not None and curve_times is not None:
        out["ibs"] = _ibs(train, test, time, curves, curve_times)
    return out


def _eval_times(time: np.ndarray, event: np.ndarray, train_time: np.ndarray) -> np.ndarray:
    """The quartiles of follow-up, kept strictly inside both the test and training follow-up."""
    q = np.quantile(time, [0.25, 0.5, 0.75])
    lo, hi = time.min(), min(time.max(), np.asarray(train_time).max())
    return np.unique(q[(q > lo) & (q < hi)])


def _ibs(train, test, time: np.ndarray, curves: np.ndarray, curve_times: np.ndarray) -> float:
    from sksurv.metrics import integrated_brier_score

    grid = np.unique(curve_times[(curve_times > time.min()) & (curve_times < time.max())])
    if len(grid) < 2:
        return math.nan
    cols = [int(np.searchsorted(curve_times, g)) for g in grid]
    return _float(_try(lambda: integrated_brier_score(train, test, curves[:, cols], grid)))


def _try(fn):
    """scikit-survival raises ValueError where the data cannot support a metric (no comparable pair, times
    outside the censoring distribution's support): that metric is then NaN, the others still computed."""
    try:
        return fn()
    except (ValueError, ZeroDivisionError):
        return None


def _float(value) -> float:
    return math.nan if value is None else float(value)


def survival_loss(kind: str, logits: torch.Tensor, interval: torch.Tensor, time: torch.Tensor,
                  event: torch.Tensor, alpha: float = 0.0) -> torch.Tensor:
    """``nll`` (logits [B, K]) or ``cox`` (logits [B, 1]: the risk)."""
    if kind == "nll":
        return nll_loss(logits, interval, event, alpha)
    if kind == "cox":
        return cox_loss(logits[:, 0], time, event)
    raise WsiMilError(f"train.survival.loss: '{kind}' is not one of nll, cox")


__all__ = ["SurvivalLabel", "cox_loss", "interval_edges", "interval_of", "nll_loss", "risk_from_curves",
           "survival_curves", "survival_labels", "survival_loss", "survival_metrics"]


def risk_groups(risk: np.ndarray, groups: int = 2) -> np.ndarray:
    """Group index 0..groups-1 by quantiles of the risk (0: lowest risk); 2 groups: the median split."""
    cuts = np.quantile(risk, np.linspace(0, 1, groups + 1)[1:-1])
    return np.searchsorted(cuts, risk, side="right")


def logrank_p(time: np.ndarray, event: np.ndarray, group: np.ndarray) -> float:
    """The log-rank test's p-value across the groups (scikit-survival's ``compare_survival``); NaN when it
    cannot be computed (one group, no event)."""
    from sksurv.compare import compare_survival

    if len(np.unique(group)) < 2 or not np.asarray(event).any():
        return math.nan
    value = _try(lambda: compare_survival(_structured(time, event), group)[1])
    return _float(value)


def plot_km(time: np.ndarray, event: np.ndarray, risk: np.ndarray, groups: int, path, title: str = "") -> float:
    """Kaplan-Meier curves of the risk groups (scikit-survival's estimator) with the log-rank p-value,
    written to ``path`` atomically; returns the p-value."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sksurv.nonparametric import kaplan_meier_estimator

    from ..atomic import atomic_path

    group = risk_groups(risk, groups)
    p = logrank_p(time, event, group)
    fig, ax = plt.subplots(figsize=(6, 4))
    names = {2: ["low risk", "high risk"], 3: ["low risk", "intermediate risk", "high risk"]}.get(groups)
    time, event = np.asarray(time, float), np.asarray(event).astype(bool)
    for g in np.unique(group):
        sel = group == g
        t, s = kaplan_meier_estimator(event[sel], time[sel])
        name = names[g] if names else f"risk group {g + 1} of {groups}"
        line = ax.step(t, s, where="post", label=f"{name} (n={int(sel.sum())}, {int(event[sel].sum())} events)")[0]
        censored = time[sel & ~event]  # censoring marks on the curve, as KM plots show them
        at = s[np.clip(np.searchsorted(t, censored, side="right") - 1, 0, len(s) - 1)] if len(t) else []
        ax.plot(censored, at, "|", color=line.get_color(), markersize=8)
    ax.set_xlabel("time")
    ax.set_ylabel("survival probability")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"{title}log-rank p = {p:.3g}" if math.isfinite(p) else f"{title}log-rank p: n/a", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return p
