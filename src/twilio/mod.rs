//! Everything the engine knows of its provider, Twilio, in one place: the
//! webhook signature ([`signature`]), the account and tokens
//! ([`credentials`]), the Messages API client with its answers classified
//! ([`client`]) and the one table of error codes ([`errors`]) that the
//! sender and the simulator both read.

pub mod client;
pub mod credentials;
pub mod errors;
pub mod signature;

pub use client::{Outcome, Provider, classify};
pub use credentials::{Credentials, tokens_from_env};

/// The API version in every Messages API path.
pub const API_VERSION: &str = "2010-04-01";
