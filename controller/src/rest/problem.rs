//! RFC 9457 problem documents: every error of the REST API, with a stable `code`.

use asmn_shared::wire::msg::RefusalCode;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::registry::RegistryError;

/// An error, as the API answers it (`application/problem+json`).
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct Problem {
    /// `urn:asmn:problem:<code>`.
    #[serde(rename = "type")]
    pub kind: String,
    /// A short summary of the problem type.
    pub title: String,
    /// The HTTP status.
    pub status: u16,
    /// What happened and what to do, for a human.
    pub detail: String,
    /// A stable, machine-readable code (such as `invalid-catalog`, `unknown-instance`,
    /// `wrong-measurement`): programs branch on it, not on `detail`.
    pub code: String,
}

impl Problem {
    /// A problem of HTTP status `status` and code `code`.
    pub fn new(status: StatusCode, code: &str, detail: impl Into<String>) -> Self {
        Self {
            kind: format!("urn:asmn:problem:{code}"),
            title: status.canonical_reason().unwrap_or("Error").to_string(),
            status: status.as_u16(),
            detail: detail.into(),
            code: code.to_string(),
        }
    }

    /// `404 not-found`.
    pub fn not_found(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not-found", detail)
    }

    /// `400 bad-request`.
    pub fn bad_request(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad-request", detail)
    }

    /// `503 unavailable`: the store failed; retry.
    pub fn unavailable(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", detail)
    }
}

/// The code and HTTP status of a refusal.
pub fn refusal_status(code: RefusalCode) -> (StatusCode, &'static str) {
    use RefusalCode as C;
    match code {
        C::Unspecified => (StatusCode::BAD_REQUEST, "refused"),
        C::WrongMeasurement => (StatusCode::CONFLICT, "wrong-measurement"),
        C::UnknownInstance => (StatusCode::NOT_FOUND, "unknown-instance"),
        C::Revoked => (StatusCode::CONFLICT, "revoked"),
        C::Replayed => (StatusCode::CONFLICT, "replayed"),
        C::SkipTooFar => (StatusCode::CONFLICT, "skip-too-far"),
        C::WrongEpoch => (StatusCode::CONFLICT, "wrong-epoch"),
        C::BadRenewal => (StatusCode::CONFLICT, "bad-renewal"),
        C::PeerNotAllowed => (StatusCode::FORBIDDEN, "peer-not-allowed"),
        C::PeerUnknown => (StatusCode::NOT_FOUND, "peer-unknown"),
        C::MalformedMessage => (StatusCode::BAD_REQUEST, "malformed"),
        C::NotAuthorized => (StatusCode::FORBIDDEN, "not-authorized"),
        C::InvalidCatalog => (StatusCode::UNPROCESSABLE_ENTITY, "invalid-catalog"),
        C::Unavailable => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
        C::Quarantined => (StatusCode::CONFLICT, "quarantined"),
        C::InvalidRequest => (StatusCode::BAD_REQUEST, "invalid-request"),
        C::AlreadyExists => (StatusCode::CONFLICT, "already-exists"),
        C::RateLimited => (StatusCode::TOO_MANY_REQUESTS, "rate-limited"),
        C::TooLarge => (StatusCode::PAYLOAD_TOO_LARGE, "too-large"),
    }
}

impl From<RegistryError> for Problem {
    fn from(e: RegistryError) -> Self {
        match e {
            RegistryError::Refused(r) => {
                let (status, code) = refusal_status(r.code);
                Self::new(status, code, r.message)
            }
            other => {
                tracing::error!(error = %other, "REST request failed");
                Self::unavailable("Sec-EM could not complete the request; retry")
            }
        }
    }
}

impl From<crate::notify::SubscriptionError> for Problem {
    fn from(e: crate::notify::SubscriptionError) -> Self {
        use crate::notify::SubscriptionError as E;
        match e {
            E::Invalid(m) => Self::new(StatusCode::BAD_REQUEST, "invalid-request", m),
            E::Full => Self::new(
                StatusCode::CONFLICT,
                "too-many-subscriptions",
                e.to_string(),
            ),
            E::Registry(r) => r.into(),
        }
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let body = serde_json::to_vec(&self).unwrap_or_default();
        (
            status,
            [(axum::http::header::CONTENT_TYPE, "application/problem+json")],
            body,
        )
            .into_response()
    }
}

/// Problems of axum's extractors (a body that is not the JSON asked for, a bad query or
/// path): the same documents as ours.
macro_rules! rejection {
    ($t:ty) => {
        impl From<$t> for Problem {
            fn from(r: $t) -> Self {
                let status = r.status();
                let code = match status {
                    StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported-media-type",
                    StatusCode::PAYLOAD_TOO_LARGE => "too-large",
                    _ => "bad-request",
                };
                // axum's 422 (JSON of the wrong shape) is a bad request here: 422 means
                // a catalog or descriptor Sec-EM understood and refused.
                let status = if status == StatusCode::UNPROCESSABLE_ENTITY {
                    StatusCode::BAD_REQUEST
                } else {
                    status
                };
                Self::new(status, code, r.body_text())
            }
        }
    };
}

rejection!(axum::extract::rejection::JsonRejection);
rejection!(axum::extract::rejection::QueryRejection);
rejection!(axum::extract::rejection::PathRejection);
rejection!(axum::extract::multipart::MultipartRejection);
rejection!(axum::extract::multipart::MultipartError);
