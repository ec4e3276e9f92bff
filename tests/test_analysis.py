"""gradscope.analysis: every figure against an independent numpy computation, and the properties
the recommendation promises (scale-free, spike- and NaN-robust)."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from gradscope import rundir
from gradscope.analysis import analyze, get_preset, load_config, load_presets
from gradscope.analysis.robust import percentiles, quantiles, round_sig, trailing_median_mad
from gradscope.errors import GradscopeError

CFG = load_config()


def make_run(g, clip=None, skipped=None, loss=None, lr=None, optimizer=0, rank=0, meta=None, layers=None, steps=None):
    g = np.asarray(g, dtype=float)
    n = len(g)
    df = pd.DataFrame({
        "rank": rank, "optimizer": optimizer,
        "step": np.arange(n) if steps is None else steps,
        "grad_norm": g,
        "loss": np.ones(n) if loss is None else loss,
        "clip_max_norm": np.nan if clip is None else clip,
        "skipped": False if skipped is None else skipped,
        "lr": np.nan if lr is None else lr,  # unknown by default: the warm-up is then a share of the steps
    })
    return rundir.Run(Path("mem"), rundir.normalize_steps(df), layers if layers is not None else pd.DataFrame(), meta or {})


def lognormal(n=4000, sigma=0.3, seed=0, scale=1.0):
    return scale * np.exp(np.random.default_rng(seed).normal(0.0, sigma, n))


def expected_warmup(n_valid, cfg=CFG):
    w = cfg.warmup
    k = min(max(int(round(w.fraction * n_valid)), w.min_steps), w.max_steps)
    return min(k, int(w.max_fraction * n_valid))


# ----------------------------------------------------------------------------- figures


def test_percentiles_clip_fraction_and_multiplier_match_numpy_on_steady_state():
    g = lognormal(3000)
    a = analyze(make_run(g, clip=1.2)).main
    k = expected_warmup(3000)
    s = g[k:]
    assert a.warmup_steps == k and a.steady_steps == len(s) and a.steady_from_step == k
    p50, p90, p99 = np.percentile(s, [50, 90, 99])
    assert a.percentiles == pytest.approx({"p50": p50, "p90": p90, "p99": p99, "max": s.max()}, rel=1e-12)
    clipped = sum(1 for v in s if v > 1.2)
    assert a.verdict.clipped_steps == clipped
    assert a.clip_fraction == pytest.approx(clipped / len(s))
    assert a.verdict.mean_multiplier == pytest.approx(sum(min(1.0, 1.2 / v) for v in s) / len(s))
    assert a.regime == "healthy"
    assert a.threshold.source == "script"


def test_recommendation_effect_is_counted_on_steady_state():
    g = lognormal(3000, seed=3)
    a = analyze(make_run(g)).main
    # the effect is that of the value handed out (rounded), which is what a user pastes
    tau = round_sig(a.recommendation.clip_norm)
    assert a.recommendation.clip_norm_rounded == tau
    s = g[expected_warmup(3000):]
    assert a.recommendation.clipped_steps == int((s > tau).sum())
    assert a.recommendation.clip_fraction == pytest.approx((s > tau).mean())
    assert a.recommendation.mean_multiplier == pytest.approx(np.minimum(1, tau / s).mean())


# ----------------------------------------------------------------------------- regimes


def test_threshold_far_above_never_clips_and_states_the_ratio():
    g = lognormal(2000)
    a = analyze(make_run(g, clip=100.0)).main
    s = g[expected_warmup(2000):]
    assert a.regime == "never-clips" and a.clip_fraction == 0.0
    assert a.verdict.clip_norm_to_max == pytest.approx(100.0 / s.max())
    assert a.verdict.mean_multiplier == 1.0
    assert "dead code" in a.verdict.meaning


def test_threshold_far_below_always_clips():
    g = lognormal(2000)
    a = analyze(make_run(g, clip=0.01)).main
    assert a.regime == "always-clips" and a.clip_fraction == 1.0
    s = g[expected_warmup(2000):]
    assert a.verdict.mean_multiplier == pytest.approx(np.mean(0.01 / s))
    assert "learning-rate cut" in a.verdict.meaning


def test_half_the_steps_clipped_is_always_clips():
    g = np.tile([1.0, 3.0], 500)  # exactly half above 2.0 in any window
    a = analyze(make_run(g, clip=2.0)).main
    assert a.clip_fraction == pytest.approx(0.5) and a.regime == "always-clips"


def test_no_threshold_is_unclipped_and_still_recommends():
    a = analyze(make_run(lognormal(1000))).main
    assert a.regime == "unclipped" and a.clip_fraction is None and a.verdict.clip_norm is None
    assert a.recommendation.clip_norm > 0


def test_threshold_sources_option_then_script_then_log():
    g = lognormal(500)
    assert analyze(make_run(g, clip=1.0), clip_norm=5.0).main.threshold.source == "option"
    assert analyze(make_run(g, clip=1.0), clip_norm=5.0).main.verdict.clip_norm == 5.0
    assert analyze(make_run(g, clip=1.0, meta={"clip_norm": 3.0})).main.verdict.clip_norm == 1.0
    t = analyze(make_run(g, meta={"clip_norm": 3.0})).main
    assert t.threshold.source == "log" and t.verdict.clip_norm == 3.0


def test_changed_max_norm_judges_the_most_used_and_says_so():
    g = lognormal(1000)
    clip = np.where(np.arange(1000) < 700, 1.0, 0.5)
    a = analyze(make_run(g, clip=clip)).main
    assert a.verdict.clip_norm == 1.0 and a.threshold.changed
    assert a.threshold.script_values == [1.0, 0.5]
    assert any("changed" in n for n in a.notes)


# ----------------------------------------------------------------------------- the recommendation


@pytest.mark.parametrize("seed,sigma", [(0, 0.2), (1, 0.3), (2, 0.5)])
def test_recommendation_is_scale_free_and_clips_a_few_percent(seed, sigma):
    g = lognormal(5000, sigma=sigma, seed=seed)
    rng = np.random.default_rng(seed + 10)
    g[rng.choice(np.arange(600, 5000), 20, replace=False)] *= 30  # spikes
    base = analyze(make_run(g)).main.recommendation
    for c in (1e-3, 1e3):
        r = analyze(make_run(g * c)).main.recommendation
        assert r.clip_norm == pytest.approx(base.clip_norm * c, rel=1e-9)
        assert r.clip_fraction == base.clip_fraction
    # every spike is cut (20 of the 4500 steady-state steps), and only a few ordinary steps
    assert 20 / 4500 <= base.clip_fraction <= 0.05, base.clip_fraction
    assert base.situation == "spiky"


@pytest.mark.parametrize("seed", range(4))
def test_stable_recommendation_clips_the_largest_one_to_two_percent(seed):
    # stationary log-normal norms: the headroom is a robust 98th percentile of the excursions,
    # so tau cuts about 2% of steps (fewer, as the reference is the 90th percentile of the level)
    g = lognormal(3000, sigma=0.3, seed=seed)
    r = analyze(make_run(g)).main.recommendation
    assert r.situation == "stable"
    steady = g[expected_warmup(len(g)):]
    assert r.clip_fraction == pytest.approx((steady > r.clip_norm_rounded).mean())
    assert 0.005 <= r.clip_fraction <= 0.025, r.clip_fraction


@pytest.mark.parametrize("n", [3000, 3001])  # even and odd steady-state lengths
def test_stable_recommendation_equals_the_documented_formula(n):
    """tau = exp(q_level(level) + median(r) + z_q * 1.4826 * MAD(r)), r = log-norm - level (over steady state), recomputed
    here from its parts with numpy (the level itself is checked in the trailing-median test)."""
    from statistics import NormalDist

    g = lognormal(n, sigma=0.3, seed=n)
    a = analyze(make_run(g)).main
    r = a.recommendation
    assert r.situation == "stable"
    rc, lc = CFG.recommend, CFG.level
    x = np.log(g)
    k = expected_warmup(n)
    x_s = x[k:]
    # the running level of the steady state alone (warm-up norms do not enter it); its first
    # positions, before a level exists, take the first level there is
    level_s, _ = trailing_median_mad(x_s, lc.window, lc.stride, lc.min_periods)
    level_s = np.where(np.isfinite(level_s), level_s, level_s[np.isfinite(level_s)][0])
    resid = x_s - level_s
    centre = np.median(resid)
    scale = 1.4826 * np.median(np.abs(resid - centre))
    headroom = max(centre + NormalDist().inv_cdf(rc.residual_quantile) * scale, np.log(rc.min_headroom))
    expected = np.exp(np.quantile(level_s, rc.level_quantile) + headroom)
    assert r.clip_norm == pytest.approx(expected, rel=1e-12)


def test_recommendation_shrugs_off_spikes_and_non_finite_steps():
    g = lognormal(4000, seed=5)
    clean = analyze(make_run(g)).main.recommendation.clip_norm
    dirty = g.copy()
    rng = np.random.default_rng(6)
    dirty[rng.choice(4000, 30, replace=False)] *= 1e4
    dirty[rng.choice(4000, 30, replace=False)] = np.nan
    dirty[rng.choice(4000, 10, replace=False)] = np.inf
    a = analyze(make_run(dirty)).main
    assert math.isfinite(a.recommendation.clip_norm)
    # 10^4-fold spikes move the threshold by at most spike_margin (2x), and all of them are cut
    assert clean / 2 < a.recommendation.clip_norm < 2.2 * clean
    assert a.recommendation.clip_norm < np.nanmin(dirty[np.isfinite(dirty) & (dirty > 100 * np.median(g))])
    assert a.nonfinite.count == int((~np.isfinite(dirty)).sum())
    assert a.finite_steps == int(np.isfinite(dirty).sum())
    fin = dirty[np.isfinite(dirty)][expected_warmup(a.finite_steps):]
    assert a.percentiles["p50"] == pytest.approx(np.percentile(fin, 50))


def test_blown_up_pilot_uses_the_stretch_before_the_first_non_finite_step():
    g = np.concatenate([lognormal(900, seed=7), np.full(100, np.nan)])
    a = analyze(make_run(g)).main
    assert a.nonfinite.first_kind == "divergence" and a.nonfinite.divergence_step == 900
    assert a.analysis_until_step == 900 and a.finite_steps == 900
    assert a.steady_steps == 900 - expected_warmup(900)
    assert any("diverged at step 900" in n for n in a.notes)


def test_drift_compares_thirds_and_warns_when_one_threshold_cannot_serve_both():
    n = 6000
    g = lognormal(n, sigma=0.2, seed=8) * np.geomspace(10, 1, n)  # norms fall 10x
    a = analyze(make_run(g)).main
    s = g[expected_warmup(n):]
    k = len(s) // 3
    d = a.drift
    assert d.early["p90"] == pytest.approx(np.percentile(s[:k], 90))
    assert d.late["p50"] == pytest.approx(np.percentile(s[-k:], 50))
    assert d.p50_ratio == pytest.approx(np.median(s[-k:]) / np.median(s[:k]))
    assert d.drifting and d.warning and "cannot serve both" in d.warning
    tau = a.recommendation.clip_norm_rounded
    assert d.recommended_clip_fraction_early == pytest.approx((s[:k] > tau).mean())
    assert d.recommended_clip_fraction_late == pytest.approx((s[-k:] > tau).mean())


def test_no_drift_no_warning():
    d = analyze(make_run(lognormal(3000))).main.drift
    assert not d.drifting and d.warning is None and 0.8 < d.p50_ratio < 1.25


# ----------------------------------------------------------------------------- spikes


def test_spikes_found_at_the_injected_steps_with_their_top_layers():
    g = lognormal(3000, seed=9)
    at = [400, 1234, 2000, 2999]
    g[at] *= 25
    names = ["embed.weight", "block.0.attn", "head.weight"]
    lay = pd.DataFrame({"rank": 0, "optimizer": 0, "step": at,
                        "embed.weight": [1.0, 1.0, 1.0, 1.0], "block.0.attn": [3.0, 0.5, 2.0, 0.0],
                        "head.weight": [0.1, 2.0, 2.0, 0.0]})
    a = analyze(make_run(g, layers=lay)).main
    assert a.spikes.count == len(at)
    assert [s.step for s in a.spikes.listed] == at
    first = a.spikes.listed[0]
    assert first.grad_norm == pytest.approx(g[400])
    sq = np.array([1.0, 9.0, 0.01])
    assert [n for n, _ in first.layers] == [names[1], names[0], names[2]]
    assert first.layers[0][1] == pytest.approx(9.0 / sq.sum())
    assert a.spikes.layers_available
    assert [n for n, _ in a.spikes.listed[3].layers] == ["embed.weight"]  # zero-norm layers are not listed


def test_no_spikes_in_plain_noise():
    assert analyze(make_run(lognormal(5000, seed=11))).main.spikes.count == 0


def test_trailing_median_mad_matches_a_direct_computation():
    x = np.random.default_rng(12).normal(size=20000)
    level, mad = trailing_median_mad(x, window=200, stride=100, min_periods=5)
    s = 100  # min(stride, n // 50)
    for i in (5000, 5099, 12345, 19999):
        a = (i // s) * s
        w = np.sort(x[a - 200:a])
        assert level[i] == w[100]
        assert mad[i] == np.sort(np.abs(w - w[100]))[100]
    assert np.isnan(level[:100]).all() and not np.isnan(level[100:]).any()


# ----------------------------------------------------------------------------- non-finite


def test_scaler_overflow_skipped_is_told_apart_from_divergence():
    g = lognormal(1000, seed=13)
    skipped = np.zeros(1000, bool)
    g[[100, 500]] = np.inf
    skipped[[100, 500]] = True
    a = analyze(make_run(g, skipped=skipped)).main
    nf = a.nonfinite
    assert nf.count == 2 and nf.first_step == 100 and nf.first_kind == "overflow-skipped"
    assert nf.overflow_skipped == 2 and nf.divergence_step is None
    assert a.skipped_steps == 2 and a.skipped_fraction == pytest.approx(0.002)

    g2 = lognormal(1000, seed=13)
    g2[700:] = np.nan
    nf2 = analyze(make_run(g2)).main.nonfinite
    assert nf2.first_kind == "divergence" and nf2.first_step == 700 and nf2.count == 300


def test_unflagged_non_finite_step_that_training_survives_is_recovered():
    g = lognormal(500, seed=14)
    g[250] = np.nan
    nf = analyze(make_run(g)).main.nonfinite
    assert nf.first_kind == "recovered" and nf.recovered == 1


def test_infinite_loss_counts_as_non_finite_but_nan_loss_does_not():
    g = lognormal(500)
    loss = np.ones(500)
    loss[10] = np.inf
    loss[20] = np.nan  # foreign logs leave loss empty
    a = analyze(make_run(g, loss=loss)).main
    assert a.nonfinite.count == 1 and a.nonfinite.first_step == 10


# ----------------------------------------------------------------------------- optimizers, ranks, warm-up


def test_one_verdict_per_optimizer_and_main_is_the_longest():
    a = make_run(lognormal(800, seed=1), clip=100.0, optimizer=0)
    b = make_run(lognormal(1200, seed=2, scale=10), clip=0.5, optimizer=1)
    run = rundir.Run(Path("mem"), pd.concat([a.steps, b.steps], ignore_index=True), pd.DataFrame(), {})
    r = analyze(run)
    assert [o.optimizer for o in r.optimizers] == [0, 1]
    assert [o.regime for o in r.optimizers] == ["never-clips", "always-clips"]
    assert r.main.optimizer == 1
    only = analyze(run, optimizer=0)
    assert [o.optimizer for o in only.optimizers] == [0]
    with pytest.raises(GradscopeError, match="optimizers: 0, 1"):
        analyze(run, optimizer=7)


def test_ranks_rank0_by_default_and_disagreement_noted():
    g = lognormal(500)
    r0, r1 = make_run(g, rank=0), make_run(g, rank=1)
    same = rundir.Run(Path("mem"), pd.concat([r0.steps, r1.steps], ignore_index=True), pd.DataFrame(), {})
    res = analyze(same)
    assert res.rank == 0 and res.ranks == [0, 1] and res.main.steps == 500
    assert any("agree" in n for n in res.notes)
    r1b = make_run(g * (1 + 1e-3), rank=1)
    diff = rundir.Run(Path("mem"), pd.concat([r0.steps, r1b.steps], ignore_index=True), pd.DataFrame(), {})
    assert any("ranks disagree" in n for n in analyze(diff).notes)
    assert analyze(diff, rank=1).rank == 1
    with pytest.raises(GradscopeError, match="ranks: 0, 1"):
        analyze(diff, rank=3)


def test_warmup_follows_the_learning_rate_peak():
    n = 2000
    lr = np.minimum(np.arange(n) / 600, 1.0) * 1e-3
    a = analyze(make_run(lognormal(n), lr=lr)).main
    assert a.warmup_steps == 600 and a.steady_from_step == 600
    assert "warm-up: the 600 steps before the learning rate peaks at step 600" in a.notes
    short = analyze(make_run(lognormal(n), lr=np.minimum(np.arange(n) / 50, 1.0))).main
    assert short.warmup_steps == 50  # the LR's own warm-up, not 10 % of the steps
    capped = analyze(make_run(lognormal(n), lr=np.arange(n) * 1.0)).main  # still warming up at the end
    assert capped.warmup_steps == int(CFG.warmup.max_fraction * n)
    # the data do not show a peak: no "peaks" claim, and the last step is named
    assert not any("peaks" in x for x in capped.notes)
    assert any("still rises at the last step (1999)" in x for x in capped.notes)
    late = analyze(make_run(lognormal(n), lr=np.minimum(np.arange(n) / 1500, 1.0))).main  # peaks past the cap
    assert late.warmup_steps == 1000
    assert any("capped at 1000 steps" in x and "peaks later, at step 1500" in x for x in late.notes)


@pytest.mark.parametrize("lr", [np.full(1000, 3e-4), np.linspace(1e-3, 0.0, 1000), 1e-3 * 0.99 ** np.arange(1000)])
def test_no_warmup_is_left_out_when_the_learning_rate_never_rises(lr):
    """Constant LR, linear decay from step 0, exponential decay: the first steps are steady state too,
    so their largest norms are judged (a foreign log's maxima often sit there)."""
    g = lognormal(1000, seed=5)
    g[20] = 40.0
    a = analyze(make_run(g, lr=lr, clip=1.0)).main
    assert a.warmup_steps == 0 and a.steady_from_step == 0 and a.steady_steps == 1000
    assert a.percentiles["max"] == 40.0 and a.verdict.clipped_steps == int((g > 1.0).sum())
    assert any("never rises above its first value" in x for x in a.notes)


def test_sampled_log_is_noted():
    r = analyze(make_run(lognormal(200), meta={"sampled": True, "notes": ["from importer"]}))
    assert r.sampled and r.notes[0] == "from importer" and any("every k-th step" in n for n in r.notes)


# ----------------------------------------------------------------------------- presets and config


def test_presets_cover_the_families_with_sources():
    p = load_presets()
    assert {"transformer", "cnn", "rnn", "recommender", "alignment"} <= set(p)
    assert (p["transformer"].low, p["transformer"].high) == (1.0, 2.0)
    assert p["recommender"].high is None and p["recommender"].low == 10.0
    assert all(x.source for x in p.values())


def test_preset_compares_but_never_replaces_the_data():
    g = lognormal(2000)  # norms around 1: the data suggest about 2
    plain = analyze(make_run(g)).main.recommendation.clip_norm
    cnn = analyze(make_run(g), preset="cnn").main
    assert cnn.recommendation.clip_norm == plain
    assert cnn.preset.position == "below" and cnn.preset.clip_fraction_at_low == 0.0
    big = analyze(make_run(g * 50), preset="alignment").main.preset
    s = (g * 50)[expected_warmup(2000):]
    assert big.position == "above"
    assert big.clip_fraction_at_high == pytest.approx((s > 1.0).mean())
    assert analyze(make_run(g * 0.8), preset="transformer").main.preset.position == "within"


def test_unknown_preset_lists_valid_names():
    with pytest.raises(GradscopeError, match="valid: transformer, cnn, rnn, recommender, alignment") as e:
        get_preset("gan")
    assert e.value.exit_code == 2


def test_config_file_overrides_and_validates(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("warmup:\n  fraction: 0.2\nspikes:\n  z_threshold: 4\n")
    cfg = load_config(f)
    assert cfg.warmup.fraction == 0.2 and cfg.spikes.z_threshold == 4.0 and cfg.warmup.max_steps == 2000
    a = analyze(make_run(lognormal(1000)), cfg).main
    assert a.warmup_steps == 200
    for text, msg in [
        ("warmup:\n  fractoin: 0.2\n", "unknown setting 'fractoin' under 'warmup'"),
        ("spikes: 3\n", "must be a mapping"),
        ("min_steps: many\n", "must be an integer"),
        ("recommend:\n  residual_quantile: 1.5\n", "out of range"),
        ("[unclosed", "cannot parse"),
    ]:
        f.write_text(text)
        with pytest.raises(GradscopeError, match=msg):
            load_config(f)
    with pytest.raises(GradscopeError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


# ----------------------------------------------------------------------------- nothing to judge


@pytest.mark.parametrize("g,msg", [
    ([2.0], "only 1 finite gradient norm; at least 3 are needed"),
    ([2.0, 1.0], "only 2 finite gradient norms; at least 3 are needed"),
    ([np.nan, np.inf, np.nan], "all 3 gradient norms"),
    ([np.nan] * 5, "no gradient norms"),
])
def test_nothing_to_judge_is_a_user_error(g, msg):
    with pytest.raises(GradscopeError, match=msg) as e:
        analyze(make_run(g))
    assert e.value.exit_code == 2


@pytest.mark.parametrize("n", [3, 5, 9])
def test_few_points_are_judged_and_say_how_few(n):
    """A 3- to 9-entry log gets an answer; the figures are those of its points, and a caveat says how few."""
    g = lognormal(n, seed=n)
    a = analyze(make_run(g, clip=1.0)).main
    s = g[a.warmup_steps:]
    assert a.finite_steps == n and a.steady_steps == len(s) >= 2
    assert a.percentiles["max"] == s.max() and a.verdict.clipped_steps == int((s > 1.0).sum())
    assert a.recommendation.clip_fraction == pytest.approx((s > a.recommendation.clip_norm_rounded).mean())
    assert any(f"only {n} finite gradient norms ({len(s)} after warm-up)" in c for c in a.caveats)
    assert not any("finite gradient norms" in c for c in analyze(make_run(lognormal(200), clip=1.0)).main.caveats)


def test_all_infinite_norms_with_a_falling_loss_answer_without_a_recommendation():
    """fp16 norms that overflowed (or were taken before unscaling): the loss trains, the norm says inf."""
    n = 40
    loss = np.linspace(3.0, 1.0, n)
    a = analyze(make_run(np.full(n, np.inf), loss=loss, meta={"clip_norm": 1.0})).main
    assert a.recommendation is None and a.regime is None and a.finite_steps == 0
    assert a.verdict.clip_norm == 1.0 and a.threshold.source == "log"
    assert "All 40 gradient norms of the run are non-finite (inf)" in a.verdict.meaning
    assert f"falls from {np.median(loss[:13]):.4g} to {np.median(loss[-13:]):.4g}" in a.verdict.meaning
    assert a.whole_run.finite_steps == 0 and a.whole_run.max is None
    with pytest.raises(GradscopeError, match="the loss does not fall"):  # a flat loss shows nothing of the kind
        analyze(make_run(np.full(n, np.inf), loss=np.full(n, 2.0)))


def test_bad_clip_norm_option():
    with pytest.raises(GradscopeError, match="positive"):
        analyze(make_run(lognormal(100)), clip_norm=-1.0)


def test_round_sig():
    assert round_sig(1.8634) == 1.86 and round_sig(0.012345) == 0.0123
    assert round_sig(2.345) == 2.3 and round_sig(97.5) == 98 and round_sig(0.5) == 0.5


@pytest.mark.parametrize("n", [1, 2, 3, 10, 1001, 100_000])
def test_quantiles_equal_numpy_bit_for_bit(n):
    rng = np.random.default_rng(n)
    qs = [0.0, 0.1, 0.5, 0.9, 0.98, 0.99, 0.999999, 1.0]
    for a in (np.exp(rng.normal(0, 1, n)), rng.integers(0, 4, n).astype(float)):  # ties too
        before = a.copy()
        assert np.array_equal(quantiles(a, qs), np.quantile(a, qs))
        assert np.array_equal(a, before)  # the caller's array is left alone
        p = percentiles(a, [50, 90, 99])
        assert [p["p50"], p["p90"], p["p99"], p["max"]] == [*np.percentile(a, [50, 90, 99]).tolist(), a.max()]
