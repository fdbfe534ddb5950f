//! TLS and mutual TLS on the gRPC port, with certificates made for the test (rcgen).

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, ExtendedKeyUsagePurpose, IsCa, KeyPair,
};
use slimserve::client::{self, ClassifyArgs};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

use crate::common::*;

struct Pki {
    ca: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
}

/// A CA, a `localhost` server certificate and a client certificate, as PEM files in `dir`.
fn pki(dir: &Path) -> Pki {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let leaf = |names: Vec<String>, usage: ExtendedKeyUsagePurpose| {
        let mut params = CertificateParams::new(names).unwrap();
        params.extended_key_usages = vec![usage];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &ca).unwrap();
        (cert.pem(), key.serialize_pem())
    };
    let (server_cert, server_key) = leaf(
        vec!["localhost".into()],
        ExtendedKeyUsagePurpose::ServerAuth,
    );
    let (client_cert, client_key) = leaf(
        vec!["test-client".into()],
        ExtendedKeyUsagePurpose::ClientAuth,
    );
    let write = |name: &str, pem: &str| {
        let path = dir.join(name);
        std::fs::write(&path, pem).unwrap();
        path
    };
    Pki {
        ca: write("ca.pem", &ca.pem()),
        server_cert: write("server.pem", &server_cert),
        server_key: write("server.key", &server_key),
        client_cert: write("client.pem", &client_cert),
        client_key: write("client.key", &client_key),
    }
}

fn classify_args(s: &TestServer, pki: &Pki, photo: PathBuf) -> ClassifyArgs {
    ClassifyArgs {
        addr: format!("localhost:{}", s.grpc.port()),
        model: None,
        model_version: None,
        top_k: 1,
        tls_ca: Some(pki.ca.clone()),
        tls_domain: None,
        tls_cert: None,
        tls_key: None,
        images: vec![photo],
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_and_mutual_tls() {
    let certs = tempfile::tempdir().unwrap();
    let pki = pki(certs.path());
    let photo = certs.path().join("photo.png");
    std::fs::write(&photo, png(48, 48)).unwrap();

    let ca = Certificate::from_pem(std::fs::read(&pki.ca).unwrap());
    let with_identity = ClientTlsConfig::new()
        .ca_certificate(ca.clone())
        .identity(Identity::from_pem(
            std::fs::read(&pki.client_cert).unwrap(),
            std::fs::read(&pki.client_key).unwrap(),
        ))
        .domain_name("localhost");

    // TLS: the classify client trusts the CA; a plaintext client is refused.
    let server_only = ClientTlsConfig::new()
        .ca_certificate(ca)
        .domain_name("localhost");
    let s = TestServer::start_tls(&["tls"], server_only, |c| {
        c.tls_cert = Some(pki.server_cert.clone());
        c.tls_key = Some(pki.server_key.clone());
    })
    .await;
    let answers = client::classify(&classify_args(&s, &pki, photo.clone()))
        .await
        .unwrap();
    assert_eq!(answers[0].1.model, "tls");
    let mut plain = ClassifierClient::new(
        Channel::from_shared(format!("http://{}", s.grpc))
            .unwrap()
            .connect_lazy(),
    );
    assert!(plain
        .classify(image_request("tls", png(8, 8)))
        .await
        .is_err());
    drop(s);

    // Mutual TLS: only clients with a certificate from the CA get in.
    let s = TestServer::start_tls(&["mtls"], with_identity, |c| {
        c.tls_cert = Some(pki.server_cert.clone());
        c.tls_key = Some(pki.server_key.clone());
        c.tls_client_ca = Some(pki.ca.clone());
    })
    .await;
    let err = client::classify(&classify_args(&s, &pki, photo.clone())).await;
    assert!(err.is_err(), "a client without a certificate is refused");
    let mut args = classify_args(&s, &pki, photo);
    args.tls_cert = Some(pki.client_cert.clone());
    args.tls_key = Some(pki.client_key.clone());
    let answers = client::classify(&args).await.unwrap();
    assert_eq!(answers[0].1.model, "mtls");

    // The same through a tonic channel with a client identity, as other Rust clients connect.
    let r = s
        .classifier()
        .await
        .classify(image_request("mtls", png(8, 8)))
        .await
        .unwrap();
    assert_eq!(r.into_inner().model, "mtls");
}
