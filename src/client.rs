//! `slimserve classify`: a small client of the own API, for people and scripts.

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use clap::Args;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::grpc::pb::slimserve::v1 as pb;
use pb::classifier_client::ClassifierClient;

#[derive(Debug, Clone, Args)]
pub struct ClassifyArgs {
    /// Server address, HOST:PORT.
    #[arg(long, env = "SLIMSERVE_ADDR", default_value = "127.0.0.1:8001")]
    pub addr: String,

    /// Model to ask; default: the server's default model.
    #[arg(long, env = "SLIMSERVE_MODEL")]
    pub model: Option<String>,

    /// Version of the model (e.g. 3); default: the newest version served.
    #[arg(long)]
    pub model_version: Option<String>,

    /// Labels to print per image.
    #[arg(long, default_value_t = 3)]
    pub top_k: u32,

    /// Connect with TLS, trusting this PEM CA (the server's --tls-cert issuer).
    #[arg(long, env = "SLIMSERVE_TLS_CA")]
    pub tls_ca: Option<PathBuf>,

    /// Server name to verify in its certificate (default: HOST from --addr).
    #[arg(long, env = "SLIMSERVE_TLS_DOMAIN", requires = "tls_ca")]
    pub tls_domain: Option<String>,

    /// PEM client certificate, for servers that require mutual TLS (needs --tls-key).
    #[arg(long, env = "SLIMSERVE_TLS_CERT", requires_all = ["tls_ca", "tls_key"])]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key of --tls-cert.
    #[arg(long, env = "SLIMSERVE_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// Images to classify (JPEG, PNG, WebP, BMP, GIF). Each answer is printed as it comes;
    /// an image that cannot be read or that the server refuses (not an image, truncated,
    /// too large) is reported on stderr and the rest still go; the exit status is 1 if any
    /// failed.
    #[arg(required = true)]
    pub images: Vec<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("invalid server address `{addr}`: {message}")]
    Address { addr: String, message: String },
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        addr: String,
        source: tonic::transport::Error,
    },
    #[error("{}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: server answered {}: {}", path.display(), crate::telemetry::code_name(status.code()), status.message())]
    Rpc {
        path: PathBuf,
        status: tonic::Status,
    },
}

/// Connects to `addr` (HOST:PORT), with TLS when `tls_ca` is given.
pub async fn connect(args: &ClassifyArgs) -> Result<ClassifierClient<Channel>, ClientError> {
    let scheme = if args.tls_ca.is_some() {
        "https"
    } else {
        "http"
    };
    let url = format!("{scheme}://{}", args.addr);
    let bad = |message: String| ClientError::Address {
        addr: args.addr.clone(),
        message,
    };
    let mut endpoint = Endpoint::from_shared(url).map_err(|e| bad(e.to_string()))?;
    let read = |path: &PathBuf| {
        std::fs::read(path).map_err(|source| ClientError::Read {
            path: path.clone(),
            source,
        })
    };
    if let Some(ca) = &args.tls_ca {
        let pem = read(ca)?;
        let domain = match &args.tls_domain {
            Some(d) => d.clone(),
            None => args
                .addr
                .rsplit_once(':')
                .map(|(host, _)| host.trim_matches(['[', ']']).to_string())
                .ok_or_else(|| bad("expected HOST:PORT".into()))?,
        };
        let mut tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(pem))
            .domain_name(domain);
        if let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) {
            tls = tls.identity(Identity::from_pem(read(cert)?, read(key)?));
        }
        endpoint = endpoint.tls_config(tls).map_err(|e| bad(e.to_string()))?;
    }
    let channel = endpoint
        .connect()
        .await
        .map_err(|source| ClientError::Connect {
            addr: args.addr.clone(),
            source,
        })?;
    Ok(ClassifierClient::new(channel).max_decoding_message_size(usize::MAX))
}

impl ClientError {
    /// Whether the error is about one image (unreadable, or refused by the server as not an
    /// image, truncated or too large) rather than the server, the model or the connection:
    /// the other images can still be classified.
    pub fn is_per_image(&self) -> bool {
        match self {
            ClientError::Read { .. } => true,
            ClientError::Rpc { status, .. } => matches!(
                status.code(),
                tonic::Code::InvalidArgument | tonic::Code::ResourceExhausted
            ),
            ClientError::Address { .. } | ClientError::Connect { .. } => false,
        }
    }
}

/// Classifies each image in turn, handing each answer, or each [per-image
/// error](ClientError::is_per_image), to `each` as it comes, until `each` breaks. Any other
/// error (connection, TLS, unknown model, server unavailable) ends it as an `Err`: it would
/// repeat for every image.
pub async fn classify_each(
    args: &ClassifyArgs,
    mut each: impl FnMut(&Path, Result<pb::ClassifyResponse, ClientError>) -> ControlFlow<()>,
) -> Result<(), ClientError> {
    let mut client = connect(args).await?;
    for path in &args.images {
        let answer = match std::fs::read(path) {
            Err(source) => Err(ClientError::Read {
                path: path.clone(),
                source,
            }),
            Ok(bytes) => {
                let request = pb::ClassifyRequest {
                    model: args.model.clone().unwrap_or_default(),
                    model_version: args.model_version.clone().unwrap_or_default(),
                    top_k: args.top_k,
                    input: Some(pb::classify_request::Input::Image(bytes.into())),
                    ..Default::default()
                };
                client
                    .classify(request)
                    .await
                    .map(tonic::Response::into_inner)
                    .map_err(|status| ClientError::Rpc {
                        path: path.clone(),
                        status,
                    })
            }
        };
        match answer {
            Err(e) if !e.is_per_image() => return Err(e),
            answer => {
                if each(path, answer).is_break() {
                    break;
                }
            }
        }
    }
    Ok(())
}

/// Classifies each image in turn; stops at the first error of any kind.
pub async fn classify(
    args: &ClassifyArgs,
) -> Result<Vec<(PathBuf, pb::ClassifyResponse)>, ClientError> {
    let mut answers = Vec::with_capacity(args.images.len());
    let mut failed = None;
    classify_each(args, |path, answer| match answer {
        Ok(r) => {
            answers.push((path.to_path_buf(), r));
            ControlFlow::Continue(())
        }
        Err(e) => {
            failed = Some(e);
            ControlFlow::Break(())
        }
    })
    .await?;
    match failed {
        Some(e) => Err(e),
        None => Ok(answers),
    }
}

/// Human-readable lines for one answer.
pub fn format_answer(path: &std::path::Path, r: &pb::ClassifyResponse) -> String {
    let mut out = format!("{} (model {}", path.display(), r.model);
    if let Some(t) = &r.timings {
        out += &format!(
            ", {:.1} ms compute in a batch of {}",
            t.compute_us as f64 / 1e3,
            t.batch_size
        );
    }
    out += ")\n";
    // Labels padded to the longest of this answer (at least 16), so the percentages line up.
    let width = r
        .predictions
        .iter()
        .map(|p| p.label.chars().count())
        .max()
        .unwrap_or(0)
        .max(16);
    for (rank, p) in r.predictions.iter().enumerate() {
        out += &format!(
            "  {}. {:<width$} {:5.1}%\n",
            rank + 1,
            p.label,
            p.probability * 100.0
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_line_up_whatever_the_labels_length() {
        let r = pb::ClassifyResponse {
            model: "big".into(),
            predictions: ["condiments_and_spices", "fruits"]
                .iter()
                .zip([0.9, 0.05])
                .map(|(l, p)| pb::Prediction {
                    label: l.to_string(),
                    probability: p,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        };
        let text = format_answer(Path::new("a.jpg"), &r);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "a.jpg (model big)");
        assert_eq!(lines[1], "  1. condiments_and_spices  90.0%");
        assert_eq!(lines[2], "  2. fruits                  5.0%");
    }
}
