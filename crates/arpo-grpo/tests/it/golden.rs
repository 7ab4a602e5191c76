//! Hand-computed cases of the reference formulas (verl/ARPO `compute_policy_loss`,
//! `compute_kl`, `masked_mean`), each with its arithmetic, checked on both the slice and the
//! tensor forms.

#![allow(clippy::unwrap_used)] // in tests a panic is the failure report

use arpo_grpo::{
    GrpoError, KlEstimator, KlPenalty, LossAggMode, PolicyLossConfig, PolicyLossInputs,
    SequenceInput, policy_loss, policy_loss_slices, token_kl, token_policy_loss,
};
use candle_core::{Device, Tensor, Var};

fn close(got: f64, want: f64, tol: f64) {
    assert!(
        (got - want).abs() <= tol,
        "got {got}, want {want} (tol {tol})"
    );
}

/// The default config: clip to [0.8, 1.3], dual clip 3.
fn reference() -> PolicyLossConfig {
    PolicyLossConfig::default()
}

#[test]
fn token_cases_of_the_reference_formula() {
    let ln = f64::ln;
    // (A, r, expected loss, ratio clip active, dual clip active, expected ∂loss/∂logp)
    let cases = [
        // A = 1, r = 1.5 > 1.3: max(−1.5, −1.3) = −1.3, clipped, no gradient.
        (1.0, 1.5, -1.3, true, false, 0.0),
        // A = 1, r = 1.1 inside: −A·r = −1.1, ∂/∂logp = −A·r = −1.1.
        (1.0, 1.1, -1.1, false, false, -1.1),
        // A = 2, r = 0.5 < 0.8: max(−1.0, −1.6) = −1.0: PPO does not clip a positive advantage
        // from below, so the gradient flows: −A·r = −1.0.
        (2.0, 0.5, -1.0, false, false, -1.0),
        // A = −1, r = 0.5 < 0.8: max(0.5, 0.8) = 0.8 (clipped); min(0.8, 3) = 0.8; no gradient.
        (-1.0, 0.5, 0.8, true, false, 0.0),
        // A = −1, r = 4: max(4, 1.3) = 4; dual: min(4, 3) = 3; no gradient.
        (-1.0, 4.0, 3.0, false, true, 0.0),
        // A = −2, r = 2: max(4, 2.6) = 4; min(4, 6) = 4; ∂/∂logp = −A·r = 4.
        (-2.0, 2.0, 4.0, false, false, 4.0),
        // A = −0.5, r = 1 (same policy): 0.5, gradient −A·r = 0.5.
        (-0.5, 1.0, 0.5, false, false, 0.5),
        // A = 0: nothing.
        (0.0, 3.0, 0.0, false, false, 0.0),
    ];
    for (a, r, loss, clipped, dual, grad) in cases {
        // logp − old_logp = ln r, with old_logp = −1.
        let t = token_policy_loss(-1.0 + ln(r), -1.0, a, &reference());
        close(t.loss, loss, 1e-12);
        close(t.ratio, r, 1e-12);
        assert_eq!((t.clipped, t.dual_clipped), (clipped, dual), "A={a} r={r}");
        close(t.dloss_dlogp, grad, 1e-12);
    }
}

#[test]
fn kl_estimators_of_the_reference() {
    let ln2 = 2f64.ln();
    // kl = logp − ref: −1 − (−1.5) = 0.5, derivative 1.
    assert_eq!(token_kl(KlEstimator::Kl, -1.0, -1.5), (0.5, 1.0));
    // low_var_kl, k = ref − logp = ln 2: e^k − k − 1 = 2 − ln 2 − 1 = 0.3068528;
    // ∂/∂logp = −(e^k − 1) = −1.
    let (v, d) = token_kl(KlEstimator::LowVarKl, 0.0, ln2);
    close(v, 1.0 - ln2, 1e-12);
    close(d, -1.0, 1e-12);
    // k = −ln 2: 0.5 + ln 2 − 1 = 0.1931472; ∂/∂logp = −(0.5 − 1) = 0.5.
    let (v, d) = token_kl(KlEstimator::LowVarKl, 0.0, -ln2);
    close(v, ln2 - 0.5, 1e-12);
    close(d, 0.5, 1e-12);
    // k = 5: e^5 − 6 = 142.41 is clamped to 10, so no gradient.
    assert_eq!(token_kl(KlEstimator::LowVarKl, 0.0, 5.0), (10.0, 0.0));
}

/// Two sequences (logp − old_logp = ln r):
/// - seq 1, A = 1: r = 1.5 (loss −1.3, clipped), r = 1.1 (loss −1.1);
/// - seq 2, A = −1: r = 4 (dual clip: 3), r = 0.5 (clipped: 0.8), r = 2 (loss 2), and one
///   padding token (mask 0) holding NaN.
struct Batch {
    logp: [Vec<f64>; 2],
    old: [Vec<f64>; 2],
    adv: [Vec<f64>; 2],
    mask: [Vec<bool>; 2],
    reference: [Vec<f64>; 2],
}

fn batch() -> Batch {
    let ln = f64::ln;
    Batch {
        logp: [
            vec![-1.0 + ln(1.5), -2.0 + ln(1.1)],
            vec![-1.0 + ln(4.0), -0.5 + ln(0.5), -3.0 + ln(2.0), f64::NAN],
        ],
        old: [vec![-1.0, -2.0], vec![-1.0, -0.5, -3.0, 0.0]],
        adv: [vec![1.0; 2], vec![-1.0; 4]],
        mask: [vec![true, true], vec![true, true, true, false]],
        // ref_logp = logp − 0.5 on every trained token: kl = 0.5 each.
        reference: [
            vec![-1.5 + ln(1.5), -2.5 + ln(1.1)],
            vec![-1.5 + ln(4.0), -1.0 + ln(0.5), -3.5 + ln(2.0), 0.0],
        ],
    }
}

fn slice_inputs(b: &Batch) -> Vec<SequenceInput<'_>> {
    (0..2)
        .map(|i| SequenceInput {
            logp: &b.logp[i],
            old_logp: &b.old[i],
            advantages: &b.adv[i],
            mask: &b.mask[i],
            ref_logp: Some(&b.reference[i]),
            entropy: None,
            rollout_logp: None,
        })
        .collect()
}

/// The batch as padded `[2, 4]` f64 tensors (seq 1 padded with two masked zeros).
fn tensors(b: &Batch) -> (Var, [Tensor; 4]) {
    let dev = Device::Cpu;
    let pad = |v: &[f64], fill: f64| {
        let mut v = v.to_vec();
        v.resize(4, fill);
        v
    };
    let rows = |x: &[Vec<f64>; 2]| {
        let flat: Vec<f64> = [pad(&x[0], 0.0), pad(&x[1], 0.0)].concat();
        Tensor::from_vec(flat, (2, 4), &dev).unwrap()
    };
    let logp = Var::from_tensor(&rows(&b.logp)).unwrap();
    let mask: Vec<f64> = b
        .mask
        .iter()
        .flat_map(|m| {
            let mut m: Vec<f64> = m.iter().map(|&t| f64::from(u8::from(t))).collect();
            m.resize(4, 0.0);
            m
        })
        .collect();
    let mask = Tensor::from_vec(mask, (2, 4), &dev).unwrap();
    let adv = Tensor::new(&[1.0f64, -1.0], &dev).unwrap();
    (logp, [rows(&b.old), adv, mask, rows(&b.reference)])
}

#[test]
fn seq_mean_token_mean_of_the_reference_batch() {
    // seq 1 mean: (−1.3 − 1.1)/2 = −1.2; seq 2 mean: (3 + 0.8 + 2)/3 = 5.8/3;
    // loss = (−1.2 + 5.8/3)/2 = (2.2/3)/2 = 0.3666667.
    // clipfrac_higher: seq 1 1/2, seq 2 1/3 -> 5/12; clipfrac_lower: (0 + 1/3)/2 = 1/6.
    // ratio mean: ((1.5 + 1.1)/2 + (4 + 0.5 + 2)/3)/2 = (1.3 + 6.5/3)/2.
    // ∂loss/∂logp: the unclipped tokens only, −A·r/(n_seq·B): seq 1 token 2: −1.1/4 = −0.275;
    // seq 2 token 3: 2/6 = 0.3333333.
    let b = batch();
    let config = reference();
    let out = policy_loss_slices(&slice_inputs(&b), &config).unwrap();
    let m = out.metrics;
    close(out.loss, 2.2 / 6.0, 1e-7);
    close(m.pg_clipfrac_higher, 5.0 / 12.0, 1e-7);
    close(m.pg_clipfrac_lower, 1.0 / 6.0, 1e-7);
    close(m.ratio_mean, (1.3 + 6.5 / 3.0) / 2.0, 1e-7);
    assert_eq!((m.sequences, m.tokens), (2, 5));
    let g = &out.grad_logp;
    close(g[0][0], 0.0, 0.0);
    close(g[0][1], -0.275, 1e-8);
    close(g[1][0], 0.0, 0.0);
    close(g[1][1], 0.0, 0.0);
    close(g[1][2], 1.0 / 3.0, 1e-8);
    assert_eq!(g[1][3], 0.0);

    let (logp, [old, adv, mask, _]) = tensors(&b);
    let t = policy_loss(
        &PolicyLossInputs {
            logp: logp.as_tensor(),
            old_logp: &old,
            advantages: &adv,
            mask: &mask,
            ref_logp: None,
            entropy: None,
            rollout_logp: None,
        },
        &config,
    )
    .unwrap();
    close(t.metrics.loss, 2.2 / 6.0, 1e-7);
    close(t.metrics.pg_clipfrac_higher, 5.0 / 12.0, 1e-7);
    close(t.metrics.pg_clipfrac_lower, 1.0 / 6.0, 1e-7);
    let grads = t.loss.backward().unwrap();
    let tg = grads.get(&logp).unwrap().to_vec2::<f64>().unwrap();
    let want = [[0.0, -0.275, 0.0, 0.0], [0.0, 0.0, 1.0 / 3.0, 0.0]];
    for (row, want_row) in tg.iter().zip(want) {
        for (&got, want) in row.iter().zip(want_row) {
            close(got, want, 1e-8);
        }
    }
}

#[test]
fn token_mean_of_the_reference_batch_with_a_kl_penalty() {
    // token-mean: (−1.3 − 1.1 + 3 + 0.8 + 2)/5 = 3.4/5 = 0.68.
    // kl (k1) is 0.5 on each trained token: kl_loss 0.5; loss = 0.68 + 0.1 · 0.5 = 0.73.
    // clipfrac_higher 2/5, clipfrac_lower 1/5, ppo_kl = −ln(1.5·1.1·4·0.5·2)/5 = −ln(6.6)/5.
    // ∂loss/∂logp = (∂pg + 0.1 · 1)/5: seq 1: (0 + 0.1)/5 = 0.02, (−1.1 + 0.1)/5 = −0.2;
    // seq 2: 0.02, 0.02, (2 + 0.1)/5 = 0.42.
    let b = batch();
    let config = PolicyLossConfig {
        loss_agg_mode: LossAggMode::TokenMean,
        kl: Some(KlPenalty {
            estimator: KlEstimator::Kl,
            coef: 0.1,
        }),
        ..reference()
    };
    let out = policy_loss_slices(&slice_inputs(&b), &config).unwrap();
    let m = out.metrics;
    close(m.pg_loss, 0.68, 1e-7);
    close(m.kl_loss.unwrap(), 0.5, 1e-7);
    close(out.loss, 0.73, 1e-7);
    close(m.pg_clipfrac_higher, 0.4, 1e-7);
    close(m.pg_clipfrac_lower, 0.2, 1e-7);
    close(m.ppo_kl, -(6.6f64.ln()) / 5.0, 1e-7);
    let want = [vec![0.02, -0.2], vec![0.02, 0.02, 0.42, 0.0]];
    for (row, want_row) in out.grad_logp.iter().zip(&want) {
        for (&got, &want) in row.iter().zip(want_row) {
            close(got, want, 1e-8);
        }
    }

    let (logp, [old, adv, mask, reference]) = tensors(&b);
    let t = policy_loss(
        &PolicyLossInputs {
            logp: logp.as_tensor(),
            old_logp: &old,
            advantages: &adv,
            mask: &mask,
            ref_logp: Some(&reference),
            entropy: None,
            rollout_logp: None,
        },
        &config,
    )
    .unwrap();
    close(t.metrics.loss, 0.73, 1e-7);
    close(t.metrics.kl_loss.unwrap(), 0.5, 1e-7);
    let grads = t.loss.backward().unwrap();
    let tg = grads.get(&logp).unwrap().to_vec2::<f64>().unwrap();
    let want = [[0.02, -0.2, 0.0, 0.0], [0.02, 0.02, 0.42, 0.0]];
    for (row, want_row) in tg.iter().zip(want) {
        for (&got, want) in row.iter().zip(want_row) {
            close(got, want, 1e-8);
        }
    }
}

#[test]
fn low_var_kl_penalty_on_one_token() {
    // One token, ratio 1, A = 1: pg = −1. ref_logp = logp + ln 2: k = ln 2,
    // low_var_kl = 1 − ln 2 = 0.30685282; loss = −1 + 0.5 · 0.30685282 = −0.84657359.
    // ∂/∂logp = −A·r + 0.5 · (−(e^k − 1)) = −1 − 0.5 = −1.5.
    let dev = Device::Cpu;
    let config = PolicyLossConfig {
        kl: Some(KlPenalty {
            estimator: KlEstimator::LowVarKl,
            coef: 0.5,
        }),
        ..reference()
    };
    let logp = Var::new(&[-0.7f64], &dev).unwrap();
    let old = Tensor::new(&[-0.7f64], &dev).unwrap();
    let reference = Tensor::new(&[-0.7f64 + 2f64.ln()], &dev).unwrap();
    let adv = Tensor::new(1.0f64, &dev).unwrap();
    let mask = Tensor::new(&[1u32], &dev).unwrap();
    let out = policy_loss(
        &PolicyLossInputs {
            logp: logp.as_tensor(),
            old_logp: &old,
            advantages: &adv,
            mask: &mask,
            ref_logp: Some(&reference),
            entropy: Some(&Tensor::new(&[2.5f64], &dev).unwrap()),
            rollout_logp: None,
        },
        &config,
    )
    .unwrap();
    close(out.metrics.loss, -1.0 + 0.5 * (1.0 - 2f64.ln()), 1e-7);
    // masked mean: 2.5 / (1 + 1e-8)
    close(out.metrics.entropy.unwrap(), 2.5, 1e-7);
    close(out.metrics.entropy_estimate, 0.7, 1e-7);
    let g = out.loss.backward().unwrap();
    let g = g.get(&logp).unwrap().to_vec1::<f64>().unwrap();
    close(g[0], -1.5, 1e-7);
}

/// Two sequences of three tokens for the rollout importance weight (TIS, cap 2): the learner's
/// old log-probs, the new ones and the sampler's, chosen so that the ratios are round numbers.
struct TisBatch {
    logp: [[f64; 3]; 2],
    old: [[f64; 3]; 2],
    rollout: [[f64; 3]; 2],
    adv: [f64; 2],
    mask: [[bool; 3]; 2],
}

fn tis_batch() -> TisBatch {
    let ln = f64::ln;
    TisBatch {
        // r = exp(logp − old): seq 1: 1, 1.1, 1.5; seq 2: 0.9, 1.2, (masked).
        logp: [
            [-1.0, -2.0 + ln(1.1), -0.5 + ln(1.5)],
            [-0.3 + ln(0.9), -1.2 + ln(1.2), f64::NAN],
        ],
        old: [[-1.0, -2.0, -0.5], [-0.3, -1.2, 0.0]],
        // exp(old − rollout): seq 1: 1.5, 3 (capped to 2), 0.5; seq 2: 1, 4 (capped to 2).
        rollout: [
            [-1.0 - ln(1.5), -2.0 - ln(3.0), -0.5 + ln(2.0)],
            [-0.3, -1.2 - ln(4.0), f64::NAN],
        ],
        adv: [1.0, -0.5],
        mask: [[true, true, true], [true, true, false]],
    }
}

/// `(loss, metrics, ∂loss/∂logp)` of the TIS batch through the slice form and the tensor form.
fn tis_both_forms(
    b: &TisBatch,
    config: &PolicyLossConfig,
    with_rollout: bool,
    reference: Option<[[f64; 3]; 2]>,
) -> [(f64, arpo_grpo::LossMetrics, Vec<f64>); 2] {
    let advs = [[b.adv[0]; 3], [b.adv[1]; 3]];
    let seqs: Vec<SequenceInput<'_>> = (0..2)
        .map(|i| SequenceInput {
            logp: &b.logp[i],
            old_logp: &b.old[i],
            advantages: &advs[i],
            mask: &b.mask[i],
            ref_logp: reference.as_ref().map(|r| &r[i][..]),
            entropy: None,
            rollout_logp: with_rollout.then_some(&b.rollout[i][..]),
        })
        .collect();
    let s = policy_loss_slices(&seqs, config).unwrap();

    let dev = Device::Cpu;
    let rows = |x: &[[f64; 3]; 2]| Tensor::new(x, &dev).unwrap();
    let logp = Var::from_tensor(&rows(&b.logp)).unwrap();
    let (old, rollout) = (rows(&b.old), rows(&b.rollout));
    let reference = reference.map(|r| rows(&r));
    let adv = Tensor::new(&b.adv, &dev).unwrap();
    let mask = Tensor::new(&b.mask.map(|m| m.map(u8::from)), &dev).unwrap();
    let t = policy_loss(
        &PolicyLossInputs {
            logp: logp.as_tensor(),
            old_logp: &old,
            advantages: &adv,
            mask: &mask,
            ref_logp: reference.as_ref(),
            entropy: None,
            rollout_logp: with_rollout.then_some(&rollout),
        },
        config,
    )
    .unwrap();
    let grads = t.loss.backward().unwrap();
    let tg = grads
        .get(&logp)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    [
        (s.loss, s.metrics, s.grad_logp.concat()),
        (t.loss.to_scalar::<f64>().unwrap(), t.metrics, tg),
    ]
}

#[test]
fn truncated_importance_sampling_on_a_hand_computed_batch() {
    // cap 2, seq-mean-token-mean; w = min(exp(old − rollout), 2) multiplies each clipped term.
    // seq 1 (A = 1):
    //   token 1: r = 1 inside the clip: pg = −1; w = 1.5: −1.5; ∂ = −A·r·w = −1.5
    //   token 2: r = 1.1: pg = −1.1; sampler ratio 3 > cap: w = 2: −2.2; ∂ = −2.2
    //   token 3: r = 1.5 > 1.3: pg = −1.3 (clipped, no gradient); w = 0.5: −0.65; ∂ = 0
    //   mean (−1.5 − 2.2 − 0.65)/3 = −4.35/3 = −1.45
    // seq 2 (A = −0.5):
    //   token 1: r = 0.9: pg = 0.45 (below the dual clip −3·A = 1.5); w = 1: 0.45; ∂ = 0.45
    //   token 2: r = 1.2: pg = 0.6; sampler ratio 4 > cap: w = 2: 1.2; ∂ = 1.2
    //   token 3: masked (NaN log-probs): nothing
    //   mean (0.45 + 1.2)/2 = 0.825
    // loss = (−1.45 + 0.825)/2 = −0.3125
    // ∂loss/∂logp = ∂/(n_seq·B): seq 1: −1.5/6 = −0.25, −2.2/6, 0; seq 2: 0.45/4 = 0.1125, 1.2/4 = 0.3, 0
    // mean weight: ((1.5 + 2 + 0.5)/3 + (1 + 2)/2)/2 = (4/3 + 3/2)/2 = 17/12
    // The ratio clip is decided on r alone: clipfrac_higher (1/3 + 0)/2 = 1/6, as without TIS.
    let b = tis_batch();
    let config = PolicyLossConfig {
        rollout_is_cap: Some(2.0),
        ..reference()
    };
    let want_grad = [-0.25, -2.2 / 6.0, 0.0, 0.1125, 0.3, 0.0];
    for (form, (loss, m, grad)) in ["slices", "tensor"]
        .into_iter()
        .zip(tis_both_forms(&b, &config, true, None))
    {
        close(loss, -0.3125, 1e-7);
        close(m.pg_loss, -0.3125, 1e-7);
        close(m.rollout_is_weight.unwrap(), 17.0 / 12.0, 1e-7);
        close(m.pg_clipfrac_higher, 1.0 / 6.0, 1e-7);
        assert_eq!((m.sequences, m.tokens), (2, 5), "{form}");
        for (k, (&got, want)) in grad.iter().zip(want_grad).enumerate() {
            assert!(
                (got - want).abs() <= 1e-7,
                "{form}: ∂loss/∂logp[{k}] = {got}, want {want}"
            );
        }
        assert_eq!(grad[5], 0.0, "{form}: a masked token gets no gradient");
    }

    // Without a cap the loss is the plain one, bit for bit, whether or not the sampler's
    // log-probs are given: seq 1 (−1 − 1.1 − 1.3)/3, seq 2 (0.45 + 0.6)/2, loss −0.3041667.
    let plain = reference();
    let without = tis_both_forms(&b, &plain, false, None);
    let ignored = tis_both_forms(&b, &plain, true, None);
    for ((w, i), form) in without.iter().zip(&ignored).zip(["slices", "tensor"]) {
        close(w.0, (-3.4 / 3.0 + 0.525) / 2.0, 1e-7);
        assert_eq!(w.0.to_bits(), i.0.to_bits(), "{form}");
        assert_eq!(w.1, i.1, "{form}");
        assert!(w.1.rollout_is_weight.is_none(), "{form}");
        assert_eq!(w.2, i.2, "{form}");
    }

    // A sampler that agrees with the learner has weight 1 everywhere: the plain loss again.
    let same = TisBatch {
        rollout: b.old,
        ..tis_batch()
    };
    for ((t, w), form) in tis_both_forms(&same, &config, true, None)
        .iter()
        .zip(&without)
        .zip(["slices", "tensor"])
    {
        assert_eq!(t.0.to_bits(), w.0.to_bits(), "{form}");
        assert_eq!(t.2, w.2, "{form}");
        close(t.1.rollout_is_weight.unwrap(), 1.0, 1e-7);
    }

    // The weight is on the policy-gradient term only, never on a KL penalty: with
    // ref_logp = logp − 0.5 (k1 = 0.5 on every trained token) and coef 0.1 the loss is
    // −0.3125 + 0.1·0.5 = −0.2625, and each gradient gains 0.1/(n_seq·B).
    let with_kl = PolicyLossConfig {
        kl: Some(KlPenalty {
            estimator: KlEstimator::Kl,
            coef: 0.1,
        }),
        ..config
    };
    let reference_logp = b.logp.map(|row| row.map(|l| l - 0.5));
    let kl_grad = [0.1 / 6.0, 0.1 / 6.0, 0.1 / 6.0, 0.1 / 4.0, 0.1 / 4.0, 0.0];
    for (form, (loss, m, grad)) in ["slices", "tensor"].into_iter().zip(tis_both_forms(
        &b,
        &with_kl,
        true,
        Some(reference_logp),
    )) {
        close(loss, -0.2625, 1e-7);
        close(m.kl_loss.unwrap(), 0.5, 1e-7);
        for (k, ((&got, want), kl)) in grad.iter().zip(want_grad).zip(kl_grad).enumerate() {
            assert!(
                (got - (want + kl)).abs() <= 1e-7,
                "{form}: ∂loss/∂logp[{k}] = {got}, want {}",
                want + kl
            );
        }
    }
}

#[test]
fn a_cap_without_the_samplers_log_probs_is_an_error_naming_both() {
    let b = tis_batch();
    let config = PolicyLossConfig {
        rollout_is_cap: Some(2.0),
        ..reference()
    };
    let advs = [1.0; 3];
    let seq = SequenceInput {
        logp: &b.logp[0],
        old_logp: &b.old[0],
        advantages: &advs,
        mask: &b.mask[0],
        ref_logp: None,
        entropy: None,
        rollout_logp: None,
    };
    let err = policy_loss_slices(&[seq], &config).unwrap_err();
    assert!(
        matches!(
            err,
            GrpoError::MissingInput {
                name: "rollout_logp",
                ..
            }
        ),
        "{err}"
    );
    let dev = Device::Cpu;
    let logp = Tensor::new(&b.logp[0], &dev).unwrap();
    let old = Tensor::new(&b.old[0], &dev).unwrap();
    let mask = Tensor::new(&[1u8; 3], &dev).unwrap();
    let adv = Tensor::new(1.0f64, &dev).unwrap();
    let err = policy_loss(
        &PolicyLossInputs {
            logp: &logp,
            old_logp: &old,
            advantages: &adv,
            mask: &mask,
            ref_logp: None,
            entropy: None,
            rollout_logp: None,
        },
        &config,
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("rollout_logp") && err.contains("rollout_is_cap"),
        "{err}"
    );
    // The wrong shape is refused too.
    let short = Tensor::new(&[-1.0f64, -2.0], &dev).unwrap();
    let err = policy_loss(
        &PolicyLossInputs {
            logp: &logp,
            old_logp: &old,
            advantages: &adv,
            mask: &mask,
            ref_logp: None,
            entropy: None,
            rollout_logp: Some(&short),
        },
        &config,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("rollout_logp"), "{err}");
}
