"""gradscope.analysis.tune: the schedule fits the budget, the summaries match a hand computation,
a diverged candidate is never chosen, ties go to the larger threshold, unseeded probes are seen."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from gradscope.analysis import tune as t
from gradscope.rundir import normalize_steps


def _steps(loss, grad_norm=None, clip=math.nan, skipped=None):
    n = len(loss)
    g = np.ones(n) if grad_norm is None else np.asarray(grad_norm, float)
    df = pd.DataFrame({"rank": 0, "optimizer": 0, "step": np.arange(n), "loss": np.asarray(loss, float),
                       "grad_norm": g, "clip_max_norm": clip, "clipped": g > clip if clip == clip else False,
                       "skipped": np.zeros(n, bool) if skipped is None else skipped})
    return normalize_steps(df)


def _summary(tau, loss, se=0.01, diverged=False, steps=100):
    return t.ProbeSummary(tau, steps, 20, loss, se * math.sqrt(20), se, 10.0, 0.5, 0.8, diverged,
                          "non-finite" if diverged else None)


@pytest.mark.parametrize("T,B,K,pilot", [(300, 3, 8, None), (300, 3, 8, 300), (1000, 2, 8, None),
                                         (120, 3, 4, None), (50, 3, 8, None), (400, 3, 3, 400)])
def test_plan_fits_the_budget_and_halves(T, B, K, pilot):
    p = t.plan(T, B, K, pilot_steps=pilot)
    assert p.planned_steps <= B * T
    # recomputed by hand: the pilot, then every rung's probes, the pilot standing in for the as-is one
    pl = p.rungs[0].steps if pilot is None else pilot
    by_hand = pl + sum((r.keep - (k == 0 and r.steps <= pl)) * r.steps for k, r in enumerate(p.rungs))
    assert by_hand == p.planned_steps
    keeps = [r.keep for r in p.rungs]
    assert keeps[0] == K and keeps[-1] == min(K, 3)
    assert all(a > b for a, b in zip(keeps, keeps[1:]))
    lengths = [r.steps for r in p.rungs]
    assert lengths == sorted(lengths) and lengths[-1] <= T


def test_plan_reaches_the_whole_training_when_it_can_and_refuses_a_tiny_budget():
    p = t.plan(300, 3, 8)
    assert p.rungs[-1].steps < 300  # three finalists of 300 steps need more than 3 runs
    # whole_budget: pilot 25 + 7*25 + 3*300 = 1100 steps = 3.67 runs; that budget reaches T, a step less does not
    assert p.whole_budget == pytest.approx(1100 / 300)
    assert t.plan(300, 1100 / 300, 8).rungs[-1].steps == 300
    assert t.plan(300, 1099 / 300, 8).rungs[-1].steps < 300
    assert t.plan(300, 3, 8, pilot_steps=300).whole_budget == pytest.approx((300 + 175 + 900) / 300)
    with pytest.raises(ValueError, match="too small"):
        t.plan(300, 1.0, 8, pilot_steps=300)
    with pytest.raises(ValueError, match=r"at least 1\.17 needed"):  # pilot 5 + 7*5 + 3*10 = 70 of 60
        t.plan(60, 0.5, 8)


def test_plan_is_every_candidate_for_t_12_then_three_finalists_as_long_as_the_rest_allows():
    p = t.plan(300, 3, 8)
    assert [(r.steps, r.keep) for r in p.rungs] == [(25, 8), (233, 3)]  # pilot 25 + 7*25 + 3*233 = 899
    assert p.planned_steps == 899 <= 3 * 300
    no_free = t.plan(300, 3, 8, as_is_in_pilot=False)  # 25 + 8*25 + 3*225 = 900
    assert [(r.steps, r.keep) for r in no_free.rungs] == [(25, 8), (225, 3)]
    # a budget that reaches the whole training: the first rung as long as the rest allows (37 + 7*37 + 900 = 1196)
    assert [(r.steps, r.keep) for r in t.plan(300, 4, 8).rungs] == [(37, 8), (300, 3)]


def test_stretch_spends_a_saving_on_longer_horizons():
    ns = t.stretch([50, 100], [3, 2], remaining=600, total_steps=300)
    assert 3 * ns[0] + 2 * ns[1] <= 600 and ns[0] > 50
    assert t.stretch([50, 100], [3, 2], remaining=350, total_steps=300) == [50, 100]  # nothing to stretch
    # more finalists than planned (thresholds carried into the finals): shortened to fit
    ns = t.stretch([50, 100], [3, 2], remaining=100, total_steps=300)
    assert 3 * ns[0] + 2 * ns[1] <= 100 and ns[1] > ns[0] > 0


def test_summarize_matches_a_hand_computation():
    rng = np.random.default_rng(0)
    loss = 5 * np.exp(-np.arange(50) / 10) + rng.normal(0, 0.05, 50)
    g = rng.uniform(0.5, 2.0, 50)
    s = t.summarize(_steps(loss, g, clip=1.0), 1.0, horizon=40)
    w = 8  # a fifth of 40
    last = loss[32:40]
    x = np.arange(w)
    resid = last - np.polyval(np.polyfit(x, last, 1), x)
    assert s.steps == 40 and s.window == w
    assert s.loss == pytest.approx(last.mean(), rel=1e-12)
    assert s.loss_spread == pytest.approx(math.sqrt((resid ** 2).sum() / (w - 2)), rel=1e-9)
    assert s.loss_se == pytest.approx(s.loss_spread / math.sqrt(w))
    assert s.start_loss == pytest.approx(loss[:w].mean())
    # the clipped share of the steady state, as `recommend` counts it (issue 23 item 5): no learning
    # rate recorded, so the warm-up left out is the analysis's share of the 40 steps
    from gradscope.analysis.config import load_config

    wu = load_config().warmup
    k = min(max(round(wu.fraction * 40), wu.min_steps), wu.max_steps, int(wu.max_fraction * 40))
    assert 0 < k < 40 and (g[:40] > 1.0).mean() != pytest.approx((g[k:40] > 1.0).mean())
    assert s.clip_fraction == pytest.approx((g[k:40] > 1.0).mean())
    assert s.mean_multiplier == pytest.approx(np.minimum(1, 1.0 / g[:40]).mean())
    assert not s.diverged


def test_summarize_flags_divergence():
    loss = np.linspace(2, 1, 30)
    loss[25] = np.inf
    s = t.summarize(_steps(loss), t.AS_IS)
    assert s.diverged and "step 25" in s.diverged_reason
    up = t.summarize(_steps(np.linspace(1, 5, 30)), 1.0)
    assert up.diverged and "rose" in up.diverged_reason
    # a GradScaler overflow step is not a divergence
    skipped = np.zeros(30, bool)
    skipped[3] = True
    loss = np.linspace(2, 1, 30)
    g = np.ones(30)
    g[3] = np.inf
    assert not t.summarize(_steps(loss, g, skipped=skipped), 1.0).diverged


def test_a_diverged_candidate_is_never_chosen_even_with_the_lowest_loss():
    rows = [_summary(0.5, 1.0), _summary(2.0, 0.2, diverged=True), _summary(1.0, 0.9)]
    c = t.choose(rows)
    assert c.clip_norm == 1.0
    assert 2.0 not in t.survivors(rows, 2)
    assert t.choose([_summary(1.0, 0.1, diverged=True)]).clip_norm is None


def test_ties_go_to_the_larger_threshold_and_clear_wins_stay():
    # 0.5 is best by 0.01, well within the noise (se 0.01 each): the larger tied one wins
    tied = [_summary(0.5, 1.00), _summary(1.0, 1.01), _summary(2.0, 1.50)]
    c = t.choose(tied)
    assert c.clip_norm == 1.0 and set(c.ties) == {0.5, 1.0}
    assert c.runner_up == 0.5 and c.margin == pytest.approx(-0.01 / math.sqrt(2 * 0.01 ** 2))
    clear = [_summary(0.5, 1.00), _summary(1.0, 1.20)]
    c = t.choose(clear)
    assert c.clip_norm == 0.5 and c.margin == pytest.approx(0.2 / math.sqrt(2e-4))


def test_as_is_wins_a_tie_only_at_the_whole_training():
    rows = [_summary(1.0, 1.0), _summary(t.AS_IS, 1.0)]
    assert t.choose(rows, full_horizon=True).clip_norm == t.AS_IS
    assert t.choose(rows, full_horizon=False).clip_norm == 1.0
    assert t.choose([_summary(1.0, 2.0), _summary(t.AS_IS, 1.0)], full_horizon=False).clip_norm == t.AS_IS


def test_survivors_keep_the_choice_and_its_better_neighbour_on_the_ladder():
    rows = [_summary(0.25, 0.50), _summary(0.5, 0.90), _summary(1.0, 1.0), _summary(2.0, 1.1), _summary(4.0, 3.0)]
    assert t.survivors(rows, 2) == [0.25, 0.5]  # the smallest won: its only neighbour
    assert t.survivors(rows, 3) == [0.25, 0.5, 1.0]  # then the best losses
    # the choice in the middle of the ladder: the neighbour with the lower loss, on either side
    below = [_summary(0.25, 1.2), _summary(0.5, 0.7), _summary(1.0, 0.5), _summary(2.0, 0.8), _summary(4.0, 3.0)]
    assert t.survivors(below, 2) == [1.0, 0.5]
    above = [_summary(0.25, 1.2), _summary(0.5, 0.9), _summary(1.0, 0.5), _summary(2.0, 0.8), _summary(4.0, 3.0)]
    assert t.survivors(above, 2) == [1.0, 2.0]
    assert t.survivors(above, 3) == [1.0, 2.0, 0.5]


def test_many_ties_before_the_whole_training_go_to_the_middle_one():
    # four candidates within the noise of each other (se 0.01): a short probe cannot tell them apart
    tied = [_summary(0.25, 1.00), _summary(0.5, 1.01), _summary(1.0, 1.005), _summary(2.0, 1.01), _summary(4.0, 2.0)]
    early = t.choose(tied, full_horizon=False)
    assert early.clip_norm == 1.0 and set(early.ties) == {0.25, 0.5, 1.0, 2.0} and "middle" in early.reason
    assert t.choose(tied, full_horizon=True).clip_norm == 2.0  # at the whole training: the largest
    two = [_summary(0.5, 1.00), _summary(1.0, 1.01), _summary(2.0, 1.5)]
    assert t.choose(two, full_horizon=False).clip_norm == 1.0  # two ties: the larger, as before


def test_fallback_picks_below_the_smallest_diverged():
    early = [_summary(0.5, 1.0), _summary(2.0, 0.5), _summary(8.0, 0.4)]
    back = t.fallback([early], diverged={8.0, 2.0})
    assert back.clip_norm == 0.5
    assert t.fallback([early], diverged={0.5}) is None


def test_candidates_sit_around_the_pilots_norms():
    g = np.full(40, 100.0)
    g[:10] = 300.0  # after the horizon the norms do not count
    c = t.candidates_from_pilot(_steps(np.ones(40), g[::-1].copy()), horizon=30)
    assert c == sorted(c) and len(c) == len(t.GRID_FACTORS)
    assert c[0] == pytest.approx(100 / 16, rel=0.03) and c[-1] == pytest.approx(400, rel=0.03)


def test_unseeded_probe_is_seen_before_its_first_clip():
    loss = np.linspace(3, 1, 20)
    g = np.linspace(2, 1, 20)
    pilot = _steps(loss, g)
    same = _steps(loss, g * (1 + 1e-7), clip=1.5)  # clips from step 0: only step 0 is comparable
    assert t.unseeded(pilot, same) is None
    other = loss.copy()
    other[0] += 1e-3
    assert t.unseeded(pilot, _steps(other, g)) == 0
    late = loss.copy()
    late[10] += 1e-3  # after the probe clipped: expected to differ
    assert t.unseeded(pilot, _steps(late, g, clip=1.5)) is None


def test_candidates_of_a_pilot_that_blew_up_sit_around_its_norm_before_the_blow_up():
    # tiny_norm's pilot (benchmarks/advice): the norm grows ~100x a step from 0.133; the median of
    # its 8 steps is ~6e5, and a ladder around that clipped nothing that mattered (all diverged)
    g = 0.13268473 * 100.0 ** np.arange(8)
    loss = 0.04 * 1e4 ** np.arange(8)
    c = t.candidates_from_pilot(_steps(loss, g), horizon=8)
    assert t.blew_up(_steps(loss, g))
    assert len(c) == len(t.GRID_FACTORS)
    assert c[0] == pytest.approx(0.13268473 / 16, rel=0.03) and c[-1] == pytest.approx(0.13268473 * 4, rel=0.03)
    # went non-finite: the finite norms before it, not their median, place the ladder
    g2 = np.array([2.0, 2.1, 1.9, 50.0, 3e3, np.inf, np.nan])
    l2 = np.array([1.0, 0.9, 0.9, 5.0, 1e3, np.inf, np.nan])
    assert t.typical_norm(_steps(l2, g2)) == 2.0
    # a skipped (GradScaler) inf step is no blow-up, nor is a run whose norms fall by 100x
    g3 = np.array([4.0, np.inf, 3.0, 2.0, 3.0])
    skipped = np.array([False, True, False, False, False])
    assert not t.blew_up(_steps(np.ones(5), g3, skipped=skipped))
    assert t.typical_norm(_steps(np.ones(5), g3, skipped=skipped)) == 3.0
    falling = np.geomspace(100.0, 0.5, 30)
    assert not t.blew_up(_steps(np.ones(30), falling))
    assert t.typical_norm(_steps(np.ones(30), falling)) == pytest.approx(np.median(falling))
    # a script that reports no loss is not taken for a blow-up
    assert not t.blew_up(_steps(np.full(10, np.nan), np.ones(10)))


def test_finalists_all_within_the_noise_say_the_threshold_does_not_matter():
    """Ties are an answer: every finalist within the noise of the others (none diverged) ->
    the script's own threshold is kept when it is a finalist, else the largest; the reason says so."""
    tied = [_summary(0.5, 1.00), _summary(1.0, 1.01), _summary(t.AS_IS, 1.005)]
    kept = t.choose(tied, full_horizon=False, final=True, keep=t.AS_IS)
    assert kept.clip_norm == t.AS_IS and kept.rule == "all-tied"
    assert "does not matter in this range" in kept.reason and "script's own threshold is kept" in kept.reason
    assert "0.5 to 1 and the script as it is" in kept.reason
    # no threshold of the script's own: the largest (the script as is only at the whole training)
    assert t.choose(tied, full_horizon=False, final=True).clip_norm == 1.0
    assert t.choose(tied, full_horizon=True, final=True).clip_norm == t.AS_IS
    assert "largest of them" in t.choose(tied, full_horizon=False, final=True).reason
    # not the finals (the first rung), or one finalist clear of the others, or one diverged: not "all tied"
    assert t.choose(tied, full_horizon=False).rule == "middle-tied"
    clear = [_summary(0.5, 1.00), _summary(1.0, 1.01), _summary(2.0, 1.3)]
    assert t.choose(clear, full_horizon=False, final=True).rule == "largest-tied"
    gone = [_summary(0.5, 1.00), _summary(1.0, 1.01), _summary(2.0, 0.9, diverged=True)]
    c = t.choose(gone, full_horizon=False, final=True, keep=2.0)
    assert c.rule != "all-tied" and c.clip_norm == 1.0


def test_the_scripts_own_and_recommends_threshold_are_carried_into_the_finals():
    rows = [_summary(0.25, 0.50), _summary(0.5, 0.90), _summary(1.0, 1.0), _summary(2.0, 1.1), _summary(4.0, 3.0),
            _summary(t.AS_IS, 2.0)]
    assert t.survivors(rows, 3) == [0.25, 0.5, 1.0]
    assert t.survivors(rows, 3, carry=(t.AS_IS, 4.0)) == [0.25, 0.5, 1.0, t.AS_IS, 4.0]
    assert t.survivors(rows, 3, carry=(0.5,)) == [0.25, 0.5, 1.0]  # already a finalist
    rows[-1] = _summary(t.AS_IS, 0.1, diverged=True)
    assert t.AS_IS not in t.survivors(rows, 3, carry=(t.AS_IS,))  # a diverged one is not carried


def _warmup_cosine(T, W, peak=3e-3):
    s = np.arange(T)
    return np.where(s < W, peak * (s + 1) / W, 0.5 * peak * (1 + np.cos(np.pi * (s - W) / (T - W))))


def test_warmup_is_read_from_the_recorded_lr():
    lr = _warmup_cosine(250, 60)
    full = _steps(np.ones(250)).assign(lr=lr)
    assert t.warmup(full) == (59, True)  # the peak at step 59: 60 warm-up steps
    assert t.warmup(full.iloc[:21]) == (20, False)  # still rising at the pilot's end
    decay = _steps(np.ones(50)).assign(lr=np.linspace(1, 0.1, 50))
    assert t.warmup(decay) is None and t.warmup(_steps(np.ones(50))) is None  # no lr recorded: none
    # candidates from the norms after the warm-up (0.08 during it, 0.9 after, as in issue 22)
    g = np.where(np.arange(84) < 60, 0.08, 0.9)
    pilot = _steps(np.ones(84), g).assign(lr=lr[:84])
    assert t.typical_norm(pilot) == pytest.approx(0.08)
    assert t.typical_norm(pilot, start=60) == pytest.approx(0.9)
    c = t.candidates_from_pilot(pilot, None, start=60)
    assert c[0] == pytest.approx(0.9 / 16, rel=0.03) and c[-1] == pytest.approx(3.6, rel=0.03)


def test_a_run_that_stopped_itself_after_a_blow_up_is_diverged():
    # a script that breaks at its first non-finite loss records the steps before it: they ran away
    loss = 2.0 * 100.0 ** np.arange(14)
    g = 3.0 * 30.0 ** np.arange(14)
    assert t.stopped_diverging(_steps(loss, g)) is not None
    spike = np.r_[np.linspace(2, 1, 30), 50.0]  # one last jump before the non-finite one
    assert t.stopped_diverging(_steps(spike)) is not None
    # a clean, shorter training says nothing of the kind
    assert t.stopped_diverging(_steps(np.linspace(2, 1, 30))) is None


def test_plan_puts_the_first_rung_past_a_warmup_or_refuses():
    p = t.plan(1000, 3, 9, first_min=120)
    assert p.rungs[0].steps >= 120 and p.planned_steps <= 3000
    with pytest.raises(ValueError, match="first rung of 240 steps"):
        t.plan(250, 3, 9, pilot_steps=84, first_min=240)


def test_a_whole_pilot_that_ended_at_its_blow_up_is_told_apart():
    """Without --steps, T is the pilot's length, with a note when the pilot ended at its blow-up (a
    script that breaks at its first non-finite loss would look so), not when it went on after a
    non-finite step."""
    from gradscope.analysis.tune import ended_at_blow_up

    went_on = _steps(np.r_[np.linspace(3, 1, 110), np.full(10, np.inf)], np.r_[np.ones(110), np.full(10, np.inf)])
    assert ended_at_blow_up(went_on) is None
    assert "last step (110)" in ended_at_blow_up(_steps(np.r_[np.linspace(3, 1, 110), [np.nan]]))
    assert ended_at_blow_up(_steps(2.0 * 100.0 ** np.arange(14), 3 * 30.0 ** np.arange(14))) is not None
    assert ended_at_blow_up(_steps(np.linspace(3, 1, 50))) is None
