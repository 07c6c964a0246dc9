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

#[cfg(feature = "python")]
extern "C" {
    /// mimalloc's option setter (compiled into the allocator the `mimalloc` crate links).
    fn mi_option_set(option: std::os::raw::c_int, value: std::os::raw::c_long);
}

/// Asks mimalloc to keep the memory it frees instead of returning it to the OS 10 ms later
/// (`mi_option_purge_delay`, 15 in its `mi_option_e`, to -1): in a VM whose host backs memory
/// lazily, touching a returned page again cost single mask calls several milliseconds. The
/// process keeps its peak heap (guide caches are bounded).
#[cfg(feature = "python")]
pub(crate) fn keep_freed_memory() {
    const MI_OPTION_PURGE_DELAY: std::os::raw::c_int = 15;
    // SAFETY: sets one integer option of the allocator this library links; any value is valid.
    unsafe { mi_option_set(MI_OPTION_PURGE_DELAY, -1) }
}
