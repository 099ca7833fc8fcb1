//! Twilio's error answers as the simulator gives them: the code decides the
//! HTTP status and the message, from the one table in `twilio::errors`.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

/// A Twilio API error: `code` decides the HTTP status.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct ApiError {
    pub(super) code: i32,
    pub(super) message: String,
}

impl ApiError {
    pub(super) fn new(code: i32) -> Self {
        Self {
            code,
            message: default_message(code),
        }
    }
    pub(super) fn with(code: i32, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, body) = error_body(self.code, &self.message);
        (status, Json(body)).into_response()
    }
}

/// The HTTP status the provider answers an API error `code` with.
pub(super) fn http_status(code: i32) -> StatusCode {
    crate::twilio::errors::lookup(code)
        .filter(|c| c.http_status > 0)
        .and_then(|c| StatusCode::from_u16(c.http_status).ok())
        .unwrap_or(StatusCode::BAD_REQUEST)
}

/// Twilio's error document.
pub(super) fn error_body(code: i32, message: &str) -> (StatusCode, Value) {
    let status = http_status(code);
    let body = json!({
        "code": code,
        "message": message,
        "more_info": format!("https://www.twilio.com/docs/errors/{code}"),
        "status": status.as_u16(),
    });
    (status, body)
}

pub(super) fn default_message(code: i32) -> String {
    match crate::twilio::errors::lookup(code) {
        Some(c) => c.message.to_string(),
        None => format!("Simulated error {code}"),
    }
}

pub(super) fn delivery_error_message(code: i32) -> &'static str {
    crate::twilio::errors::lookup(code).map_or("Message delivery failed", |c| c.message)
}
