//! The one place HTTP clients are built.

use std::sync::Once;

/// Installs the process's TLS crypto provider, once. A dependency enables
/// reqwest's `rustls-no-provider`, so without it any reqwest client (ours,
/// or the schema registry client's) panics when built.
pub fn install_crypto() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        // Err only if a provider was installed already, which is what we want.
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    });
}

/// A reqwest client builder, the crypto provider installed.
pub fn client_builder() -> reqwest::ClientBuilder {
    install_crypto();
    reqwest::Client::builder()
}
