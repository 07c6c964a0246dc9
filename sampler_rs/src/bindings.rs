//! The `sampler_rs` Python module: thin PyO3 wrappers over [`crate::sampling`] that check
//! arguments, release the GIL for the work, and turn errors and panics into Python exceptions.

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use numpy::ndarray::Array2;
use numpy::{IntoPyArray, PyArray2, PyArrayMethods, PyUntypedArray, PyUntypedArrayMethods};
use pyo3::exceptions::{PyKeyError, PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use rayon::prelude::*;

use crate::guide_bindings::PyGuide;
use crate::sampling::{self, SamplingConfig, SamplingParams, SeqId, StepOutput, TokenId};
use crate::SamplerError;

fn value_error(e: SamplerError) -> PyErr {
    match e {
        SamplerError::Guide { .. } => PyRuntimeError::new_err(e.to_string()),
        _ => PyValueError::new_err(e.to_string()),
    }
}

/// Runs `f` with the GIL released; a panic becomes `RuntimeError` instead of aborting.
pub(crate) fn detached<T: Send>(py: Python<'_>, f: impl FnOnce() -> T + Send) -> PyResult<T> {
    py.detach(|| catch_unwind(AssertUnwindSafe(f)))
        .map_err(|panic| {
            let msg = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".to_string());
            PyRuntimeError::new_err(format!("sampler_rs panicked: {msg}"))
        })
}

/// Borrows a C-contiguous 2-D float32 numpy array as `(values, rows, columns)` without copying.
pub(crate) fn with_logits<T>(
    logits: &Bound<'_, PyAny>,
    f: impl FnOnce(&[f32], usize, usize) -> PyResult<T>,
) -> PyResult<T> {
    let Ok(arr) = logits.cast::<PyArray2<f32>>() else {
        let what = match logits.cast::<PyUntypedArray>() {
            Ok(a) => format!("a {}-D {} array", a.ndim(), a.dtype().str()?),
            Err(_) => format!("a {}", logits.get_type().name()?),
        };
        return Err(PyValueError::new_err(format!(
            "`logits` must be a 2-D float32 numpy array, got {what}"
        )));
    };
    let ro = arr
        .try_readonly()
        .map_err(|e| PyValueError::new_err(format!("`logits` cannot be borrowed: {e}")))?;
    let (rows, cols) = (arr.shape()[0], arr.shape()[1]);
    // `as_slice` also accepts Fortran order, which would be read transposed.
    let values = ro
        .as_slice()
        .ok()
        .filter(|_| arr.is_c_contiguous())
        .ok_or_else(|| PyValueError::new_err("`logits` must be C-contiguous"))?;
    f(values, rows, cols)
}

pub(crate) fn token_ids(parameter: &str, ids: &[i64]) -> PyResult<Vec<TokenId>> {
    ids.iter()
        .map(|&t| {
            TokenId::try_from(t).map_err(|_| {
                PyValueError::new_err(format!("`{parameter}` holds {t}, not a token id"))
            })
        })
        .collect()
}

/// One request's sampling settings, validated at construction; immutable.
#[pyclass(name = "SamplingParams", module = "sampler_rs", frozen)]
pub(crate) struct PySamplingParams {
    pub(crate) inner: Arc<SamplingParams>,
}

#[pymethods]
impl PySamplingParams {
    #[new]
    #[pyo3(signature = (
        *, temperature=1.0, top_p=1.0, top_k=0, min_p=0.0, seed=None, top_logprobs=0,
        repetition_penalty=1.0, frequency_penalty=0.0, presence_penalty=0.0, logit_bias=None,
        min_tokens=0, ignore_eos=false, eos_token_ids=None,
    ))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        temperature: f64,
        top_p: f64,
        top_k: i64,
        min_p: f64,
        seed: Option<&Bound<'_, PyAny>>,
        top_logprobs: i64,
        repetition_penalty: f64,
        frequency_penalty: f64,
        presence_penalty: f64,
        logit_bias: Option<HashMap<i64, f64>>,
        min_tokens: i64,
        ignore_eos: bool,
        eos_token_ids: Option<Vec<i64>>,
    ) -> PyResult<Self> {
        let seed = match seed {
            Some(s) => s.extract::<u64>().map_err(|_| {
                PyValueError::new_err(format!("`seed` must be an integer in [0, 2^64), got {s}"))
            })?,
            None => getrandom::u64().map_err(|e| {
                PyRuntimeError::new_err(format!("cannot draw a seed from the OS: {e}"))
            })?,
        };
        let mut logit_bias: Vec<(i64, f64)> = logit_bias.unwrap_or_default().into_iter().collect();
        logit_bias.sort_unstable_by_key(|&(t, _)| t);
        let cfg = SamplingConfig {
            temperature,
            top_p,
            top_k,
            min_p,
            seed,
            top_logprobs,
            repetition_penalty,
            frequency_penalty,
            presence_penalty,
            logit_bias,
            min_tokens,
            ignore_eos,
            eos_token_ids: eos_token_ids.unwrap_or_default(),
        };
        let inner = SamplingParams::new(cfg).map_err(value_error)?;
        Ok(Self {
            inner: Arc::new(inner),
        })
    }

    #[getter]
    fn temperature(&self) -> f64 {
        self.inner.config().temperature
    }
    #[getter]
    fn top_p(&self) -> f64 {
        self.inner.config().top_p
    }
    #[getter]
    fn top_k(&self) -> i64 {
        self.inner.config().top_k
    }
    #[getter]
    fn min_p(&self) -> f64 {
        self.inner.config().min_p
    }
    #[getter]
    fn seed(&self) -> u64 {
        self.inner.seed()
    }
    #[getter]
    fn top_logprobs(&self) -> i64 {
        self.inner.config().top_logprobs
    }
    #[getter]
    fn repetition_penalty(&self) -> f64 {
        self.inner.config().repetition_penalty
    }
    #[getter]
    fn frequency_penalty(&self) -> f64 {
        self.inner.config().frequency_penalty
    }
    #[getter]
    fn presence_penalty(&self) -> f64 {
        self.inner.config().presence_penalty
    }
    #[getter]
    fn logit_bias(&self) -> HashMap<i64, f64> {
        self.inner.config().logit_bias.iter().copied().collect()
    }
    #[getter]
    fn min_tokens(&self) -> i64 {
        self.inner.config().min_tokens
    }
    #[getter]
    fn ignore_eos(&self) -> bool {
        self.inner.config().ignore_eos
    }
    #[getter]
    fn eos_token_ids(&self) -> Vec<i64> {
        self.inner.config().eos_token_ids.clone()
    }

    fn __repr__(&self) -> String {
        let c = self.inner.config();
        format!(
            "SamplingParams(temperature={:?}, top_p={:?}, top_k={}, min_p={:?}, seed={}, \
             top_logprobs={}, repetition_penalty={:?}, frequency_penalty={:?}, presence_penalty={:?}, \
             logit_bias={:?}, min_tokens={}, ignore_eos={}, eos_token_ids={:?})",
            c.temperature,
            c.top_p,
            c.top_k,
            c.min_p,
            c.seed,
            c.top_logprobs,
            c.repetition_penalty,
            c.frequency_penalty,
            c.presence_penalty,
            c.logit_bias.iter().copied().collect::<HashMap<_, _>>(),
            c.min_tokens,
            if c.ignore_eos { "True" } else { "False" },
            c.eos_token_ids,
        )
    }
}

/// What one step produced for one row.
#[pyclass(name = "StepOutput", module = "sampler_rs", frozen, get_all)]
struct PyStepOutput {
    token_id: TokenId,
    logprob: f64,
    top_logprobs: Vec<(TokenId, f64)>,
    guide_finished: bool,
}

impl From<StepOutput> for PyStepOutput {
    fn from(out: StepOutput) -> Self {
        Self {
            token_id: out.token_id,
            logprob: f64::from(out.logprob),
            top_logprobs: out
                .top_logprobs
                .into_iter()
                .map(|(t, lp)| (t, f64::from(lp)))
                .collect(),
            guide_finished: out.guide_finished,
        }
    }
}

#[pymethods]
impl PyStepOutput {
    fn __repr__(&self) -> String {
        format!(
            "StepOutput(token_id={}, logprob={}, top_logprobs={:?}, guide_finished={})",
            self.token_id,
            self.logprob,
            self.top_logprobs,
            if self.guide_finished { "True" } else { "False" }
        )
    }
}

/// Per-sequence sampling state and the per-step sampling call.
#[pyclass(name = "Sampler", module = "sampler_rs")]
struct PySampler {
    inner: sampling::Sampler,
}

#[pymethods]
impl PySampler {
    #[new]
    fn new(vocab_size: usize) -> PyResult<Self> {
        let inner = sampling::Sampler::new(vocab_size).map_err(value_error)?;
        Ok(Self { inner })
    }

    #[getter]
    fn vocab_size(&self) -> usize {
        self.inner.vocab_size()
    }

    #[pyo3(signature = (seq_id, params, prompt_token_ids, guide=None))]
    fn add_sequence(
        &mut self,
        seq_id: SeqId,
        params: &Bound<'_, PySamplingParams>,
        prompt_token_ids: Vec<i64>,
        guide: Option<&Bound<'_, PyGuide>>,
    ) -> PyResult<()> {
        let prompt = token_ids("prompt_token_ids", &prompt_token_ids)?;
        let params = params.get().inner.clone();
        let guide = guide.map(|g| &g.get().inner);
        self.inner
            .add_guided_sequence(seq_id, params, &prompt, guide)
            .map_err(value_error)
    }

    fn remove_sequence(&mut self, seq_id: SeqId) -> PyResult<()> {
        self.inner.remove_sequence(seq_id).map_err(|e| match e {
            SamplerError::UnknownSequence(id) => PyKeyError::new_err(id),
            other => value_error(other),
        })
    }

    fn __len__(&self) -> usize {
        self.inner.len()
    }

    fn __contains__(&self, seq_id: &Bound<'_, PyAny>) -> bool {
        seq_id
            .extract::<SeqId>()
            .is_ok_and(|id| self.inner.contains(id))
    }

    fn step(
        &mut self,
        py: Python<'_>,
        logits: &Bound<'_, PyAny>,
        seq_ids: Vec<SeqId>,
    ) -> PyResult<Vec<PyStepOutput>> {
        with_logits(logits, |values, rows, cols| {
            if rows != seq_ids.len() {
                return Err(PyValueError::new_err(format!(
                    "`logits` has {rows} rows for {} sequence ids",
                    seq_ids.len()
                )));
            }
            let sampler = &mut self.inner;
            let outputs = detached(py, || sampler.step(values, cols, &seq_ids))?;
            Ok(outputs
                .map_err(value_error)?
                .into_iter()
                .map(PyStepOutput::from)
                .collect())
        })
    }
}

/// The processed scores (stages 2–11 of the pipeline), `-inf` where filtered, for each row; for
/// tests and benchmarks. The vocabulary is the full row width.
#[pyfunction]
fn process_logits<'py>(
    py: Python<'py>,
    logits: &Bound<'py, PyAny>,
    params: &Bound<'py, PySamplingParams>,
    prompt_token_ids: Vec<Vec<i64>>,
    generated_token_ids: Vec<Vec<i64>>,
) -> PyResult<Bound<'py, PyArray2<f32>>> {
    let params = params.get().inner.clone();
    let out = with_logits(logits, |values, rows, cols| {
        if prompt_token_ids.len() != rows || generated_token_ids.len() != rows {
            return Err(PyValueError::new_err(format!(
                "`prompt_token_ids` and `generated_token_ids` need one list per row ({rows})"
            )));
        }
        params.check_vocab(cols).map_err(value_error)?;
        let mut ids = Vec::with_capacity(rows);
        for (p, g) in prompt_token_ids.iter().zip(&generated_token_ids) {
            let (p, g) = (
                token_ids("prompt_token_ids", p)?,
                token_ids("generated_token_ids", g)?,
            );
            if let Some(&t) = p.iter().chain(&g).find(|&&t| t as usize >= cols) {
                return Err(value_error(SamplerError::TokenOutOfRange {
                    parameter: "prompt_token_ids",
                    token: t,
                    vocab_size: cols,
                }));
            }
            ids.push((p, g));
        }
        detached(py, || {
            let rows: Vec<Vec<f32>> = (0..rows)
                .into_par_iter()
                .map(|r| {
                    let row = &values[r * cols..(r + 1) * cols];
                    sampling::process_row(row, params.clone(), &ids[r].0, &ids[r].1)
                })
                .collect();
            rows.concat()
        })
        .map(|flat| (flat, rows, cols))
    })?;
    let (flat, rows, cols) = out;
    let arr = Array2::from_shape_vec((rows, cols), flat)
        .map_err(|e| PyRuntimeError::new_err(e.to_string()))?;
    Ok(arr.into_pyarray(py))
}

/// tokenwire's token sampler.
#[pymodule]
fn sampler_rs(m: &Bound<'_, PyModule>) -> PyResult<()> {
    crate::keep_freed_memory();
    m.add_class::<PySamplingParams>()?;
    m.add_class::<PyStepOutput>()?;
    m.add_class::<PySampler>()?;
    m.add_function(wrap_pyfunction!(process_logits, m)?)?;
    crate::guide_bindings::register(m)?;
    crate::beam_bindings::register(m)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
