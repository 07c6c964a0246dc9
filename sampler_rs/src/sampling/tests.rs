//! Unit and property tests of the pipeline against naive, full-sort reference implementations
//! written straight from transformers' processors.

use std::sync::Arc;

use proptest::prelude::*;

use super::*;

fn params(cfg: SamplingConfig) -> Arc<SamplingParams> {
    Arc::new(SamplingParams::new(cfg).expect("valid params"))
}

fn cfg() -> SamplingConfig {
    SamplingConfig::default()
}

/// Reference `TopKLogitsWarper`.
fn ref_top_k(scores: &[f32], k: usize) -> Vec<f32> {
    let mut sorted = scores.to_vec();
    sorted.sort_by(|a, b| b.total_cmp(a));
    let kth = sorted[k.min(scores.len()) - 1];
    scores
        .iter()
        .map(|&s| if s < kth { f32::NEG_INFINITY } else { s })
        .collect()
}

/// Reference `TopPLogitsWarper`; also returns, per token, the normalised mass strictly above it
/// in the stable ascending order, so tests can tell a rounding-level boundary case.
fn ref_top_p(scores: &[f32], p: f64) -> (Vec<f32>, Vec<f64>) {
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    idx.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]).then(a.cmp(&b)));
    let m = scores.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let w: Vec<f64> = idx
        .iter()
        .map(|&i| f64::from(scores[i] - m).exp())
        .collect();
    let z: f64 = w.iter().sum();
    let mut out = scores.to_vec();
    let mut above = vec![0.0; scores.len()];
    let mut cum = 0.0;
    for (j, &i) in idx.iter().enumerate() {
        cum += w[j] / z;
        above[i] = 1.0 - cum + w[j] / z - w[j] / z; // mass above i = 1 - cum(i)
        if cum <= 1.0 - p && j + 1 < idx.len() {
            out[i] = f32::NEG_INFINITY;
        }
    }
    (out, above)
}

/// Reference `MinPLogitsWarper`.
fn ref_min_p(scores: &[f32], p: f64) -> Vec<f32> {
    let m = scores.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let top = scores.iter().position(|&s| s == m).unwrap();
    scores
        .iter()
        .enumerate()
        .map(|(i, &s)| {
            if i != top && f64::from(s - m).exp() < p {
                f32::NEG_INFINITY
            } else {
                s
            }
        })
        .collect()
}

fn finite_logits(len: std::ops::Range<usize>) -> impl Strategy<Value = Vec<f32>> {
    prop::collection::vec(
        prop_oneof![
            6 => -20.0f32..20.0,
            2 => (-4i32..4).prop_map(|i| i as f32), // ties
            1 => Just(f32::NEG_INFINITY),
        ],
        len,
    )
    .prop_filter("needs a finite logit", |v| v.iter().any(|x| x.is_finite()))
}

fn kept(v: &[f32]) -> Vec<usize> {
    (0..v.len()).filter(|&i| v[i] > f32::NEG_INFINITY).collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn top_k_keeps_ties_with_kth(row in finite_logits(1..300), k in 1usize..40, t in 0.3f64..2.0) {
        prop_assume!(k < row.len());
        let p = params(SamplingConfig { top_k: k as i64, temperature: t, ..cfg() });
        let got = process_row(&row, p.clone(), &[], &[]);
        let scaled: Vec<f32> = row.iter().map(|&x| x / p.temperature()).collect();
        prop_assert_eq!(got, ref_top_k(&scaled, k));
    }

    #[test]
    fn top_p_keeps_minimal_prefix(row in finite_logits(1..300), top_p in 0.05f64..0.99, t in 0.3f64..2.0) {
        let p = params(SamplingConfig { top_p, temperature: t, ..cfg() });
        let got = process_row(&row, p.clone(), &[], &[]);
        let scaled: Vec<f32> = row.iter().map(|&x| x / p.temperature()).collect();
        let (want, above) = ref_top_p(&scaled, top_p);
        for i in 0..row.len() {
            if (got[i] == f32::NEG_INFINITY) != (want[i] == f32::NEG_INFINITY) {
                // Only a token sitting on the boundary may differ, by rounding.
                prop_assert!((above[i] - top_p).abs() < 1e-5, "token {} above {} top_p {}", i, above[i], top_p);
            } else if got[i] != f32::NEG_INFINITY {
                prop_assert_eq!(got[i], want[i]);
            }
        }
        prop_assert!(!kept(&got).is_empty());
    }

    #[test]
    fn min_p_drops_below_fraction_of_top(row in finite_logits(1..300), min_p in 0.001f64..1.0) {
        let p = params(SamplingConfig { min_p, ..cfg() });
        let got = process_row(&row, p, &[], &[]);
        let want = ref_min_p(&row, min_p);
        let m = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        for i in 0..row.len() {
            if kept(&got[i..=i]).is_empty() != kept(&want[i..=i]).is_empty() {
                let ratio = f64::from(row[i] - m).exp();
                prop_assert!((ratio - min_p).abs() < 1e-5 * min_p.max(1e-3), "token {}", i);
            }
        }
    }

    #[test]
    fn all_filters_then_sampled_token_is_kept(
        row in finite_logits(2..400), k in 1usize..60, top_p in 0.05f64..1.0,
        min_p in 0.0f64..0.5, seed: u64,
    ) {
        let c = SamplingConfig { top_k: k as i64, top_p, min_p, seed, temperature: 0.8, ..cfg() };
        let processed = process_row(&row, params(c.clone()), &[], &[]);
        let mut s = Sampler::new(row.len()).unwrap();
        s.add_sequence(1, params(c), &[]).unwrap();
        let out = s.step(&row, row.len(), &[1]).unwrap();
        prop_assert!(processed[out[0].token_id as usize] > f32::NEG_INFINITY);
    }

    #[test]
    fn greedy_is_first_argmax(row in finite_logits(1..500), width_pad in 0usize..3) {
        let vocab = row.len();
        let mut s = Sampler::new(vocab).unwrap();
        s.add_sequence(0, params(SamplingConfig { temperature: 0.0, top_logprobs: 3, ..cfg() }), &[]).unwrap();
        let mut padded = row.clone();
        padded.extend(std::iter::repeat_n(1e30, width_pad));
        let out = s.step(&padded, vocab + width_pad, &[0]).unwrap();
        let m = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        prop_assert_eq!(out[0].token_id as usize, row.iter().position(|&x| x == m).unwrap());
        // Raw log-softmax, and the top alternatives best first, ties by lower id.
        let lse = f64::from(m) + row.iter().map(|&x| f64::from(x - m).exp()).sum::<f64>().ln();
        prop_assert!((f64::from(out[0].logprob) - (f64::from(m) - lse)).abs() < 1e-5);
        let mut order: Vec<usize> = (0..vocab).collect();
        order.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
        let want: Vec<u32> = order.iter().take(3).map(|&i| i as u32).collect();
        let got: Vec<u32> = out[0].top_logprobs.iter().map(|&(t, _)| t).collect();
        prop_assert_eq!(got, want);
        for &(t, lp) in &out[0].top_logprobs {
            let expect = f64::from(row[t as usize]) - lse;
            prop_assert!(lp == f32::NEG_INFINITY && expect == f64::NEG_INFINITY || (f64::from(lp) - expect).abs() < 1e-5);
        }
    }

    #[test]
    fn penalties_follow_their_formulas(
        row in prop::collection::vec(-10.0f32..10.0, 2..200),
        prompt in prop::collection::vec(0u32..200, 0..20),
        generated in prop::collection::vec(0u32..200, 0..20),
        rep in 0.5f64..2.0, freq in -2.0f64..2.0, pres in -2.0f64..2.0,
    ) {
        let v = row.len() as u32;
        let prompt: Vec<u32> = prompt.into_iter().map(|t| t % v).collect();
        let generated: Vec<u32> = generated.into_iter().map(|t| t % v).collect();
        let c = SamplingConfig {
            repetition_penalty: rep, frequency_penalty: freq, presence_penalty: pres,
            logit_bias: vec![(0, 1.5)], ..cfg()
        };
        let got = process_row(&row, params(c), &prompt, &generated);
        let mut want = row.clone();
        want[0] += 1.5;
        for i in 0..row.len() as u32 {
            let x = want[i as usize];
            if prompt.contains(&i) || generated.contains(&i) {
                let r = rep as f32;
                want[i as usize] = if x < 0.0 { x * r } else { x / r };
            }
            let n = generated.iter().filter(|&&g| g == i).count();
            if n > 0 {
                want[i as usize] = want[i as usize] - n as f32 * freq as f32 - pres as f32;
            }
        }
        prop_assert_eq!(got, want);
    }

    #[test]
    fn same_seed_same_tokens_whatever_the_batch(
        rows in prop::collection::vec(prop::collection::vec(-5.0f32..5.0, 64), 1..5), seed: u64,
    ) {
        let vocab = 64;
        let c = SamplingConfig { seed, temperature: 1.3, top_p: 0.95, ..cfg() };
        // Alone: one sequence stepping through `rows`.
        let mut alone = Sampler::new(vocab).unwrap();
        alone.add_sequence(7, params(c.clone()), &[]).unwrap();
        let solo: Vec<u32> = rows.iter().map(|r| alone.step(r, vocab, &[7]).unwrap()[0].token_id).collect();
        // Batched behind another sequence with other logits.
        let mut both = Sampler::new(vocab).unwrap();
        both.add_sequence(1, params(SamplingConfig { seed: seed ^ 1, ..c.clone() }), &[]).unwrap();
        both.add_sequence(7, params(c), &[]).unwrap();
        let batched: Vec<u32> = rows.iter().map(|r| {
            let mut buf: Vec<f32> = r.iter().map(|x| -x).collect();
            buf.extend_from_slice(r);
            both.step(&buf, vocab, &[1, 7]).unwrap()[1].token_id
        }).collect();
        prop_assert_eq!(solo, batched);
    }
}

#[test]
fn few_and_many_edits_agree() {
    // Few edits patch chunk by chunk; many copy the whole row first. Same result either way.
    let row: Vec<f32> = (0..1000)
        .map(|i| ((i * 37 % 101) as f32) * 0.1 - 5.0)
        .collect();
    let few: Vec<u32> = vec![3, 64, 65, 999];
    let many: Vec<u32> = (0..200).map(|i| i * 5).collect();
    for prompt in [few, many] {
        let c = SamplingConfig {
            repetition_penalty: 1.3,
            frequency_penalty: 0.5,
            logit_bias: vec![(10, 2.0)],
            ..cfg()
        };
        let got = process_row(&row, params(c), &prompt, &[64, 64, 7]);
        let mut want = row.clone();
        want[10] += 2.0;
        let seen: std::collections::BTreeSet<u32> = prompt.iter().copied().chain([64, 7]).collect();
        for &t in &seen {
            let x = want[t as usize];
            want[t as usize] = if x < 0.0 { x * 1.3 } else { x / 1.3 };
        }
        want[64] -= 2.0 * 0.5;
        want[7] -= 0.5;
        assert_eq!(got, want, "prompt of {}", prompt.len());
    }
}

#[test]
fn eos_masked_until_min_tokens() {
    let vocab = 8;
    let mut row = vec![0f32; vocab];
    row[3] = 50.0; // EOS dominates
    let c = SamplingConfig {
        min_tokens: 2,
        eos_token_ids: vec![3],
        seed: 1,
        ..cfg()
    };
    let mut s = Sampler::new(vocab).unwrap();
    s.add_sequence(0, params(c), &[]).unwrap();
    let toks: Vec<u32> = (0..3)
        .map(|_| s.step(&row, vocab, &[0]).unwrap()[0].token_id)
        .collect();
    assert_ne!(toks[0], 3);
    assert_ne!(toks[1], 3);
    assert_eq!(toks[2], 3);
    let c = SamplingConfig {
        ignore_eos: true,
        eos_token_ids: vec![3],
        temperature: 0.0,
        ..cfg()
    };
    let got = process_row(&row, params(c), &[], &[1, 2, 4, 5]);
    assert_eq!(got[3], f32::NEG_INFINITY);
}

#[test]
fn padding_columns_never_sampled() {
    let (vocab, width) = (100, 128);
    let mut s = Sampler::new(vocab).unwrap();
    for id in 0..4 {
        s.add_sequence(id, params(SamplingConfig { seed: id, ..cfg() }), &[])
            .unwrap();
    }
    let mut buf = vec![0f32; 4 * width];
    for r in 0..4 {
        for c in vocab..width {
            buf[r * width + c] = 1e9;
        }
    }
    for _ in 0..50 {
        for out in s.step(&buf, width, &[0, 1, 2, 3]).unwrap() {
            assert!((out.token_id as usize) < vocab);
        }
    }
}

#[test]
fn sampling_follows_the_distribution() {
    // Two tokens with probabilities 0.25 / 0.75 after temperature 1.
    let row = [0.0f32, 3f32.ln()];
    let mut s = Sampler::new(2).unwrap();
    s.add_sequence(0, params(SamplingConfig { seed: 42, ..cfg() }), &[])
        .unwrap();
    let n = 20_000;
    let ones = (0..n)
        .filter(|_| s.step(&row, 2, &[0]).unwrap()[0].token_id == 1)
        .count();
    let frac = ones as f64 / n as f64;
    assert!((frac - 0.75).abs() < 0.015, "{frac}");
}

#[test]
fn large_rows_take_the_chunked_paths() {
    // Rows wider than a chunk and batches big enough to run in parallel.
    let vocab = 5000;
    let rows = 16;
    let buf: Vec<f32> = (0..rows * vocab)
        .map(|i| ((i * 7919 % 1000) as f32) * 0.01)
        .collect();
    let mut s = Sampler::new(vocab).unwrap();
    for id in 0..rows as u64 {
        let c = SamplingConfig {
            seed: id,
            top_k: [0, 50][id as usize % 2],
            top_p: [1.0, 0.9][id as usize / 2 % 2],
            min_p: [0.0, 0.05][id as usize / 4 % 2],
            temperature: [0.7, 0.0][id as usize / 8 % 2],
            top_logprobs: 5,
            ..cfg()
        };
        s.add_sequence(id, params(c), &[]).unwrap();
    }
    let ids: Vec<u64> = (0..rows as u64).collect();
    let outs = s.step(&buf, vocab, &ids).unwrap();
    for (i, out) in outs.iter().enumerate() {
        let row = &buf[i * vocab..(i + 1) * vocab];
        let c = s.sequences[&(i as u64)].params().config().clone();
        let processed = process_row(row, params(c), &[], &[]);
        assert!(
            processed[out.token_id as usize] > f32::NEG_INFINITY,
            "row {i}"
        );
        assert_eq!(out.top_logprobs.len(), 5);
    }
}

#[test]
fn errors() {
    assert!(Sampler::new(0).is_err());
    let mut s = Sampler::new(4).unwrap();
    s.add_sequence(1, params(cfg()), &[0, 3]).unwrap();
    assert_eq!(
        s.add_sequence(1, params(cfg()), &[]),
        Err(SamplerError::DuplicateSequence(1))
    );
    assert!(matches!(
        s.add_sequence(2, params(cfg()), &[4]),
        Err(SamplerError::TokenOutOfRange { token: 4, .. })
    ));
    let eos = params(SamplingConfig {
        eos_token_ids: vec![9],
        ..cfg()
    });
    assert!(s.add_sequence(2, eos, &[]).is_err());
    assert_eq!(
        s.step(&[0.0; 4], 4, &[5]),
        Err(SamplerError::UnknownSequence(5))
    );
    assert!(matches!(
        s.step(&[0.0; 3], 3, &[1]),
        Err(SamplerError::BadLogits(_))
    ));
    assert!(matches!(
        s.step(&[0.0; 5], 4, &[1]),
        Err(SamplerError::BadLogits(_))
    ));
    s.add_sequence(2, params(cfg()), &[]).unwrap();
    assert_eq!(
        s.step(&[0.0; 8], 4, &[1, 1]),
        Err(SamplerError::RepeatedInBatch(1))
    );
    assert!(matches!(
        s.step(&[f32::NEG_INFINITY; 4], 4, &[1]),
        Err(SamplerError::NoCandidates(1))
    ));
    assert_eq!(s.remove_sequence(9), Err(SamplerError::UnknownSequence(9)));
    s.remove_sequence(1).unwrap();
    assert_eq!(s.len(), 1);
    assert!(!s.contains(1));
}

#[test]
fn params_are_validated() {
    let bad = [
        (
            "temperature",
            SamplingConfig {
                temperature: -1.0,
                ..cfg()
            },
        ),
        (
            "top_p",
            SamplingConfig {
                top_p: 0.0,
                ..cfg()
            },
        ),
        (
            "top_p",
            SamplingConfig {
                top_p: 1.5,
                ..cfg()
            },
        ),
        ("top_k", SamplingConfig { top_k: -2, ..cfg() }),
        (
            "min_p",
            SamplingConfig {
                min_p: 1.1,
                ..cfg()
            },
        ),
        (
            "top_logprobs",
            SamplingConfig {
                top_logprobs: 21,
                ..cfg()
            },
        ),
        (
            "repetition_penalty",
            SamplingConfig {
                repetition_penalty: 0.0,
                ..cfg()
            },
        ),
        (
            "frequency_penalty",
            SamplingConfig {
                frequency_penalty: 2.5,
                ..cfg()
            },
        ),
        (
            "presence_penalty",
            SamplingConfig {
                presence_penalty: f64::NAN,
                ..cfg()
            },
        ),
        (
            "logit_bias",
            SamplingConfig {
                logit_bias: vec![(-1, 0.0)],
                ..cfg()
            },
        ),
        (
            "logit_bias",
            SamplingConfig {
                logit_bias: vec![(1, 101.0)],
                ..cfg()
            },
        ),
        (
            "min_tokens",
            SamplingConfig {
                min_tokens: -1,
                ..cfg()
            },
        ),
        (
            "eos_token_ids",
            SamplingConfig {
                eos_token_ids: vec![-3],
                ..cfg()
            },
        ),
    ];
    for (name, c) in bad {
        match SamplingParams::new(c) {
            Err(SamplerError::InvalidParameter { parameter, .. }) => assert_eq!(parameter, name),
            other => panic!("{name}: {other:?}"),
        }
    }
}
