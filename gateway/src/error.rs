//! The one place where an error becomes an HTTP status.

use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use proto::ApiError;

/// The status SQ clients expect for each error.
pub fn status_of(err: &ApiError) -> StatusCode {
    match err {
        ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
        ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
        ApiError::BadPhextName | ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
        ApiError::NotFound | ApiError::Missing(_) => StatusCode::NOT_FOUND,
        ApiError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
        ApiError::AnswerTooLarge { .. } => StatusCode::UNPROCESSABLE_ENTITY,
        ApiError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
        ApiError::QuotaExceeded { .. } => StatusCode::INSUFFICIENT_STORAGE,
        ApiError::Unavailable { .. } | ApiError::NotOwner { .. } => StatusCode::SERVICE_UNAVAILABLE,
        ApiError::Conflict(_) => StatusCode::CONFLICT,
        ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        ApiError::RequestTimeout { .. } => StatusCode::REQUEST_TIMEOUT,
    }
}

/// Seconds a client should wait before trying again, for the errors that have such a time.
fn retry_after_s(err: &ApiError) -> Option<u64> {
    match err {
        ApiError::RateLimited { retry_after_s, .. }
        | ApiError::Unavailable { retry_after_s, .. } => Some((*retry_after_s).max(1)),
        ApiError::NotOwner { .. } => Some(1),
        _ => None,
    }
}

/// The text a client reads for an error. An internal error's detail (node ids, addresses, frame
/// sizes) goes to the gateway's log, never into the answer.
fn public_text(err: &ApiError) -> String {
    match err {
        ApiError::Internal(detail) => {
            tracing::error!(detail, "internal error answered 500");
            "Internal Server Error".into()
        }
        other => other.to_string(),
    }
}

/// The full answer for an error: status, plain-text body, CORS and `Retry-After`.
pub fn error_response(err: &ApiError) -> Response {
    let mut response = (status_of(err), public_text(err)).into_response();
    let headers = response.headers_mut();
    headers.insert("access-control-allow-origin", HeaderValue::from_static("*"));
    headers.insert("content-type", HeaderValue::from_static("text/plain; charset=utf-8"));
    if let Some(s) = retry_after_s(err) {
        headers.insert("retry-after", HeaderValue::from(s));
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    // Goal: the statuses of PRODUCT.md's error table, and Retry-After where it is promised.
    #[test]
    fn statuses() {
        let table = [
            (ApiError::bad_request(""), 400),
            (ApiError::Unauthorized, 401),
            (ApiError::BadPhextName, 403),
            (ApiError::NotFound, 404),
            (ApiError::Missing("tenant x does not exist".into()), 404),
            (ApiError::PayloadTooLarge { limit_bytes: 1 }, 413),
            (ApiError::AnswerTooLarge { answer_bytes: 2, limit_bytes: 1 }, 422),
            (ApiError::Internal("node 3 at 10.0.0.3:7000".into()), 500),
            (ApiError::RateLimited { reason: "x".into(), retry_after_s: 5 }, 429),
            (ApiError::Unavailable { reason: "x".into(), retry_after_s: 0 }, 503),
            (ApiError::QuotaExceeded { needed_bytes: 1, free_bytes: 0, quota_bytes: 1 }, 507),
        ];
        for (err, status) in table {
            let r = error_response(&err);
            assert_eq!(r.status().as_u16(), status, "{err:?}");
            assert_eq!(r.headers()["access-control-allow-origin"], "*");
            assert_eq!(
                r.headers().contains_key("retry-after"),
                matches!(status, 429 | 503),
                "{err:?}"
            );
        }
    }

    // Goal: an internal error's detail never reaches the client.
    #[test]
    fn internal_detail_stays_in_the_log() {
        let r = error_response(&ApiError::Internal("node 3 at 10.0.0.3:7000".into()));
        let body = body_text(r);
        assert_eq!(body, "Internal Server Error");
    }

    fn body_text(r: Response) -> String {
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let bytes = rt.block_on(http_body_util::BodyExt::collect(r.into_body())).unwrap();
        String::from_utf8(bytes.to_bytes().to_vec()).unwrap()
    }
}
