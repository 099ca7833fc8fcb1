//! The one error answer of the admin API, `{"error": {"code", "message",
//! "field"?}}`, and how database, pool and transition errors become one.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

use crate::campaigns::TransitionError;
use crate::db::{self, ErrorClass};

/// An error answer: its status and the body's `code`, `message` and `field`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    field: Option<String>,
}

/// What every error answer carries.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct ErrorBody {
    error: ErrorDetail,
}

/// Why the request failed.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct ErrorDetail {
    /// Stable, machine-readable: `unauthorized`, `not_found`, `invalid`,
    /// `invalid_json`, `invalid_body`, `invalid_path`, `invalid_query`, `duplicate`, `in_use`,
    /// `illegal_transition`, `unavailable`, `internal`.
    code: String,
    /// What went wrong, for people.
    message: String,
    /// JSON pointer into the request body to the value at fault, where one is.
    #[serde(skip_serializing_if = "Option::is_none")]
    field: Option<String>,
}

impl ApiError {
    pub(super) fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            field: None,
        }
    }

    /// The body's `field` and `message`, for tests.
    #[cfg(test)]
    pub(super) fn field_and_message(&self) -> (&str, &str) {
        (self.field.as_deref().unwrap_or_default(), &self.message)
    }

    /// 422: the request is well-formed but the value at `field` is not acceptable.
    pub(super) fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: Some(field.into()),
            ..Self::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid", message)
        }
    }

    pub(super) fn not_found(what: &str, id: impl std::fmt::Display) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("{what} {id} does not exist"),
        )
    }

    pub(super) fn conflict(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, code, message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code.to_string(),
                message: self.message,
                field: self.field,
            },
        };
        (self.status, Json(body)).into_response()
    }
}

impl From<tokio_postgres::Error> for ApiError {
    fn from(e: tokio_postgres::Error) -> Self {
        if let Some(d) = e.as_db_error() {
            match d.code().code() {
                "23505" => {
                    let msg = d.detail().unwrap_or(d.message()).to_string();
                    return Self::conflict("duplicate", msg);
                }
                "23503" => return Self::conflict("in_use", d.message().to_string()),
                _ => {}
            }
        }
        match db::classify(&e) {
            ErrorClass::Transient => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                format!("database: {e}"),
            ),
            ErrorClass::Data => {
                Self::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid", format!("{e}"))
            }
            ErrorClass::Fatal => {
                tracing::error!(error = %e, "admin API database error");
                Self::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    "database error",
                )
            }
        }
    }
}

impl From<deadpool_postgres::PoolError> for ApiError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            format!("database: {e}"),
        )
    }
}

impl From<TransitionError> for ApiError {
    fn from(e: TransitionError) -> Self {
        match e {
            TransitionError::NotFound(id) => Self::not_found("campaign", id),
            TransitionError::Illegal { .. } => Self::conflict("illegal_transition", e.to_string()),
            TransitionError::Incomplete { .. } => Self::conflict("incomplete", e.to_string()),
            TransitionError::Db(e) => e.into(),
            TransitionError::Kafka(m) => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                format!("nothing changed: {m}"),
            ),
        }
    }
}
