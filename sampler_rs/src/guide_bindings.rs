//! The guided-decoding classes of the `sampler_rs` module: `Vocabulary`, `Guide`, `GuideState`,
//! thin wrappers over [`crate::guide`] (compiles release the GIL; errors become `ValueError`).

use numpy::{PyArray1, PyArrayMethods};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyBytes;

use crate::bindings::{detached, token_ids};
use crate::guide::{self, GuideError, GuideSpec};
use crate::sampling::TokenId;

fn value_error(e: GuideError) -> PyErr {
    PyValueError::new_err(e.to_string())
}

/// A served model's vocabulary as token bytes; frozen, build once per model.
#[pyclass(name = "Vocabulary", module = "sampler_rs", frozen)]
struct PyVocabulary {
    inner: guide::Vocabulary,
}

#[pymethods]
impl PyVocabulary {
    #[new]
    fn new(
        py: Python<'_>,
        token_bytes: Vec<Bound<'_, PyBytes>>,
        eos_token_ids: Vec<i64>,
        special_token_ids: Vec<i64>,
    ) -> PyResult<Self> {
        let eos = token_ids("eos_token_ids", &eos_token_ids)?;
        let special = token_ids("special_token_ids", &special_token_ids)?;
        let bytes: Vec<Vec<u8>> = token_bytes.iter().map(|b| b.as_bytes().to_vec()).collect();
        let inner = detached(py, || guide::Vocabulary::new(&bytes, &eos, &special))?
            .map_err(value_error)?;
        Ok(Self { inner })
    }

    fn __len__(&self) -> usize {
        self.inner.len()
    }

    /// Empties the compile caches (this vocabulary's guides, and the JSON Schema compiler's
    /// rules but for the built-in ones every schema shares). Compiled guides stay valid.
    fn clear_caches(&self, py: Python<'_>) -> PyResult<()> {
        let inner = self.inner.clone();
        detached(py, move || inner.clear_caches())
    }

    /// Number of compiled guides in this vocabulary's cache.
    #[getter]
    fn cached_guides(&self) -> usize {
        self.inner.cached_guides()
    }

    fn __repr__(&self) -> String {
        format!(
            "Vocabulary(len={}, eos_token_ids={:?})",
            self.inner.len(),
            self.inner.eos_token_ids()
        )
    }
}

/// A compiled constraint: immutable, shareable across sequences.
#[pyclass(name = "Guide", module = "sampler_rs", frozen)]
pub(crate) struct PyGuide {
    pub(crate) inner: guide::Guide,
}

fn compile(py: Python<'_>, vocab: &Bound<'_, PyVocabulary>, spec: GuideSpec) -> PyResult<PyGuide> {
    let vocab = vocab.get().inner.clone();
    let inner = detached(py, move || vocab.compile(&spec))?.map_err(value_error)?;
    Ok(PyGuide { inner })
}

#[pymethods]
impl PyGuide {
    /// A regex that must match the whole output.
    #[staticmethod]
    fn regex(py: Python<'_>, vocab: &Bound<'_, PyVocabulary>, pattern: String) -> PyResult<Self> {
        compile(py, vocab, GuideSpec::Regex(pattern))
    }

    /// Exactly one of `choices`.
    #[staticmethod]
    fn choice(
        py: Python<'_>,
        vocab: &Bound<'_, PyVocabulary>,
        choices: Vec<String>,
    ) -> PyResult<Self> {
        compile(py, vocab, GuideSpec::Choice(choices))
    }

    /// A JSON Schema; `whitespace_pattern` is the whitespace allowed between JSON tokens.
    #[staticmethod]
    #[pyo3(signature = (vocab, schema_json, whitespace_pattern=None))]
    fn json_schema(
        py: Python<'_>,
        vocab: &Bound<'_, PyVocabulary>,
        schema_json: String,
        whitespace_pattern: Option<String>,
    ) -> PyResult<Self> {
        compile(
            py,
            vocab,
            GuideSpec::JsonSchema {
                schema: schema_json,
                whitespace_pattern,
            },
        )
    }

    /// Any JSON object.
    #[staticmethod]
    #[pyo3(signature = (vocab, whitespace_pattern=None))]
    fn json_object(
        py: Python<'_>,
        vocab: &Bound<'_, PyVocabulary>,
        whitespace_pattern: Option<String>,
    ) -> PyResult<Self> {
        compile(py, vocab, GuideSpec::JsonObject { whitespace_pattern })
    }

    /// A Lark-style EBNF grammar or a GBNF one (detected by its `::=` rules).
    #[staticmethod]
    fn grammar(py: Python<'_>, vocab: &Bound<'_, PyVocabulary>, grammar: String) -> PyResult<Self> {
        compile(py, vocab, GuideSpec::Grammar(grammar))
    }

    /// Which engine compiled this guide: `"tokenwire-dfa"`, `"tokenwire-json"` or `"llguidance"`.
    #[getter]
    fn engine(&self) -> &'static str {
        self.inner.engine().name()
    }

    /// Why our JSON Schema compiler passed the schema to llguidance (`None` when it did not).
    #[getter]
    fn fallback_reason(&self) -> Option<String> {
        self.inner.fallback_reason().map(str::to_string)
    }

    /// Live DFA states (`None` for llguidance guides).
    #[getter]
    fn dfa_states(&self) -> Option<usize> {
        self.inner.dfa_states()
    }

    fn __repr__(&self) -> String {
        format!("Guide(engine={:?})", self.inner.engine().name())
    }
}

/// One sequence's position in a guide; mutable.
#[pyclass(name = "GuideState", module = "sampler_rs")]
struct PyGuideState {
    inner: guide::GuideState,
}

#[pymethods]
impl PyGuideState {
    #[new]
    fn new(guide: &Bound<'_, PyGuide>) -> Self {
        Self {
            inner: guide::GuideState::new(&guide.get().inner),
        }
    }

    /// Writes the allowed-token bitmask into the 1-D contiguous uint32 (or int32) array `out`.
    fn fill_mask(&mut self, py: Python<'_>, out: &Bound<'_, PyAny>) -> PyResult<()> {
        let borrow_err =
            |e: numpy::BorrowError| PyValueError::new_err(format!("`out` cannot be borrowed: {e}"));
        let contiguous = || PyValueError::new_err("`out` must be contiguous");
        let state = &mut self.inner;
        if let Ok(a) = out.cast::<PyArray1<u32>>() {
            let mut rw = a.try_readwrite().map_err(borrow_err)?;
            let words = rw.as_slice_mut().map_err(|_| contiguous())?;
            detached(py, || state.fill_mask(words))?.map_err(value_error)
        } else if let Ok(a) = out.cast::<PyArray1<i32>>() {
            let mut rw = a.try_readwrite().map_err(borrow_err)?;
            let words = u32_view(rw.as_slice_mut().map_err(|_| contiguous())?);
            detached(py, || state.fill_mask(words))?.map_err(value_error)
        } else {
            Err(PyValueError::new_err(
                "`out` must be a 1-D uint32 (or int32) numpy array",
            ))
        }
    }

    /// Consumes `token_id`; `False` (state unchanged) if it is not allowed.
    fn advance(&mut self, token_id: i64) -> bool {
        TokenId::try_from(token_id).is_ok_and(|t| self.inner.advance(t))
    }

    /// The text so far is a complete match (EOS allowed).
    fn is_accepting(&mut self) -> bool {
        self.inner.is_accepting()
    }

    /// Accepting, and nothing but EOS may follow (or EOS was consumed).
    fn is_finished(&mut self) -> bool {
        self.inner.is_finished()
    }

    fn __repr__(&mut self) -> String {
        format!(
            "GuideState(engine={:?}, accepting={})",
            self.inner.guide().engine().name(),
            if self.inner.is_accepting() {
                "True"
            } else {
                "False"
            }
        )
    }
}

/// Views `i32` words as `u32` (same size and alignment, every bit pattern valid).
fn u32_view(s: &mut [i32]) -> &mut [u32] {
    // SAFETY: i32 and u32 have the same size and alignment and no invalid bit patterns.
    unsafe { std::slice::from_raw_parts_mut(s.as_mut_ptr().cast::<u32>(), s.len()) }
}

/// Adds the guided-decoding classes to the module.
pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyVocabulary>()?;
    m.add_class::<PyGuide>()?;
    m.add_class::<PyGuideState>()?;
    Ok(())
}
