//! The one place HTTP clients are built.

use std::sync::Once;

/// A reqwest client builder with a TLS crypto provider installed. (A
/// dependency enables reqwest's `rustls-no-provider`, so without this a
/// client panics when built.)
pub fn client_builder() -> reqwest::ClientBuilder {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        // Err only if a provider was installed already, which is what we want.
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    });
    reqwest::Client::builder()
}
