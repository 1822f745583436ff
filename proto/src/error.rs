//! The errors a request can end in, as both sides of the wire see them.

use serde::{Deserialize, Serialize};

/// Why a request failed. The gateway turns each into an HTTP status in one function; the text of
/// the answer is this type's `Display`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum ApiError {
    /// Malformed request. An empty detail answers plain `Bad Request`, as SQ does.
    #[error("Bad Request{}", detail_suffix(.0))]
    BadRequest(String),
    #[error("Unauthorized")]
    Unauthorized,
    #[error("Forbidden: invalid phext path")]
    BadPhextName,
    /// An authenticated caller asked for something it may not do (a tenant key on admin routes).
    #[error("Forbidden: {0}")]
    Forbidden(String),
    #[error("Not Found")]
    NotFound,
    /// A named thing an admin request refers to does not exist (the detail names it).
    #[error("Not Found: {0}")]
    Missing(String),
    #[error("Payload Too Large: the body exceeds {limit_bytes} bytes")]
    PayloadTooLarge { limit_bytes: u64 },
    /// The answer would pass [`crate::ops::ANSWER_BYTES_MAX`]; it was sized, not built. Final:
    /// the same request fails the same way, so no retry is suggested.
    #[error("Unprocessable Content: the answer would be {answer_bytes} bytes, over the limit of {limit_bytes} bytes; ask for less")]
    AnswerTooLarge { answer_bytes: u64, limit_bytes: u64 },
    #[error("Too Many Requests: {reason}")]
    RateLimited { reason: String, retry_after_s: u64 },
    #[error("Insufficient Storage: the write needs {needed_bytes} bytes, {free_bytes} of the quota of {quota_bytes} are free")]
    QuotaExceeded { needed_bytes: u64, free_bytes: u64, quota_bytes: u64 },
    #[error("Service Unavailable: {reason}")]
    Unavailable { reason: String, retry_after_s: u64 },
    /// The node that answered does not own the tenant in its placement epoch.
    #[error("Service Unavailable: not the owner (epoch {epoch})")]
    NotOwner { epoch: u64 },
    #[error("Conflict: {0}")]
    Conflict(String),
    #[error("Internal Server Error: {0}")]
    Internal(String),
    /// The request's body did not arrive within the gateway's body-read timeout. Nothing was
    /// done; the client may send it again.
    #[error("Request Timeout: the body did not arrive within {limit_ms} ms")]
    RequestTimeout { limit_ms: u64 },
}

/// Seconds a client is told to wait after a 503: the time for a registry election, a view
/// refresh or a handoff step, each well under a second on a healthy cluster.
pub const UNAVAILABLE_RETRY_AFTER_S: u64 = 1;

fn detail_suffix(detail: &str) -> String {
    if detail.is_empty() {
        String::new()
    } else {
        format!(": {detail}")
    }
}

impl ApiError {
    pub fn bad_request(detail: impl Into<String>) -> ApiError {
        ApiError::BadRequest(detail.into())
    }

    /// A 503 with [`UNAVAILABLE_RETRY_AFTER_S`].
    pub fn unavailable(reason: impl Into<String>) -> ApiError {
        ApiError::Unavailable { reason: reason.into(), retry_after_s: UNAVAILABLE_RETRY_AFTER_S }
    }
}
