"""Issue 19 (survival, first part): the losses against independent computations on fixed inputs, the
metrics against scikit-survival and a brute-force Harrell c-index, and bad labels named by row."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from wsi_mil.errors import WsiMilError
from wsi_mil.mil.survival import (
    cox_loss,
    interval_edges,
    interval_of,
    nll_loss,
    risk_from_curves,
    survival_curves,
    survival_labels,
    survival_metrics,
)


def _nll_by_probabilities(logits: np.ndarray, y: np.ndarray, e: np.ndarray, alpha: float) -> float:
    """Zadeh & Mahmood (2021) from the event probabilities: P(T in interval k) = h_k prod_{j<k}(1 - h_j),
    P(T beyond interval k) = prod_{j<=k}(1 - h_j); one patient at a time, in float64."""
    h = 1 / (1 + np.exp(-logits.astype(np.float64)))
    total = []
    for hi, yi, ei in zip(h, y, e):
        survive_before = np.prod(1 - hi[:yi])
        if ei:
            uncensored = -math.log(hi[yi] * survive_before)
            total.append((1 - alpha) * uncensored + alpha * uncensored)
        else:
            total.append((1 - alpha) * -math.log(survive_before * (1 - hi[yi])))
    return float(np.mean(total))


@pytest.mark.parametrize("alpha", [0.0, 0.4])
def test_the_discrete_time_nll_is_zadeh_and_mahmoods_likelihood(alpha):
    rng = np.random.default_rng(3)
    logits = rng.normal(0, 1.5, (9, 4)).astype(np.float32)
    y = np.array([0, 1, 2, 3, 3, 0, 2, 1, 3])
    e = np.array([1, 0, 1, 1, 0, 0, 0, 1, 1])
    ours = nll_loss(torch.tensor(logits), torch.tensor(y), torch.tensor(e), alpha=alpha).item()
    assert ours == pytest.approx(_nll_by_probabilities(logits, y, e, alpha), rel=1e-5)


def _cox_by_loops(risk: np.ndarray, time: np.ndarray, event: np.ndarray) -> float:
    """Cox's partial likelihood with Breslow's ties, written as the sum over events of the log of
    exp(r_i) / sum over the risk set (every j with t_j >= t_i, ties included)."""
    terms = []
    for i in range(len(risk)):
        if event[i]:
            risk_set = [j for j in range(len(risk)) if time[j] >= time[i]]
            terms.append(math.log(math.exp(risk[i]) / sum(math.exp(risk[j]) for j in risk_set)))
    return -sum(terms) / len(terms)


def test_the_cox_loss_is_breslows_partial_likelihood_ties_included_and_a_batch_without_events_is_zero():
    rng = np.random.default_rng(4)
    risk = rng.normal(0, 1, 10)
    time = np.array([5.0, 3.0, 3.0, 8.0, 1.0, 5.0, 9.0, 2.0, 3.0, 7.0])  # ties at 3 and 5
    event = np.array([1, 1, 0, 0, 1, 1, 0, 1, 1, 0])
    ours = cox_loss(torch.tensor(risk), torch.tensor(time), torch.tensor(event)).item()
    assert ours == pytest.approx(_cox_by_loops(risk, time, event), rel=1e-5)
    r = torch.tensor(risk, requires_grad=True)
    none = cox_loss(r, torch.tensor(time), torch.zeros(10))
    none.backward()
    assert none.item() == 0.0 and torch.isfinite(r.grad).all() and float(r.grad.abs().sum()) == 0.0
    one = torch.tensor([0.3], requires_grad=True)  # a single bag with an event: log(1) = 0, finite
    assert cox_loss(one, torch.tensor([2.0]), torch.tensor([1])).item() == pytest.approx(0.0, abs=1e-7)


def test_intervals_cut_at_quantiles_of_the_uncensored_times():
    times = np.array([1.0, 2, 3, 4, 5, 6, 7, 8, 100, 200])
    events = np.array([1, 1, 1, 1, 1, 1, 1, 1, 0, 0])
    edges = interval_edges(times, events, 4)
    assert edges[0] == 0 and np.isinf(edges[-1])
    np.testing.assert_allclose(edges[1:-1], np.quantile(times[:8], [0.25, 0.5, 0.75]))
    assert interval_of(np.array([0.5, 2.74, 2.75, 500.0]), edges).tolist() == [0, 0, 1, 3]  # [lo, hi)


def _harrell_by_pairs(time, event, risk) -> float:
    """Comparable pairs: i had the event and t_i < t_j; concordant when r_i > r_j, a tie in risk counts half."""
    num = den = 0.0
    for i in range(len(time)):
        for j in range(len(time)):
            if event[i] and time[i] < time[j]:
                den += 1
                num += 1.0 if risk[i] > risk[j] else 0.5 if risk[i] == risk[j] else 0.0
    return num / den


def test_metrics_equal_scikit_survival_and_a_brute_force_harrell_c_index():
    from sksurv.metrics import concordance_index_ipcw, cumulative_dynamic_auc, integrated_brier_score
    from sksurv.util import Surv

    rng = np.random.default_rng(5)
    n = 60
    risk = rng.normal(0, 1, n)
    time = rng.exponential(10 * np.exp(-risk)) + 0.01
    event = (rng.random(n) < 0.7).astype(int)
    train_time, train_event = rng.exponential(10, 80) + 0.01, (rng.random(80) < 0.7).astype(int)
    train_time[0] = time.max() + 1  # the training follow-up covers the test's
    curve_times = np.quantile(time, np.linspace(0.05, 0.95, 12))
    curves = np.exp(-np.outer(np.exp(risk), curve_times) / 10)
    m = survival_metrics(time, event, risk, train_time, train_event, curves, curve_times)
    assert m["c_index"] == pytest.approx(_harrell_by_pairs(time, event, risk), abs=1e-12)
    train, test = Surv.from_arrays(train_event.astype(bool), train_time), Surv.from_arrays(event.astype(bool), time)
    assert m["c_index_uno"] == pytest.approx(concordance_index_ipcw(train, test, risk, tau=time.max())[0])
    quartiles = np.quantile(time, [0.25, 0.5, 0.75])
    auc, mean_auc = cumulative_dynamic_auc(train, test, risk, quartiles)
    assert list(m["td_auc"].values()) == pytest.approx(list(auc)) and m["mean_td_auc"] == pytest.approx(mean_auc)
    inside = (curve_times > time.min()) & (curve_times < time.max())
    assert m["ibs"] == pytest.approx(integrated_brier_score(train, test, curves[:, inside], curve_times[inside]))
    assert 0.5 < m["c_index"] <= 1  # risk drives time here: better than chance
    with pytest.raises(WsiMilError, match="not finite"):
        survival_metrics(time, event, np.where(np.arange(n) == 3, np.nan, risk), train_time, train_event)


def test_a_fold_without_events_gives_nan_metrics_not_an_error():
    m = survival_metrics(np.array([1.0, 2, 3]), np.zeros(3), np.array([0.1, 0.2, 0.3]), np.array([1.0, 5]),
                         np.array([1, 0]))
    assert math.isnan(m["c_index"]) and m["events"] == 0


def test_the_nll_heads_curves_and_risk_order_patients_by_hazard():
    logits = torch.tensor([[-3.0, -3.0, -3.0], [1.0, 1.0, 1.0]])
    curves = survival_curves(logits).numpy()
    assert (np.diff(curves, axis=1) <= 0).all() and curves[0, -1] > curves[1, -1]
    risk = risk_from_curves(curves)
    assert risk[1] > risk[0]


def test_bad_survival_labels_are_one_line_naming_the_rows():
    rows = [{"slide_id": f"s{i}", "time": t, "event": e} for i, (t, e) in
            enumerate([("3.5", "1"), ("", "0"), ("-2", "1"), ("4", "2"), ("abc", "1"), ("7", "yes"), ("nan", "0")])]
    with pytest.raises(WsiMilError) as err:
        survival_labels(rows, "labels.csv")
    assert str(err.value) == "labels.csv: time missing, not a number or negative on line(s) 3, 4, 6, 8"
    good_times = [dict(r, time="1") for r in rows]
    with pytest.raises(WsiMilError) as err:
        survival_labels(good_times, "labels.csv")
    assert str(err.value) == "labels.csv: event must be 0 (censored) or 1 (event) on line(s) 5, 7"
    ok = survival_labels([{"slide_id": "a", "os_months": "12.5", "dead": "1"}], "l.csv", "os_months", "dead")
    assert ok[0].time == 12.5 and ok[0].event == 1
    with pytest.raises(WsiMilError, match="need columns slide_id,os_months,dead"):
        survival_labels([{"slide_id": "a", "time": "1", "event": "1"}], "l.csv", "os_months", "dead")
