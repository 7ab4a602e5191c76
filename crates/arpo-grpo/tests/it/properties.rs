//! Property tests of the advantages and the policy loss, one invariant per test.

#![allow(clippy::unwrap_used)] // in tests a panic is the failure report

use arpo_grpo::{
    AdvantageConfig, AdvantageEstimator, BatchCount, KlEstimator, KlPenalty, LossAggMode,
    PolicyLossConfig, PolicyLossInputs, SequenceInput, group_advantages, policy_loss,
    policy_loss_slices, token_policy_loss,
};
use candle_core::{Device, Tensor, Var};
use proptest::prelude::*;

// ---------------------------------------------------------------- advantages

/// Rewards as ARPO produces them (eval + 0.5·format: 0, 1, −0.5, 0.5) mixed with arbitrary
/// values, 2 to 8 per group.
fn rewards() -> impl Strategy<Value = Vec<f64>> {
    let reward = prop_oneof![Just(0.0), Just(1.0), Just(-0.5), Just(0.5), -2.0f64..2.0,];
    prop::collection::vec(reward, 2..9)
}

/// Rewards whose unbiased std is at least 1e-3 (they differ).
fn differing_rewards() -> impl Strategy<Value = Vec<f64>> {
    rewards().prop_filter("rewards differ", |r| sample_std(r) >= 1e-3)
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len() as f64
}

fn sample_std(v: &[f64]) -> f64 {
    let m = mean(v);
    (v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (v.len() as f64 - 1.0)).sqrt()
}

fn estimator() -> impl Strategy<Value = AdvantageEstimator> {
    prop_oneof![
        Just(AdvantageEstimator::Grpo),
        Just(AdvantageEstimator::DrGrpo),
        Just(AdvantageEstimator::Rloo),
    ]
}

fn with(estimator: AdvantageEstimator, eps: f64) -> AdvantageConfig {
    AdvantageConfig { estimator, eps }
}

proptest! {
    #[test]
    fn grpo_advantages_have_zero_mean_and_unit_sample_std_when_rewards_differ(r in differing_rewards()) {
        let config = AdvantageConfig::default();
        let a = group_advantages(&r, &config).unwrap();
        prop_assert!(mean(&a).abs() < 1e-12, "mean {}", mean(&a));
        // With eps the std is s/(s + eps), exactly; without it, 1.
        let s = sample_std(&r);
        prop_assert!((sample_std(&a) - s / (s + 1e-6)).abs() < 1e-9);
        let a0 = group_advantages(&r, &with(AdvantageEstimator::Grpo, 0.0)).unwrap();
        prop_assert!((sample_std(&a0) - 1.0).abs() < 1e-9);
    }

    #[test]
    fn every_estimator_gives_zero_mean_advantages(r in rewards(), est in estimator()) {
        let a = group_advantages(&r, &with(est, 1e-6)).unwrap();
        prop_assert!(mean(&a).abs() < 1e-9, "mean {}", mean(&a));
    }

    #[test]
    fn equal_rewards_give_all_zero_advantages(
        value in prop_oneof![Just(0.0), Just(1.0), Just(-0.5), -3.0f64..3.0],
        n in 2usize..9,
        est in estimator(),
        eps in prop_oneof![Just(0.0), Just(1e-6)],
    ) {
        let a = group_advantages(&vec![value; n], &with(est, eps)).unwrap();
        prop_assert!(a.iter().all(|&x| x == 0.0), "{a:?}");
    }

    #[test]
    fn advantages_are_invariant_to_adding_a_constant(
        r in rewards(), c in -10.0f64..10.0, est in estimator(),
    ) {
        let config = with(est, 1e-6);
        let a = group_advantages(&r, &config).unwrap();
        let shifted: Vec<f64> = r.iter().map(|x| x + c).collect();
        let b = group_advantages(&shifted, &config).unwrap();
        for (x, y) in a.iter().zip(&b) {
            // Adding c rounds each reward by up to |c|·2⁻⁵³; GRPO divides that by the std.
            prop_assert!((x - y).abs() < 1e-9, "{a:?} vs {b:?}");
        }
    }

    #[test]
    fn grpo_advantages_are_invariant_to_positive_scaling(
        r in differing_rewards(), k in 0.1f64..10.0,
    ) {
        let scaled: Vec<f64> = r.iter().map(|x| x * k).collect();
        // Without eps, exactly invariant (to rounding).
        let exact = with(AdvantageEstimator::Grpo, 0.0);
        let a = group_advantages(&r, &exact).unwrap();
        let b = group_advantages(&scaled, &exact).unwrap();
        for (x, y) in a.iter().zip(&b) {
            prop_assert!((x - y).abs() < 1e-9, "{a:?} vs {b:?}");
        }
        // With eps = 1e-6: c/(s + eps) vs c/(s + eps/k) differ by at most
        // |c|/s · eps·|1 − 1/k|/s, and |c|/s <= sqrt(n − 1) < 3.
        let config = AdvantageConfig::default();
        let a = group_advantages(&r, &config).unwrap();
        let b = group_advantages(&scaled, &config).unwrap();
        let s = sample_std(&r);
        let bound = 3.0 * 1e-6 * (1.0 - 1.0 / k).abs() / s + 1e-9;
        for (x, y) in a.iter().zip(&b) {
            prop_assert!((x - y).abs() <= bound, "{x} vs {y}, bound {bound}");
        }
    }

    #[test]
    fn dr_grpo_and_rloo_advantages_scale_with_the_rewards(
        r in rewards(), k in 0.1f64..10.0,
        est in prop_oneof![Just(AdvantageEstimator::DrGrpo), Just(AdvantageEstimator::Rloo)],
    ) {
        let config = with(est, 1e-6);
        let a = group_advantages(&r, &config).unwrap();
        let scaled: Vec<f64> = r.iter().map(|x| x * k).collect();
        let b = group_advantages(&scaled, &config).unwrap();
        for (x, y) in a.iter().zip(&b) {
            prop_assert!((x * k - y).abs() < 1e-9, "{a:?} vs {b:?}");
        }
    }

    #[test]
    fn permuting_a_group_permutes_its_advantages(
        (r, perm) in rewards().prop_flat_map(|r| {
            let n = r.len();
            (Just(r), Just((0..n).collect::<Vec<usize>>()).prop_shuffle())
        }),
        est in estimator(),
    ) {
        let config = with(est, 1e-6);
        let a = group_advantages(&r, &config).unwrap();
        let permuted: Vec<f64> = perm.iter().map(|&i| r[i]).collect();
        let b = group_advantages(&permuted, &config).unwrap();
        for (j, &i) in perm.iter().enumerate() {
            prop_assert!((b[j] - a[i]).abs() < 1e-9, "{a:?} vs {b:?} under {perm:?}");
        }
    }

    #[test]
    fn rloo_is_the_leave_one_out_baseline(r in rewards()) {
        let a = group_advantages(&r, &with(AdvantageEstimator::Rloo, 1e-6)).unwrap();
        for (i, &ai) in a.iter().enumerate() {
            let others: Vec<f64> = r.iter().enumerate().filter(|&(j, _)| j != i).map(|(_, &x)| x).collect();
            prop_assert!((ai - (r[i] - mean(&others))).abs() < 1e-9);
        }
    }
}

// ---------------------------------------------------------------- policy loss

fn cpu() -> Device {
    Device::Cpu
}

/// One token's loss and gradient through the tensor form (f64), as a `[1]` sequence.
fn tensor_token(x: f64, a: f64, config: &PolicyLossConfig) -> (f64, f64) {
    let logp = Var::new(&[x - 1.0], &cpu()).unwrap();
    let old = Tensor::new(&[-1.0f64], &cpu()).unwrap();
    let adv = Tensor::new(a, &cpu()).unwrap();
    let mask = Tensor::new(&[1u8], &cpu()).unwrap();
    let out = policy_loss(
        &PolicyLossInputs {
            logp: logp.as_tensor(),
            old_logp: &old,
            advantages: &adv,
            mask: &mask,
            ref_logp: None,
            entropy: None,
            rollout_logp: None,
        },
        config,
    )
    .unwrap();
    let grads = out.loss.backward().unwrap();
    let g = grads.get(&logp).unwrap().to_vec1::<f64>().unwrap()[0];
    (out.metrics.loss, g)
}

/// A log-ratio at least 1e-3 away from the clip bounds ln 0.8 and ln 1.3 and from ln 3.
fn log_ratio_away_from_bounds() -> impl Strategy<Value = f64> {
    (-3.0f64..3.0).prop_filter("away from the bounds", |x| {
        [0.8f64.ln(), 1.3f64.ln(), 3.0f64.ln()]
            .iter()
            .all(|b| (x - b).abs() > 1e-3)
    })
}

fn advantage() -> impl Strategy<Value = f64> {
    prop_oneof![-3.0f64..-1e-3, 1e-3f64..3.0]
}

proptest! {
    #[test]
    fn loss_equals_minus_a_times_ratio_inside_the_clip_range(
        x in (0.8f64.ln() + 1e-9)..(1.3f64.ln() - 1e-9), a in -5.0f64..5.0,
    ) {
        let config = PolicyLossConfig::default();
        let t = token_policy_loss(x - 1.0, -1.0, a, &config);
        let r = (x - 1.0 - -1.0f64).exp();
        prop_assert_eq!(t.loss, -a * r);
        prop_assert!(!t.clipped && !t.dual_clipped);
        prop_assert!((t.dloss_dlogp - -a * r).abs() < 1e-12);
        let (loss, grad) = tensor_token(x, a, &config);
        // The masked mean divides by 1 + 1e-8.
        prop_assert!((loss - -a * r).abs() < 1e-7 * (1.0 + a.abs()));
        prop_assert!((grad - -a * r).abs() < 1e-7 * (1.0 + a.abs()));
    }

    #[test]
    fn gradient_is_zero_where_the_clip_is_active(x in log_ratio_away_from_bounds(), a in advantage()) {
        let config = PolicyLossConfig::default();
        let t = token_policy_loss(x - 1.0, -1.0, a, &config);
        let (_, grad) = tensor_token(x, a, &config);
        let clip_active = t.clipped || t.dual_clipped;
        // Independent statement of when a clip is active: A > 0 and r > 1.3, A < 0 and
        // r < 0.8 (ratio clip), A < 0 and clip(r) ... > 3 (dual clip: the unclipped
        // r > 3 since r > 1.3 > 0.8 there).
        let r = x.exp();
        let expected_active = (a > 0.0 && r > 1.3) || (a < 0.0 && r < 0.8) || (a < 0.0 && r > 3.0);
        prop_assert_eq!(clip_active, expected_active, "x={} a={}", x, a);
        if clip_active {
            prop_assert_eq!(grad, 0.0);
            prop_assert_eq!(t.dloss_dlogp, 0.0);
        } else {
            prop_assert!((grad - -a * r).abs() < 1e-7 * (1.0 + (a * r).abs()));
            prop_assert!(grad != 0.0);
        }
    }

    #[test]
    fn dual_clip_bounds_the_loss_by_minus_three_a_for_negative_a(
        x in -5.0f64..5.0, a in -5.0f64..-1e-6,
    ) {
        let config = PolicyLossConfig::default();
        let t = token_policy_loss(x - 1.0, -1.0, a, &config);
        prop_assert!(t.loss <= -3.0 * a, "{} > {}", t.loss, -3.0 * a);
        let (loss, _) = tensor_token(x, a, &config);
        prop_assert!(loss <= -3.0 * a * (1.0 + 1e-12));
    }
}

/// A random batch: 1 to 4 sequences of 1 to 12 tokens (padded to the longest), values for
/// every position, a random mask.
#[derive(Debug, Clone)]
struct Batch {
    rows: usize,
    cols: usize,
    logp: Vec<f64>,
    old: Vec<f64>,
    reference: Vec<f64>,
    entropy: Vec<f64>,
    /// The sampler's log-probs (for the rollout importance weight).
    rollout: Vec<f64>,
    adv: Vec<f64>,
    mask: Vec<bool>,
}

fn batch() -> impl Strategy<Value = Batch> {
    (1usize..5, 1usize..13).prop_flat_map(|(rows, cols)| {
        let n = rows * cols;
        (
            prop::collection::vec(-4.0f64..-0.01, n),
            prop::collection::vec(-0.6f64..0.6, n),
            prop::collection::vec(-0.5f64..0.5, n),
            prop::collection::vec(0.0f64..3.0, n),
            prop::collection::vec(-2.0f64..2.0, rows),
            prop::collection::vec(prop::bool::weighted(0.7), n),
            prop::collection::vec(-1.5f64..1.5, n),
        )
            .prop_map(
                move |(logp, dx, dref, entropy, adv, mask, drollout)| Batch {
                    rows,
                    cols,
                    old: logp.iter().zip(&dx).map(|(l, d)| l - d).collect(),
                    reference: logp.iter().zip(&dref).map(|(l, d)| l - d).collect(),
                    // Sampler/learner ratios from e^−1.5 to e^1.5: some above every cap below.
                    rollout: logp
                        .iter()
                        .zip(&dx)
                        .zip(&drollout)
                        .map(|((l, d), r)| l - d - r)
                        .collect(),
                    logp,
                    entropy,
                    adv,
                    mask,
                },
            )
    })
}

/// Every aggregation mode, with and without a KL penalty, with and without the rollout
/// importance weight (caps below and above 1).
fn loss_config() -> impl Strategy<Value = PolicyLossConfig> {
    (
        prop_oneof![
            Just(LossAggMode::SeqMeanTokenMean),
            Just(LossAggMode::TokenMean)
        ],
        prop_oneof![
            Just(None),
            Just(Some(KlPenalty {
                estimator: KlEstimator::Kl,
                coef: 0.1
            })),
            Just(Some(KlPenalty {
                estimator: KlEstimator::LowVarKl,
                coef: 0.5
            })),
        ],
        prop_oneof![
            Just(None),
            Just(Some(2.0)),
            Just(Some(0.9)),
            Just(Some(1.3))
        ],
    )
        .prop_map(|(loss_agg_mode, kl, rollout_is_cap)| PolicyLossConfig {
            loss_agg_mode,
            kl,
            rollout_is_cap,
            ..PolicyLossConfig::default()
        })
}

struct TensorOut {
    loss: f64,
    metrics: arpo_grpo::LossMetrics,
    grad: Vec<f64>,
}

fn run_tensor(b: &Batch, config: &PolicyLossConfig) -> TensorOut {
    let shape = (b.rows, b.cols);
    let t = |v: &[f64]| Tensor::from_vec(v.to_vec(), shape, &cpu()).unwrap();
    let logp = Var::from_tensor(&t(&b.logp)).unwrap();
    let mask: Vec<f32> = b.mask.iter().map(|&m| f32::from(u8::from(m))).collect();
    let mask = Tensor::from_vec(mask, shape, &cpu()).unwrap();
    let adv = Tensor::from_vec(b.adv.clone(), b.rows, &cpu()).unwrap();
    let (old, reference, entropy, rollout) =
        (t(&b.old), t(&b.reference), t(&b.entropy), t(&b.rollout));
    let out = policy_loss(
        &PolicyLossInputs {
            logp: logp.as_tensor(),
            old_logp: &old,
            advantages: &adv,
            mask: &mask,
            ref_logp: Some(&reference),
            entropy: Some(&entropy),
            rollout_logp: Some(&rollout),
        },
        config,
    )
    .unwrap();
    let grads = out.loss.backward().unwrap();
    let grad = grads
        .get(&logp)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    TensorOut {
        loss: out.loss.to_scalar::<f64>().unwrap(),
        metrics: out.metrics,
        grad,
    }
}

fn run_slices(b: &Batch, config: &PolicyLossConfig) -> arpo_grpo::SliceLoss {
    let advs: Vec<Vec<f64>> = b.adv.iter().map(|&a| vec![a; b.cols]).collect();
    let seqs: Vec<SequenceInput<'_>> = (0..b.rows)
        .map(|i| {
            let r = i * b.cols..(i + 1) * b.cols;
            SequenceInput {
                logp: &b.logp[r.clone()],
                old_logp: &b.old[r.clone()],
                advantages: &advs[i],
                mask: &b.mask[r.clone()],
                ref_logp: Some(&b.reference[r.clone()]),
                entropy: Some(&b.entropy[r.clone()]),
                rollout_logp: Some(&b.rollout[r]),
            }
        })
        .collect();
    policy_loss_slices(&seqs, config).unwrap()
}

fn close(x: f64, y: f64) -> bool {
    (x - y).abs() <= 1e-10 * (1.0 + x.abs().max(y.abs()))
}

/// The tensor form and the slice form agree on the loss, every metric and the gradient.
fn forms_agree(b: &Batch, config: &PolicyLossConfig) -> Result<(), TestCaseError> {
    let t = run_tensor(b, config);
    let s = run_slices(b, config);
    prop_assert!(close(t.loss, s.loss), "{} vs {}", t.loss, s.loss);
    let (tm, sm) = (t.metrics, s.metrics);
    for (name, x, y) in [
        ("pg_loss", tm.pg_loss, sm.pg_loss),
        (
            "clipfrac_higher",
            tm.pg_clipfrac_higher,
            sm.pg_clipfrac_higher,
        ),
        ("clipfrac_lower", tm.pg_clipfrac_lower, sm.pg_clipfrac_lower),
        ("ppo_kl", tm.ppo_kl, sm.ppo_kl),
        ("ratio_mean", tm.ratio_mean, sm.ratio_mean),
        ("entropy", tm.entropy.unwrap(), sm.entropy.unwrap()),
        ("entropy_estimate", tm.entropy_estimate, sm.entropy_estimate),
        (
            "kl_loss",
            tm.kl_loss.unwrap_or(0.0),
            sm.kl_loss.unwrap_or(0.0),
        ),
        (
            "rollout_is_weight",
            tm.rollout_is_weight.unwrap_or(0.0),
            sm.rollout_is_weight.unwrap_or(0.0),
        ),
    ] {
        prop_assert!(close(x, y), "{name}: {x} vs {y}");
    }
    prop_assert_eq!((tm.tokens, tm.sequences), (sm.tokens, sm.sequences));
    prop_assert_eq!(
        tm.rollout_is_weight.is_some(),
        config.rollout_is_cap.is_some()
    );
    prop_assert_eq!(
        sm.rollout_is_weight.is_some(),
        config.rollout_is_cap.is_some()
    );
    let flat: Vec<f64> = s.grad_logp.concat();
    for (i, (x, y)) in t.grad.iter().zip(&flat).enumerate() {
        prop_assert!(close(*x, *y), "grad {i}: {x} vs {y}");
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn tensor_loss_and_gradient_match_the_slice_form(b in batch(), config in loss_config()) {
        forms_agree(&b, &config)?;
    }

    #[test]
    fn with_truncated_importance_sampling_the_tensor_and_slice_forms_agree(
        b in batch(), config in loss_config(), cap in 0.2f64..4.0,
    ) {
        let config = PolicyLossConfig { rollout_is_cap: Some(cap), ..config };
        forms_agree(&b, &config)?;
        // The mean weight is a mean of values in (0, cap].
        let w = run_slices(&b, &config).metrics.rollout_is_weight.unwrap();
        prop_assert!(w >= 0.0 && w <= cap * (1.0 + 1e-12), "{w} outside [0, {cap}]");
    }

    #[test]
    fn a_sampler_equal_to_the_learner_leaves_the_loss_unchanged_for_a_cap_of_at_least_one(
        b in batch(), config in loss_config(), cap in 1.0f64..4.0,
    ) {
        let plain = PolicyLossConfig { rollout_is_cap: None, ..config };
        let tis = PolicyLossConfig { rollout_is_cap: Some(cap), ..config };
        let same = Batch { rollout: b.old.clone(), ..b.clone() };
        let (p, t) = (run_tensor(&b, &plain), run_tensor(&same, &tis));
        prop_assert_eq!(p.loss.to_bits(), t.loss.to_bits());
        prop_assert_eq!(p.grad, t.grad);
        let (p, t) = (run_slices(&b, &plain), run_slices(&same, &tis));
        prop_assert_eq!(p.loss.to_bits(), t.loss.to_bits());
        prop_assert_eq!(p.grad_logp, t.grad_logp);
    }

    #[test]
    fn masked_tokens_contribute_nothing(
        b in batch(), config in loss_config(), garbage in prop_oneof![Just(f64::NAN), Just(f64::INFINITY), -50.0f64..50.0],
    ) {
        let t = run_tensor(&b, &config);
        let mut dirty = b.clone();
        for i in 0..dirty.mask.len() {
            if !dirty.mask[i] {
                dirty.logp[i] = garbage;
                dirty.old[i] = -garbage;
                dirty.reference[i] = garbage;
                dirty.entropy[i] = garbage;
                dirty.rollout[i] = garbage;
            }
        }
        let d = run_tensor(&dirty, &config);
        prop_assert_eq!(t.loss.to_bits(), d.loss.to_bits());
        prop_assert_eq!(t.metrics, d.metrics);
        for (i, (x, y)) in t.grad.iter().zip(&d.grad).enumerate() {
            prop_assert_eq!(x.to_bits(), y.to_bits(), "grad {}", i);
            if !b.mask[i] {
                prop_assert_eq!(*y, 0.0);
            }
        }
        // The slice form ignores them the same way.
        let s = run_slices(&b, &config);
        let sd = run_slices(&dirty, &config);
        prop_assert_eq!(s, sd);
    }

    #[test]
    fn accumulating_weighted_micro_batches_gives_the_full_batch_loss(b in batch(), config in loss_config()) {
        let full = run_slices(&b, &config);
        let tokens_of = |i: usize| b.mask[i * b.cols..(i + 1) * b.cols].iter().filter(|&&m| m).count();
        let total = BatchCount { sequences: b.rows, tokens: (0..b.rows).map(tokens_of).sum() };
        let mut sum = 0.0;
        for i in 0..b.rows {
            let one = Batch {
                rows: 1,
                cols: b.cols,
                logp: b.logp[i * b.cols..(i + 1) * b.cols].to_vec(),
                old: b.old[i * b.cols..(i + 1) * b.cols].to_vec(),
                reference: b.reference[i * b.cols..(i + 1) * b.cols].to_vec(),
                entropy: b.entropy[i * b.cols..(i + 1) * b.cols].to_vec(),
                rollout: b.rollout[i * b.cols..(i + 1) * b.cols].to_vec(),
                adv: vec![b.adv[i]],
                mask: b.mask[i * b.cols..(i + 1) * b.cols].to_vec(),
            };
            let micro = BatchCount { sequences: 1, tokens: tokens_of(i) };
            sum += config.loss_agg_mode.micro_batch_weight(micro, total) * run_tensor(&one, &config).loss;
        }
        // Equal up to the masked mean's 1e-8 in the denominators.
        prop_assert!((sum - full.loss).abs() <= 1e-7 * (1.0 + full.loss.abs()), "{sum} vs {}", full.loss);
    }
}

#[test]
fn f32_and_bf16_log_probs_compute_in_f32_and_keep_the_gradient() {
    // A = 1, r = e^0.1 inside the range: loss −e^0.1, ∂/∂logp = −e^0.1 = −1.1051709.
    for dtype in [candle_core::DType::F32, candle_core::DType::BF16] {
        let logp = Var::from_tensor(
            &Tensor::new(&[-0.9f32], &cpu())
                .unwrap()
                .to_dtype(dtype)
                .unwrap(),
        )
        .unwrap();
        let old = Tensor::new(&[-1.0f32], &cpu()).unwrap();
        let adv = Tensor::new(1.0f32, &cpu()).unwrap();
        let mask = Tensor::new(&[1u8], &cpu()).unwrap();
        let out = policy_loss(
            &PolicyLossInputs {
                logp: logp.as_tensor(),
                old_logp: &old,
                advantages: &adv,
                mask: &mask,
                ref_logp: None,
                entropy: None,
                rollout_logp: None,
            },
            &PolicyLossConfig::default(),
        )
        .unwrap();
        assert_eq!(out.loss.dtype(), candle_core::DType::F32);
        // bf16 holds −0.9 as −0.8984375: r = e^0.1015625.
        let x = if dtype == candle_core::DType::BF16 {
            0.1015625f64
        } else {
            0.1
        };
        assert!((out.metrics.loss + x.exp()).abs() < 1e-5, "{dtype:?}");
        let g = out.loss.backward().unwrap();
        let g = g
            .get(&logp)
            .unwrap()
            .to_dtype(candle_core::DType::F64)
            .unwrap();
        let g = g.to_vec1::<f64>().unwrap()[0];
        assert!((g + x.exp()).abs() < 1e-2, "{dtype:?}: {g}");
    }
}

#[test]
fn shape_errors_say_what_to_pass() {
    let logp = Tensor::zeros((2, 3), candle_core::DType::F32, &cpu()).unwrap();
    let mask = Tensor::ones((2, 3), candle_core::DType::U8, &cpu()).unwrap();
    let bad_adv = Tensor::zeros(3, candle_core::DType::F32, &cpu()).unwrap();
    let err = policy_loss(
        &PolicyLossInputs {
            logp: &logp,
            old_logp: &logp,
            advantages: &bad_adv,
            mask: &mask,
            ref_logp: None,
            entropy: None,
            rollout_logp: None,
        },
        &PolicyLossConfig::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("advantages") && err.contains("per sequence"),
        "{err}"
    );
    let ints = Tensor::zeros((2, 3), candle_core::DType::U32, &cpu()).unwrap();
    let adv = Tensor::zeros(2, candle_core::DType::F32, &cpu()).unwrap();
    let err = policy_loss(
        &PolicyLossInputs {
            logp: &ints,
            old_logp: &logp,
            advantages: &adv,
            mask: &mask,
            ref_logp: None,
            entropy: None,
            rollout_logp: None,
        },
        &PolicyLossConfig::default(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("f32"), "{err}");
    // A KL penalty without reference log-probs.
    let config = PolicyLossConfig {
        kl: Some(KlPenalty {
            estimator: KlEstimator::Kl,
            coef: 0.1,
        }),
        ..PolicyLossConfig::default()
    };
    let err = policy_loss(
        &PolicyLossInputs {
            logp: &logp,
            old_logp: &logp,
            advantages: &adv,
            mask: &mask,
            ref_logp: None,
            entropy: None,
            rollout_logp: None,
        },
        &config,
    )
    .unwrap_err();
    assert!(err.to_string().contains("ref_logp"), "{err}");
}
