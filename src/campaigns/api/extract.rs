//! Reading requests: path, query and body extractors whose every failure is
//! the documented JSON error (axum's own answer `text/plain`), the list
//! paging, and the checks several resources share.

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Path, Query, Request};
use axum::http::StatusCode;
use axum::http::request::Parts;
use serde::de::{DeserializeOwned, Error as _};
use serde::{Deserialize, Deserializer};
use utoipa::IntoParams;
use uuid::Uuid;

use super::error::ApiError;

/// Path parameters; a value that does not parse (`/templates/abc`) is 400 `invalid_path`.
pub(super) struct ApiPath<T>(pub T);

impl<T, S> FromRequestParts<S> for ApiPath<T>
where
    T: DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match Path::<T>::from_request_parts(parts, state).await {
            Ok(Path(value)) => Ok(Self(value)),
            Err(rejection) => Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_path",
                rejection.body_text(),
            )),
        }
    }
}

/// The query string; unknown, repeated or unparsable parameters are 400 `invalid_query`.
pub(super) struct ApiQuery<T>(pub T);

impl<T, S> FromRequestParts<S> for ApiQuery<T>
where
    T: DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        match Query::<T>::try_from_uri(&parts.uri) {
            Ok(Query(value)) => Ok(Self(value)),
            Err(rejection) => Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_query",
                rejection.body_text(),
            )),
        }
    }
}

/// A JSON body; one that is not JSON or not the documented shape is 400 `invalid_json`.
pub(super) struct ApiJson<T>(pub T);

impl<T, S> FromRequest<S> for ApiJson<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = read_body(req, state).await?;
        parse(&bytes).map(Self)
    }
}

/// A JSON body that may be left out (an empty body is `None`).
pub(super) struct OptionalJson<T>(pub Option<T>);

impl<T, S> FromRequest<S> for OptionalJson<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = read_body(req, state).await?;
        // JSON `null` is no body too (the document says the body is optional).
        if bytes.is_empty() || bytes.trim_ascii() == b"null" {
            return Ok(Self(None));
        }
        parse(&bytes).map(Some).map(Self)
    }
}

async fn read_body<S: Send + Sync>(req: Request, state: &S) -> Result<Bytes, ApiError> {
    Bytes::from_request(req, state).await.map_err(|rejection| {
        ApiError::new(rejection.status(), "invalid_body", rejection.body_text())
    })
}

/// Parses a JSON body, naming what is wrong. Every body the document names
/// is an object: serde would also read a struct from an array of its fields
/// in order (`[]`, `["t", "Hi"]`), which the document does not allow.
fn parse<T: DeserializeOwned>(bytes: &Bytes) -> Result<T, ApiError> {
    let invalid = |detail: String| ApiError::new(StatusCode::BAD_REQUEST, "invalid_json", detail);
    match bytes.trim_ascii_start().first() {
        Some(b'{') => {}
        Some(b'[') => {
            return Err(invalid(
                "request body: must be a JSON object, not an array".into(),
            ));
        }
        _ => return Err(invalid("request body: must be a JSON object".into())),
    }
    serde_json::from_slice(bytes).map_err(|e| invalid(format!("request body: {e}")))
}

/// For `#[serde(default, deserialize_with = "present")]`: an optional member
/// that, when given, must not be `null` (the document says it is a string).
pub(super) fn present<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    T::deserialize(deserializer).map(Some)
}

/// For `#[serde(default, deserialize_with = "nullable")]`: absent is `None`,
/// `null` is `Some(None)`, so a field can default when left out and still
/// be turned off with an explicit `null`.
pub(super) fn nullable<'de, D, T>(deserializer: D) -> Result<Option<Option<T>>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(deserializer).map(Some)
}

/// For `#[serde(deserialize_with = "integer")]`: a JSON Schema integer, so
/// `2.0` as well as `2` (serde reads only the second into an `i64`); a
/// fraction, or a value outside `T`, is refused.
pub(super) fn integer<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: TryFrom<i64>,
{
    // 2^63: the first whole float outside i64.
    const OUTSIDE: f64 = 9_223_372_036_854_775_808.0;
    let number = serde_json::Number::deserialize(deserializer)?;
    let whole = match number.as_i64() {
        Some(n) => Some(n),
        None => number
            .as_f64()
            .filter(|f| f.fract() == 0.0 && (-OUTSIDE..OUTSIDE).contains(f))
            .map(|f| f as i64),
    };
    whole
        .and_then(|n| T::try_from(n).ok())
        .ok_or_else(|| D::Error::custom(format!("{number} is not an integer in range")))
}

/// `?limit=&after=`: keyset paging of a list.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(super) struct ListQuery {
    /// Items per page.
    #[serde(default = "default_limit")]
    #[param(minimum = 1, maximum = 500, default = 50)]
    pub limit: i64,
    /// Keyset cursor: the last id of the previous page (`next_after`);
    /// the first page by default.
    #[serde(default)]
    #[param(value_type = Option<String>, format = Uuid)]
    pub after: Uuid,
}

/// The most items one page of a list holds.
pub(super) const MAX_PAGE: i64 = 500;

pub(super) fn default_limit() -> i64 {
    50
}

/// 400 unless `1 <= limit <= max`.
pub(super) fn check_limit(limit: i64, max: i64) -> Result<(), ApiError> {
    if (1..=max).contains(&limit) {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_query",
            format!("limit must be between 1 and {max}"),
        ))
    }
}

/// The cursor of the next page: the last id when the page is full.
pub(super) fn next_after<T>(len: usize, last: Option<T>, limit: i64) -> Option<T> {
    let full = i64::try_from(len).is_ok_and(|n| n == limit);
    if full { last } else { None }
}

/// The longest name, in characters. Names of templates and segments are
/// unique, and a B-tree index entry must stay well under 2.7 kB.
pub(super) const NAME_MAX: usize = 200;

/// A name: not blank (something besides white space), no NUL (PostgreSQL
/// text cannot hold it), at most [`NAME_MAX`] characters: the rule the
/// document states with `schema::name`.
pub(super) fn check_name(name: &str) -> Result<(), ApiError> {
    if name.trim().is_empty() {
        return Err(ApiError::invalid("/name", "name must not be empty"));
    }
    check_text("/name", name)?;
    if name.chars().count() > NAME_MAX {
        return Err(ApiError::invalid(
            "/name",
            format!("name must be at most {NAME_MAX} characters"),
        ));
    }
    Ok(())
}

/// Text PostgreSQL can store: no NUL character.
pub(super) fn check_text(field: &str, text: &str) -> Result<(), ApiError> {
    if text.contains('\0') {
        return Err(ApiError::invalid(
            field,
            format!(
                "{} must not contain NUL characters",
                field.trim_start_matches('/')
            ),
        ));
    }
    Ok(())
}

/// `k` as one RFC 6901 JSON pointer token.
pub(super) fn pointer_escape(k: &str) -> String {
    k.replace('~', "~0").replace('/', "~1")
}
