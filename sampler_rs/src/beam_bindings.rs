//! The beam-search classes of the `sampler_rs` module: `BeamSearch` and `BeamHypothesis`, thin
//! wrappers over [`crate::beam`] (steps release the GIL; bad arguments raise `ValueError`).

use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyString};

use crate::beam::{BeamConfig, BeamSearch, EarlyStopping, Hypothesis};
use crate::bindings::{detached, token_ids, with_logits, PySamplingParams};
use crate::guide_bindings::PyGuide;
use crate::sampling::TokenId;
use crate::SamplerError;

fn value_error(e: SamplerError) -> PyErr {
    PyValueError::new_err(e.to_string())
}

fn count(parameter: &str, v: i64) -> PyResult<usize> {
    usize::try_from(v)
        .map_err(|_| PyValueError::new_err(format!("`{parameter}` must be >= 1, got {v}")))
}

/// `True`, `False` or `"never"`, as transformers' `early_stopping`.
fn early_stopping(v: &Bound<'_, PyAny>) -> PyResult<EarlyStopping> {
    if let Ok(b) = v.cast::<PyBool>() {
        return Ok(if b.is_true() {
            EarlyStopping::WhenFull
        } else {
            EarlyStopping::Heuristic
        });
    }
    if let Ok(s) = v.cast::<PyString>() {
        if s.to_str()? == "never" {
            return Ok(EarlyStopping::Never);
        }
    }
    Err(PyValueError::new_err(format!(
        "`early_stopping` must be True, False or \"never\", got {}",
        v.repr()?
    )))
}

/// One returned hypothesis.
#[pyclass(name = "BeamHypothesis", module = "sampler_rs", frozen, get_all)]
struct PyBeamHypothesis {
    token_ids: Vec<TokenId>,
    score: f64,
    finished_by_eos: bool,
    /// The raw log-probability of each token.
    logprobs: Vec<f64>,
    /// Per token, the best `top_logprobs` raw `(token, log-probability)` alternatives.
    top_logprobs: Vec<Vec<(TokenId, f64)>>,
}

impl From<Hypothesis> for PyBeamHypothesis {
    fn from(h: Hypothesis) -> Self {
        Self {
            token_ids: h.token_ids,
            score: f64::from(h.score),
            finished_by_eos: h.finished_by_eos,
            logprobs: h.logprobs.into_iter().map(f64::from).collect(),
            top_logprobs: h
                .top_logprobs
                .into_iter()
                .map(|row| row.into_iter().map(|(t, lp)| (t, f64::from(lp))).collect())
                .collect(),
        }
    }
}

#[pymethods]
impl PyBeamHypothesis {
    fn __repr__(&self) -> String {
        format!(
            "BeamHypothesis(token_ids={:?}, score={}, finished_by_eos={})",
            self.token_ids,
            self.score,
            if self.finished_by_eos {
                "True"
            } else {
                "False"
            }
        )
    }
}

/// One beam search (batch size 1): per step, the next beams' parents and tokens.
#[pyclass(name = "BeamSearch", module = "sampler_rs")]
struct PyBeamSearch {
    inner: BeamSearch,
}

#[pymethods]
impl PyBeamSearch {
    #[new]
    #[pyo3(signature = (
        *, num_beams, num_return, length_penalty=1.0, early_stopping=None, eos_token_ids,
        max_new_tokens, vocab_size, params=None, prompt_token_ids=None, guide=None, top_logprobs=0,
    ))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        num_beams: i64,
        num_return: i64,
        length_penalty: f64,
        early_stopping: Option<&Bound<'_, PyAny>>,
        eos_token_ids: Vec<i64>,
        max_new_tokens: i64,
        vocab_size: i64,
        params: Option<&Bound<'_, PySamplingParams>>,
        prompt_token_ids: Option<Vec<i64>>,
        guide: Option<&Bound<'_, PyGuide>>,
        top_logprobs: i64,
    ) -> PyResult<Self> {
        let early_stopping = match early_stopping {
            Some(v) => self::early_stopping(v)?,
            None => EarlyStopping::Heuristic,
        };
        let cfg = BeamConfig {
            num_beams: count("num_beams", num_beams)?,
            num_return: count("num_return", num_return)?,
            length_penalty,
            early_stopping,
            eos_token_ids: token_ids("eos_token_ids", &eos_token_ids)?,
            max_new_tokens: count("max_new_tokens", max_new_tokens)?,
            vocab_size: count("vocab_size", vocab_size)?,
            params: params.map(|p| p.get().inner.clone()),
            prompt_token_ids: token_ids("prompt_token_ids", &prompt_token_ids.unwrap_or_default())?,
            guide: guide.map(|g| g.get().inner.clone()),
            top_logprobs: usize::try_from(top_logprobs).map_err(|_| {
                PyValueError::new_err(format!("`top_logprobs` must be >= 0, got {top_logprobs}"))
            })?,
        };
        let inner = BeamSearch::new(cfg).map_err(value_error)?;
        Ok(Self { inner })
    }

    /// Steps taken so far.
    #[getter]
    fn steps(&self) -> usize {
        self.inner.steps()
    }

    /// A whole step: the next beams' parents and tokens.
    fn step(
        &mut self,
        py: Python<'_>,
        logits: &Bound<'_, PyAny>,
    ) -> PyResult<(Vec<usize>, Vec<TokenId>)> {
        run_step(&mut self.inner, py, "step", logits, |b, values, width| {
            b.step(values, width)
        })
    }

    /// The first half of a step: the candidates' beams and tokens, best first; `commit` follows.
    fn propose(
        &mut self,
        py: Python<'_>,
        logits: &Bound<'_, PyAny>,
    ) -> PyResult<(Vec<usize>, Vec<TokenId>)> {
        run_step(
            &mut self.inner,
            py,
            "propose",
            logits,
            |b, values, width| b.propose(values, width),
        )
    }

    /// The second half: `stops[i]` ends candidate `i` (a stop string) like an EOS; returns
    /// the next beams' parents and tokens.
    #[pyo3(signature = (stops=None))]
    fn commit(
        &mut self,
        py: Python<'_>,
        stops: Option<Vec<bool>>,
    ) -> PyResult<(Vec<usize>, Vec<TokenId>)> {
        let inner = &mut self.inner;
        let next = detached(py, || inner.commit(stops.as_deref()))?.map_err(value_error)?;
        Ok(next.into_iter().unzip())
    }

    fn is_done(&self) -> bool {
        self.inner.is_done()
    }

    fn finalize(&self) -> PyResult<Vec<PyBeamHypothesis>> {
        let hyps = self.inner.finalize().map_err(value_error)?;
        Ok(hyps.into_iter().map(PyBeamHypothesis::from).collect())
    }

    fn __repr__(&self) -> String {
        let c = self.inner.config();
        format!(
            "BeamSearch(num_beams={}, num_return={}, length_penalty={:?}, early_stopping={}, \
             max_new_tokens={}, steps={}, done={})",
            c.num_beams,
            c.num_return,
            c.length_penalty,
            match c.early_stopping {
                EarlyStopping::WhenFull => "True",
                EarlyStopping::Heuristic => "False",
                EarlyStopping::Never => "'never'",
            },
            c.max_new_tokens,
            self.inner.steps(),
            if self.inner.is_done() {
                "True"
            } else {
                "False"
            }
        )
    }
}

/// A step or its first half on the GIL-free side, after the shape checks.
fn run_step(
    inner: &mut BeamSearch,
    py: Python<'_>,
    what: &str,
    logits: &Bound<'_, PyAny>,
    f: impl FnOnce(&mut BeamSearch, &[f32], usize) -> crate::error::Result<Vec<(usize, TokenId)>> + Send,
) -> PyResult<(Vec<usize>, Vec<TokenId>)> {
    if inner.is_done() {
        return Err(PyRuntimeError::new_err(format!(
            "BeamSearch.{what}() after the search is done (is_done() is true)"
        )));
    }
    let k = inner.config().num_beams;
    with_logits(logits, |values, rows, width| {
        if rows != k {
            return Err(PyValueError::new_err(format!(
                "`logits` has {rows} rows for num_beams = {k}"
            )));
        }
        let next = detached(py, || f(inner, values, width))?.map_err(value_error)?;
        Ok(next.into_iter().unzip())
    })
}

/// Adds the beam-search classes to the module.
pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyBeamSearch>()?;
    m.add_class::<PyBeamHypothesis>()?;
    Ok(())
}
