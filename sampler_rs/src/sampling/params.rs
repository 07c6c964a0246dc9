//! Per-request sampling parameters, validated once at construction.

use crate::error::{Result, SamplerError};

use super::TokenId;

/// Largest `top_logprobs` a request may ask for (OpenAI's bound).
pub const MAX_TOP_LOGPROBS: usize = 20;

/// Temperatures in `(0, MIN_TEMPERATURE)` are raised to it when scaling, so that `logit / temperature`
/// stays finite; `0` itself means greedy.
pub const MIN_TEMPERATURE: f32 = 1e-5;

/// One request's sampling settings. Build it with [`SamplingParams::new`] from a [`SamplingConfig`];
/// the fields are private so that everything inward can trust them.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    cfg: SamplingConfig,
    seed: u64,
    /// `logit_bias` sorted by token id.
    bias: Vec<(TokenId, f32)>,
}

/// The raw, unvalidated settings; every field's doc gives its range and its "off" value.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingConfig {
    /// Divides the logits; `>= 0`, finite. `0` = greedy (argmax), `1` = off.
    pub temperature: f64,
    /// Nucleus sampling: keep the smallest set of most likely tokens whose mass reaches `top_p`;
    /// in `(0, 1]`, `1` = off.
    pub top_p: f64,
    /// Keep the `top_k` highest scores (and ties with the k-th); `0` or `-1` = off.
    pub top_k: i64,
    /// Drop tokens whose probability is below `min_p` times the top probability; in `[0, 1]`, `0` = off.
    pub min_p: f64,
    /// The RNG seed; the bindings draw one from OS entropy when the request has none.
    pub seed: u64,
    /// How many alternatives to report per step, `0..=20`; the chosen token's logprob is always reported.
    pub top_logprobs: i64,
    /// transformers' repetition penalty over prompt + generated tokens; `> 0`, `1` = off.
    pub repetition_penalty: f64,
    /// OpenAI frequency penalty over generated tokens; in `[-2, 2]`, `0` = off.
    pub frequency_penalty: f64,
    /// OpenAI presence penalty over generated tokens; in `[-2, 2]`, `0` = off.
    pub presence_penalty: f64,
    /// Added to the logit of each listed token; values in `[-100, 100]`, empty = off.
    pub logit_bias: Vec<(i64, f64)>,
    /// EOS tokens are masked until this many tokens were generated; `>= 0`, `0` = off.
    pub min_tokens: i64,
    /// Mask the EOS tokens for the whole generation.
    pub ignore_eos: bool,
    /// The tokens that end a generation (masked by `min_tokens` / `ignore_eos`).
    pub eos_token_ids: Vec<i64>,
}

impl Default for SamplingConfig {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            seed: 0,
            top_logprobs: 0,
            repetition_penalty: 1.0,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            logit_bias: Vec::new(),
            min_tokens: 0,
            ignore_eos: false,
            eos_token_ids: Vec::new(),
        }
    }
}

fn invalid(parameter: &'static str, message: String) -> SamplerError {
    SamplerError::InvalidParameter { parameter, message }
}

fn check_range(parameter: &'static str, value: f64, lo: f64, hi: f64) -> Result<()> {
    if value.is_finite() && (lo..=hi).contains(&value) {
        Ok(())
    } else {
        Err(invalid(
            parameter,
            format!("must be in [{lo}, {hi}], got {value}"),
        ))
    }
}

fn token_id(parameter: &'static str, value: i64) -> Result<TokenId> {
    TokenId::try_from(value).map_err(|_| {
        invalid(
            parameter,
            format!("holds {value}, not a token id (0..2^32)"),
        )
    })
}

impl SamplingParams {
    /// Validates `cfg`; the error names the first bad parameter, its bound and the value received.
    pub fn new(cfg: SamplingConfig) -> Result<Self> {
        if !(cfg.temperature.is_finite() && cfg.temperature >= 0.0) {
            return Err(invalid(
                "temperature",
                format!("must be a finite number >= 0, got {}", cfg.temperature),
            ));
        }
        if !(cfg.top_p.is_finite() && cfg.top_p > 0.0 && cfg.top_p <= 1.0) {
            return Err(invalid(
                "top_p",
                format!("must be in (0, 1], got {}", cfg.top_p),
            ));
        }
        if cfg.top_k < -1 || cfg.top_k > i64::from(u32::MAX) {
            return Err(invalid(
                "top_k",
                format!("must be -1, 0 (off) or a positive count, got {}", cfg.top_k),
            ));
        }
        check_range("min_p", cfg.min_p, 0.0, 1.0)?;
        if !(0..=MAX_TOP_LOGPROBS as i64).contains(&cfg.top_logprobs) {
            return Err(invalid(
                "top_logprobs",
                format!(
                    "must be in [0, {MAX_TOP_LOGPROBS}], got {}",
                    cfg.top_logprobs
                ),
            ));
        }
        if !(cfg.repetition_penalty.is_finite() && cfg.repetition_penalty > 0.0) {
            return Err(invalid(
                "repetition_penalty",
                format!(
                    "must be a finite number > 0, got {}",
                    cfg.repetition_penalty
                ),
            ));
        }
        check_range("frequency_penalty", cfg.frequency_penalty, -2.0, 2.0)?;
        check_range("presence_penalty", cfg.presence_penalty, -2.0, 2.0)?;
        if cfg.min_tokens < 0 {
            return Err(invalid(
                "min_tokens",
                format!("must be >= 0, got {}", cfg.min_tokens),
            ));
        }
        let mut bias = Vec::with_capacity(cfg.logit_bias.len());
        for &(token, value) in &cfg.logit_bias {
            check_range("logit_bias", value, -100.0, 100.0)?;
            bias.push((token_id("logit_bias", token)?, value as f32));
        }
        bias.sort_by_key(|&(t, _)| t);
        bias.dedup_by_key(|&mut (t, _)| t);
        for &token in &cfg.eos_token_ids {
            token_id("eos_token_ids", token)?;
        }
        Ok(Self {
            seed: cfg.seed,
            bias,
            cfg,
        })
    }

    /// The settings as given.
    pub fn config(&self) -> &SamplingConfig {
        &self.cfg
    }

    /// The RNG seed.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// Whether the row is decoded greedily (`temperature == 0`).
    pub fn is_greedy(&self) -> bool {
        self.cfg.temperature == 0.0
    }

    /// The temperature used for scaling, as `f32` (what torch divides a float32 tensor by),
    /// raised to [`MIN_TEMPERATURE`].
    pub fn temperature(&self) -> f32 {
        (self.cfg.temperature as f32).max(MIN_TEMPERATURE)
    }

    /// `top_k` as a count, `None` when off.
    pub fn top_k(&self) -> Option<usize> {
        (self.cfg.top_k > 0).then_some(self.cfg.top_k as usize)
    }

    /// `top_p`, `None` when off.
    pub fn top_p(&self) -> Option<f64> {
        (self.cfg.top_p < 1.0).then_some(self.cfg.top_p)
    }

    /// `min_p`, `None` when off.
    pub fn min_p(&self) -> Option<f64> {
        (self.cfg.min_p > 0.0).then_some(self.cfg.min_p)
    }

    /// The number of alternatives to report.
    pub fn top_logprobs(&self) -> usize {
        self.cfg.top_logprobs as usize
    }

    /// The repetition penalty, `None` when off.
    pub fn repetition_penalty(&self) -> Option<f32> {
        (self.cfg.repetition_penalty != 1.0).then_some(self.cfg.repetition_penalty as f32)
    }

    /// `(frequency, presence)` penalties, `None` when both are off.
    pub fn frequency_presence(&self) -> Option<(f32, f32)> {
        (self.cfg.frequency_penalty != 0.0 || self.cfg.presence_penalty != 0.0).then_some((
            self.cfg.frequency_penalty as f32,
            self.cfg.presence_penalty as f32,
        ))
    }

    /// `logit_bias`, sorted by token id (the first value wins for a repeated id).
    pub fn logit_bias(&self) -> &[(TokenId, f32)] {
        &self.bias
    }

    /// The EOS token ids.
    pub fn eos_token_ids(&self) -> impl Iterator<Item = TokenId> + '_ {
        self.cfg.eos_token_ids.iter().map(|&t| t as TokenId)
    }

    /// Whether EOS is masked after `generated` tokens.
    pub fn masks_eos(&self, generated: usize) -> bool {
        !self.cfg.eos_token_ids.is_empty()
            && (self.cfg.ignore_eos || (generated as i64) < self.cfg.min_tokens)
    }

    /// Every token id the params mention must fit `vocab_size`.
    pub fn check_vocab(&self, vocab_size: usize) -> Result<()> {
        let bias = self.bias.iter().map(|&(t, _)| ("logit_bias", t));
        let eos = self.eos_token_ids().map(|t| ("eos_token_ids", t));
        for (parameter, token) in bias.chain(eos) {
            if token as usize >= vocab_size {
                return Err(SamplerError::TokenOutOfRange {
                    parameter,
                    token,
                    vocab_size,
                });
            }
        }
        Ok(())
    }
}
