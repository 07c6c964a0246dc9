//! Beam-search bookkeeping on toy logits, and a differential test against a dense reference: a
//! direct transcription of transformers' `_beam_search` tensor code over fully materialised rows.

use std::sync::Arc;

use proptest::prelude::*;

use super::*;
use crate::sampling::row::{RowBuffers, RowView, TopN};
use crate::sampling::SamplingConfig;

fn config(k: usize, n: usize, v: usize, eos: &[TokenId], m: usize) -> BeamConfig {
    BeamConfig {
        num_beams: k,
        num_return: n,
        length_penalty: 1.0,
        early_stopping: EarlyStopping::Heuristic,
        eos_token_ids: eos.to_vec(),
        max_new_tokens: m,
        vocab_size: v,
        params: None,
        prompt_token_ids: vec![],
        guide: None,
        top_logprobs: 0,
    }
}

/// Log-probabilities from probabilities (rows need not be normalised: they are log-softmaxed).
fn ln(row: &[f32]) -> Vec<f32> {
    row.iter().map(|p| p.ln()).collect()
}

#[test]
fn first_step_extends_only_beam_zero() {
    let mut bs = BeamSearch::new(config(3, 1, 6, &[], 5)).unwrap();
    // Beams 1 and 2 have better logits, but only beam 0 is live.
    let mut logits = ln(&[0.1, 0.3, 0.2, 0.25, 0.1, 0.05]);
    logits.extend(ln(&[0.9, 0.02, 0.02, 0.02, 0.02, 0.02]));
    logits.extend(ln(&[0.9, 0.02, 0.02, 0.02, 0.02, 0.02]));
    let next = bs.step(&logits, 6).unwrap();
    assert_eq!(next, vec![(0, 1), (0, 3), (0, 2)]);
}

#[test]
fn eos_finishes_a_hypothesis_and_the_next_best_runs_on() {
    // k = 2, EOS = 3: K = 4 candidates. EOS is beam 0's best token at step 0.
    let mut bs = BeamSearch::new(config(2, 2, 4, &[3], 3)).unwrap();
    let row = ln(&[0.2, 0.25, 0.05, 0.5]);
    let logits = [row.clone(), row.clone()].concat();
    let next = bs.step(&logits, 4).unwrap();
    assert_eq!(next, vec![(0, 1), (0, 0)]);
    let s = &bs.slots;
    let h = s[0].hyp.as_ref().expect("EOS finished the best candidate");
    assert_eq!(h.token_ids, vec![3]);
    assert!(h.finished_by_eos);
    let lse = (0.2f32 + 0.25 + 0.05 + 0.5).ln();
    assert!((h.score - (0.5f32.ln() - lse)).abs() < 1e-6);
    assert!(s[1].hyp.is_none());
    assert!(!bs.is_done());
}

#[test]
fn eos_outside_the_top_k_candidates_does_not_finish() {
    // k = 1: K = 2; EOS is the 2nd candidate (index 1 >= k), so it is not kept.
    let mut bs = BeamSearch::new(config(1, 1, 3, &[2], 4)).unwrap();
    let next = bs.step(&ln(&[0.6, 0.1, 0.3]), 3).unwrap();
    assert_eq!(next, vec![(0, 0)]);
    assert!(bs.slots[0].hyp.is_none());
}

#[test]
fn length_penalty_divides_by_generated_length_including_eos() {
    let mut cfg = config(1, 1, 3, &[2], 5);
    cfg.length_penalty = 2.0;
    let mut bs = BeamSearch::new(cfg).unwrap();
    let row = ln(&[0.7, 0.1, 0.2]);
    bs.step(&row, 3).unwrap(); // token 0
    let row = ln(&[0.1, 0.1, 0.8]);
    bs.step(&row, 3).unwrap(); // EOS is best: finishes at length 2
    let h = bs.slots[0].hyp.as_ref().unwrap();
    assert_eq!(h.token_ids, vec![0, 2]);
    let expected = (0.7f32.ln() + 0.8f32.ln()) / 4.0;
    assert!(
        (h.score - expected).abs() < 1e-5,
        "{} vs {expected}",
        h.score
    );
}

#[test]
fn early_stopping_true_stops_when_every_slot_is_finished() {
    let mut cfg = config(2, 2, 4, &[3], 10);
    cfg.early_stopping = EarlyStopping::WhenFull;
    let mut bs = BeamSearch::new(cfg).unwrap();
    let eosy = ln(&[0.1, 0.2, 0.1, 0.6]);
    let logits = [eosy.clone(), eosy.clone()].concat();
    bs.step(&logits, 4).unwrap(); // one finished (only beam 0 was live)
    assert!(!bs.is_done());
    bs.step(&logits, 4).unwrap(); // two more finish: the 2 slots are full
    assert!(bs.is_done());
    let hyps = bs.finalize().unwrap();
    assert_eq!(hyps.len(), 2);
    assert!(hyps.iter().all(|h| h.finished_by_eos));
    assert_eq!(hyps[0].token_ids, vec![3]);
}

#[test]
fn max_new_tokens_ends_the_search() {
    let mut bs = BeamSearch::new(config(2, 2, 5, &[], 2)).unwrap();
    let row = ln(&[0.1, 0.2, 0.3, 0.15, 0.25]);
    let logits = [row.clone(), row.clone()].concat();
    bs.step(&logits, 5).unwrap();
    assert!(!bs.is_done());
    bs.step(&logits, 5).unwrap();
    assert!(bs.is_done());
    let hyps = bs.finalize().unwrap();
    assert_eq!(hyps[0].token_ids, vec![2, 2]);
    assert_eq!(hyps[1].token_ids, vec![2, 4]);
    assert!(bs.step(&logits, 5).is_err());
}

#[test]
fn padding_columns_are_never_read() {
    let mut bs = BeamSearch::new(config(2, 1, 3, &[], 4)).unwrap();
    let logits = [0.0, 1.0, 0.5, 99.0, 99.0, 0.0, 1.0, 0.5, 99.0, 99.0];
    let next = bs.step(&logits, 5).unwrap();
    assert_eq!(next, vec![(0, 1), (0, 2)]);
}

#[test]
fn validation_names_the_parameter() {
    type Edit = (&'static str, fn(&mut BeamConfig));
    let bad: [Edit; 7] = [
        ("num_beams", |c| c.num_beams = 0),
        ("num_return", |c| c.num_return = 0),
        ("num_return", |c| c.num_return = 5),
        ("max_new_tokens", |c| c.max_new_tokens = 0),
        ("length_penalty", |c| c.length_penalty = f64::INFINITY),
        ("vocab_size", |c| c.vocab_size = 1),
        ("eos_token_ids", |c| c.eos_token_ids = vec![10]),
    ];
    for (name, edit) in bad {
        let mut cfg = config(4, 2, 10, &[2], 4);
        edit(&mut cfg);
        let err = BeamSearch::new(cfg).unwrap_err().to_string();
        assert!(err.contains(&format!("`{name}`")), "{err}");
    }
    let mut bs = BeamSearch::new(config(2, 1, 10, &[2], 4)).unwrap();
    assert!(bs.finalize().is_err());
    assert!(bs.step(&[0.0; 19], 10).is_err());
}

// ---- dense reference --------------------------------------------------------------------------

/// A reference slot: score, and the finished hypothesis (tokens, ended by EOS) if any.
type RefSlot = (f32, Option<(Vec<TokenId>, bool)>);

/// transformers' `_beam_search`, batch size 1, over dense rows.
struct Reference {
    cfg: BeamConfig,
    running: Vec<(Vec<TokenId>, f32)>,
    slots: Vec<RefSlot>,
    may_improve: bool,
    t: usize,
    done: bool,
}

impl Reference {
    fn new(cfg: BeamConfig) -> Self {
        let k = cfg.num_beams;
        Self {
            running: (0..k)
                .map(|b| (vec![], if b == 0 { 0.0 } else { -1e9 }))
                .collect(),
            slots: vec![(-1e9, None); k],
            may_improve: true,
            t: 0,
            done: false,
            cfg,
        }
    }

    /// The processed log-probabilities of one row, densely, in transformers' order.
    fn process(&self, raw: &[f32], hist: &[TokenId]) -> Vec<f32> {
        let (_, lse) = RowView::new(raw, &mut RowBuffers::default(), &mut TopN::new(0));
        let ln_sum = lse.ln_sum as f32;
        let mut lp: Vec<f32> = raw.iter().map(|&x| (x - lse.max) - ln_sum).collect();
        let Some(p) = self.cfg.params.as_deref() else {
            return lp;
        };
        for &(t, b) in p.logit_bias() {
            lp[t as usize] += b;
        }
        if p.config().ignore_eos || (self.t as i64) < p.config().min_tokens {
            for &e in &self.cfg.eos_token_ids {
                lp[e as usize] = f32::NEG_INFINITY;
            }
        }
        if let Some(pen) = p.repetition_penalty() {
            let mut seen: Vec<TokenId> = self.cfg.prompt_token_ids.clone();
            seen.extend_from_slice(hist);
            seen.sort_unstable();
            seen.dedup();
            for t in seen {
                let x = lp[t as usize];
                lp[t as usize] = if x < 0.0 { x * pen } else { x / pen };
            }
        }
        if let Some((f, pr)) = p.frequency_presence() {
            let mut counts = vec![0u32; raw.len()];
            for &t in hist {
                counts[t as usize] += 1;
            }
            for (t, &n) in counts.iter().enumerate() {
                if n > 0 {
                    lp[t] = lp[t] - n as f32 * f - pr;
                }
            }
        }
        lp
    }

    fn step(&mut self, logits: &[f32]) -> Vec<(usize, TokenId)> {
        let (k, v) = (self.cfg.num_beams, self.cfg.vocab_size);
        let n_eos = self.cfg.eos_token_ids.len();
        let keep = 2.max(1 + n_eos) * k;
        let mut flat = Vec::with_capacity(k * v);
        for b in 0..k {
            let lp = self.process(&logits[b * v..(b + 1) * v], &self.running[b].0);
            flat.extend(lp.iter().map(|&x| x + self.running[b].1));
        }
        let mut idx: Vec<usize> = (0..k * v).collect();
        idx.sort_by(|&a, &b| better((flat[a], a), (flat[b], b)));
        idx.truncate(keep);
        let seqs: Vec<Vec<TokenId>> = idx
            .iter()
            .map(|&i| {
                let mut s = self.running[i / v].0.clone();
                s.push((i % v) as TokenId);
                s
            })
            .collect();
        let scores: Vec<f32> = idx.iter().map(|&i| flat[i]).collect();
        let is_eos = |t: TokenId| self.cfg.eos_token_ids.contains(&t);
        let hits: Vec<bool> = seqs
            .iter()
            .map(|s| is_eos(*s.last().unwrap()) || self.t + 1 >= self.cfg.max_new_tokens)
            .collect();
        let masked: Vec<f32> = (0..keep)
            .map(|i| scores[i] + if hits[i] { -1e9 } else { 0.0 })
            .collect();
        let mut order: Vec<usize> = (0..keep).collect();
        order.sort_by(|&a, &b| better((masked[a], a), (masked[b], b)));
        order.truncate(k);
        let div = ((self.t + 1) as f64).powf(self.cfg.length_penalty) as f32;
        let full = self.cfg.early_stopping == EarlyStopping::WhenFull
            && self.slots.iter().all(|s| s.1.is_some());
        let mut merged: Vec<RefSlot> = self.slots.clone();
        for i in 0..keep {
            let fin = hits[i] && i < k;
            let mut s = scores[i] / div;
            s += if full { -1e9 } else { 0.0 };
            s += if self.may_improve { 0.0 } else { -1e9 };
            s += if fin { 0.0 } else { -1e9 };
            let last = *seqs[i].last().unwrap();
            merged.push((s, fin.then(|| (seqs[i].clone(), is_eos(last)))));
        }
        let mut mi: Vec<usize> = (0..merged.len()).collect();
        mi.sort_by(|&a, &b| better((merged[a].0, a), (merged[b].0, b)));
        self.slots = mi[..k].iter().map(|&j| merged[j].clone()).collect();
        let next = order
            .iter()
            .map(|&i| (idx[i] / v, (idx[i] % v) as TokenId))
            .collect();
        self.running = order
            .iter()
            .map(|&i| (seqs[i].clone(), masked[i]))
            .collect();
        self.t += 1;
        let l = if self.cfg.early_stopping == EarlyStopping::Never && self.cfg.length_penalty > 0.0
        {
            self.cfg.max_new_tokens
        } else {
            self.t
        };
        let best = self.running[0].1 / (l as f64).powf(self.cfg.length_penalty) as f32;
        let worst = self.slots.iter().map(|s| s.0).fold(f32::INFINITY, f32::min);
        self.may_improve &= self
            .slots
            .iter()
            .any(|s| best > if s.1.is_some() { worst } else { -1e9 });
        let all_fin = self.slots.iter().all(|s| s.1.is_some());
        // transformers: stop unless (improvement possible & open beam & valid continuations).
        let go_on = self.may_improve
            && !(all_fin && self.cfg.early_stopping == EarlyStopping::WhenFull)
            && !hits.iter().all(|&h| h);
        self.done = !go_on;
        next
    }
}

/// A row of logits that depends only on the beam's history (so both implementations see the
/// same rows whatever order they keep their beams in), peaked enough for EOS to win sometimes.
fn row_for(seed: u64, hist: &[TokenId], v: usize) -> Vec<f32> {
    let mut h = seed ^ 0x9e37_79b9_7f4a_7c15;
    for &t in hist {
        h = (h ^ u64::from(t)).wrapping_mul(0x1000_0000_01b3);
    }
    let mut rng = crate::sampling::Rng::seed_from_u64(h);
    (0..v)
        .map(|_| (rng.next_f64() as f32 - 0.5) * 8.0)
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn matches_the_dense_reference(
        seed in any::<u64>(),
        k in 1usize..6,
        // Small rows take every token; large ones skip the chunks below the K-th chunk maximum.
        v in prop_oneof![8usize..200, 1000usize..5000],
        n_eos in 0usize..3,
        m in 1usize..8,
        lp in prop::sample::select(vec![-0.5, 0.0, 0.5, 1.0, 2.0]),
        es in prop::sample::select(vec![
            EarlyStopping::WhenFull, EarlyStopping::Heuristic, EarlyStopping::Never,
        ]),
        with_params in any::<bool>(),
        n_ret in 1usize..6,
    ) {
        let eos: Vec<TokenId> = (0..n_eos as TokenId).map(|i| i * 3 + 1).collect();
        let params = with_params.then(|| {
            Arc::new(
                SamplingParams::new(SamplingConfig {
                    repetition_penalty: 1.4,
                    frequency_penalty: 0.5,
                    presence_penalty: 0.25,
                    logit_bias: vec![(0, 2.0), (5, -1.5)],
                    min_tokens: 1,
                    eos_token_ids: eos.iter().map(|&t| i64::from(t)).collect(),
                    ..SamplingConfig::default()
                })
                .unwrap(),
            )
        });
        let cfg = BeamConfig {
            num_beams: k,
            num_return: n_ret.min(k),
            length_penalty: lp,
            early_stopping: es,
            eos_token_ids: eos.clone(),
            max_new_tokens: m,
            vocab_size: v,
            params,
            prompt_token_ids: vec![3, 6, 6, 7],
            guide: None,
            top_logprobs: 0,
        };
        let mut ours = BeamSearch::new(cfg.clone()).unwrap();
        let mut reference = Reference::new(cfg);
        while !ours.is_done() {
            let logits: Vec<f32> = ours
                .beams
                .iter()
                .flat_map(|b| row_for(seed, &b.tokens, v))
                .collect();
            let a = ours.step(&logits, v).unwrap();
            let b = reference.step(&logits);
            prop_assert_eq!(a, b);
            prop_assert_eq!(ours.is_done(), reference.done);
        }
        let hyps: Vec<(Vec<TokenId>, f32, bool)> = ours
            .finalize()
            .unwrap()
            .into_iter()
            .map(|h| (h.token_ids, h.score, h.finished_by_eos))
            .collect();
        let expected: Vec<(Vec<TokenId>, f32, bool)> = reference.slots[..ours.cfg.num_return]
            .iter()
            .map(|(score, h)| {
                let (token_ids, finished_by_eos) = h.clone().expect("done: every slot finished");
                (token_ids, *score, finished_by_eos)
            })
            .collect();
        prop_assert_eq!(hyps, expected);
    }
}

/// Runs a search to the end on the deterministic rows of [`row_for`].
fn run_to_end(bs: &mut BeamSearch, seed: u64) -> Vec<Hypothesis> {
    let v = bs.cfg.vocab_size;
    while !bs.is_done() {
        let logits: Vec<f32> = bs
            .beams
            .iter()
            .flat_map(|b| row_for(seed, &b.tokens, v))
            .collect();
        bs.step(&logits, v).unwrap();
    }
    bs.finalize().unwrap()
}

fn guided_config(spec: &crate::guide::GuideSpec, k: usize, m: usize) -> BeamConfig {
    let vocab = crate::guide::tests::toy_vocab();
    let v = crate::guide::tests::toy_tokens().len();
    let mut cfg = config(k, k, v, &[2], m);
    cfg.guide = Some(vocab.compile(spec).unwrap());
    cfg
}

fn text_of(h: &Hypothesis) -> Vec<u8> {
    let tokens = crate::guide::tests::toy_tokens();
    let body = if h.finished_by_eos {
        &h.token_ids[..h.token_ids.len() - 1]
    } else {
        &h.token_ids[..]
    };
    body.iter()
        .flat_map(|&t| tokens[t as usize].clone())
        .collect()
}

#[test]
fn guided_beams_return_only_choices() {
    let choices = ["abc", "ab", "yes", "no", "true"];
    let spec = crate::guide::GuideSpec::Choice(choices.iter().map(|c| c.to_string()).collect());
    for seed in 0..20 {
        let mut bs = BeamSearch::new(guided_config(&spec, 4, 10)).unwrap();
        let hyps = run_to_end(&mut bs, seed);
        assert_eq!(hyps.len(), 4);
        for h in &hyps {
            assert!(h.finished_by_eos, "seed {seed}: {h:?} did not end with EOS");
            let text = String::from_utf8(text_of(h)).unwrap();
            assert!(
                choices.contains(&text.as_str()),
                "seed {seed}: {text:?} is not a choice"
            );
        }
    }
}

#[test]
fn guided_beams_follow_a_regex_and_stop_at_the_length_limit() {
    let spec = crate::guide::GuideSpec::Regex("[ab]+c?".to_string());
    for seed in 0..20 {
        let mut bs = BeamSearch::new(guided_config(&spec, 3, 6)).unwrap();
        for h in run_to_end(&mut bs, seed) {
            let text = String::from_utf8(text_of(&h)).unwrap();
            let ok = !text.is_empty()
                && text
                    .trim_end_matches('c')
                    .chars()
                    .all(|c| c == 'a' || c == 'b')
                && text.matches('c').count() <= 1;
            assert!(ok, "seed {seed}: {text:?} does not match [ab]+c?");
            assert!(h.finished_by_eos || h.token_ids.len() == 6);
        }
    }
}

#[test]
fn a_guide_larger_than_the_vocabulary_is_refused() {
    let spec = crate::guide::GuideSpec::Regex("a".to_string());
    let mut cfg = guided_config(&spec, 2, 4);
    cfg.vocab_size = 100;
    let err = BeamSearch::new(cfg).unwrap_err();
    assert!(err.to_string().contains("guide"), "{err}");
}

#[test]
fn logprobs_are_the_raw_log_softmax_of_each_step() {
    let v = 50;
    let mut cfg = config(3, 3, v, &[1], 7);
    cfg.top_logprobs = 2;
    let mut bs = BeamSearch::new(cfg).unwrap();
    let hyps = run_to_end(&mut bs, 7);
    for h in hyps {
        assert_eq!(h.logprobs.len(), h.token_ids.len());
        assert_eq!(h.top_logprobs.len(), h.token_ids.len());
        for (i, &t) in h.token_ids.iter().enumerate() {
            let row = row_for(7, &h.token_ids[..i], v);
            let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let ln_sum = row
                .iter()
                .map(|&x| f64::from(x - m).exp())
                .sum::<f64>()
                .ln();
            let lp = |x: f32| (f64::from(x - m) - ln_sum) as f32;
            assert!((h.logprobs[i] - lp(row[t as usize])).abs() < 1e-5);
            let mut order: Vec<usize> = (0..v).collect();
            order.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
            let want: Vec<(TokenId, f32)> = order[..2]
                .iter()
                .map(|&j| (j as TokenId, lp(row[j])))
                .collect();
            assert_eq!(h.top_logprobs[i].len(), 2);
            for (got, want) in h.top_logprobs[i].iter().zip(&want) {
                assert_eq!(got.0, want.0);
                assert!((got.1 - want.1).abs() < 1e-5);
            }
        }
    }
}

#[test]
fn a_stop_from_the_caller_finishes_a_candidate_like_eos() {
    let v = 20;
    let mut bs = BeamSearch::new(config(2, 2, v, &[], 10)).unwrap();
    let logits: Vec<f32> = (0..2).flat_map(|_| row_for(3, &[], v)).collect();
    let cands = bs.propose(&logits, v).unwrap();
    // Stop the best candidate: it becomes a finished hypothesis and leaves the running beams.
    let mut stops = vec![false; cands.len()];
    stops[0] = true;
    let next = bs.commit(Some(&stops)).unwrap();
    assert!(!next.contains(&cands[0]));
    assert_eq!(next, cands[1..3].to_vec());
    let slot = bs
        .slots
        .iter()
        .find_map(|s| s.hyp.clone())
        .expect("one finished hypothesis");
    assert_eq!(slot.token_ids, vec![cands[0].1]);
    assert!(!slot.finished_by_eos);
    // Commit needs a proposal, and one flag per candidate.
    assert!(bs.commit(None).is_err());
    let logits: Vec<f32> = bs
        .beams
        .iter()
        .flat_map(|b| row_for(3, &b.tokens, v))
        .collect();
    bs.propose(&logits, v).unwrap();
    assert!(bs.commit(Some(&[true])).is_err());
    assert!(bs.commit(None).is_ok());
}
