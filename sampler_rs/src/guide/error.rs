//! The guide module's error type: every compile or usage failure, with a message for the user.

/// What can go wrong compiling or using a guide. Bindings raise each as `ValueError`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GuideError {
    /// The regex does not parse, or uses a feature the engine cannot run.
    #[error("invalid regex: {0}")]
    InvalidRegex(String),
    /// The JSON Schema is not valid JSON or not a valid schema.
    #[error("invalid JSON Schema: {0}")]
    InvalidSchema(String),
    /// The JSON Schema uses keywords we do not support (we fail closed instead of ignoring them).
    #[error("unsupported JSON Schema keyword{} {}", if .0.len() == 1 { "" } else { "s" }, .0.iter().map(|k| format!("`{k}`")).collect::<Vec<_>>().join(", "))]
    UnsupportedKeyword(Vec<String>),
    /// The grammar does not parse or is not well formed.
    #[error("invalid grammar: {0}")]
    InvalidGrammar(String),
    /// The constraint would take more than the compile budget (states, memory or time).
    #[error("constraint too large: {0}")]
    TooLarge(String),
    /// The constraint matches no string at all.
    #[error("the constraint matches no string")]
    Empty,
    /// Any other bad argument (vocabulary, mask buffer, ...).
    #[error("{0}")]
    Invalid(String),
    /// The llguidance engine failed while matching (an internal error, not a user error).
    #[error("llguidance: {0}")]
    Engine(String),
}

/// The guide module's result type.
pub type Result<T> = std::result::Result<T, GuideError>;
