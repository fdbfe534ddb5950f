//! TLS for the gRPC port (rustls via tonic's `tls-ring`): a certificate and key, and
//! optionally a client CA that makes client certificates mandatory (mutual TLS).

use std::path::Path;

use tonic::transport::{Certificate, Identity, ServerTlsConfig};

use super::{Config, ServerError};

fn read(path: &Path) -> Result<Vec<u8>, ServerError> {
    std::fs::read(path).map_err(|source| ServerError::Tls {
        path: path.to_path_buf(),
        source,
    })
}

/// The TLS settings from `--tls-cert`, `--tls-key` and `--tls-client-ca`; `None` = plaintext.
pub fn server_tls(config: &Config) -> Result<Option<ServerTlsConfig>, ServerError> {
    let (Some(cert), Some(key)) = (&config.tls_cert, &config.tls_key) else {
        return Ok(None);
    };
    let mut tls = ServerTlsConfig::new().identity(Identity::from_pem(read(cert)?, read(key)?));
    if let Some(ca) = &config.tls_client_ca {
        tls = tls.client_ca_root(Certificate::from_pem(read(ca)?));
    }
    Ok(Some(tls))
}
