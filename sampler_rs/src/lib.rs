//! Token sampling for tokenwire: logits processing and seeded sampling, one call per engine step.
//!
//! The core ([`sampling`]) knows nothing of Python: it takes a `[batch, width]` `f32` logits buffer
//! (read-only, never copied), per-sequence state kept between steps, and returns one
//! [`sampling::StepOutput`] per row. The pipeline it runs is written down once, in order, in the
//! docs of [`sampling`].
//!
//! With the `python` feature (turned on by maturin) the crate is also the `sampler_rs` extension
//! module; the bindings are a thin wrapper that validates arguments, releases the GIL and turns
//! [`SamplerError`] into Python exceptions.
#![deny(missing_docs)]

pub mod beam;
mod error;
pub mod guide;
pub mod sampling;

#[cfg(feature = "python")]
mod beam_bindings;
#[cfg(feature = "python")]
mod bindings;
#[cfg(feature = "python")]
mod guide_bindings;

pub use error::SamplerError;

#[cfg(feature = "python")]
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;
