//! What the drivers found broken in pgnear, each reduced to the protocol exchange that broke.

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::common::*;

/// libpq 17+ (psycopg's `cancel_safe`, psql's Ctrl-C) sends a CancelRequest over TLS and waits
/// for the server to close. pgnear dropped the TLS stream without close_notify, which OpenSSL
/// reports as "unexpected eof": the client was told its cancel failed.
#[test]
fn a_cancel_request_over_tls_ends_with_close_notify() {
    use std::sync::Arc;

    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, ServerName};

    let lab = super::lab();
    run(async {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_file(&lab.ca_path).unwrap())
            .unwrap();
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        let mut tcp = TcpStream::connect(lab.addr).await.unwrap();
        tcp.write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f])
            .await
            .unwrap();
        let mut answer = [0u8; 1];
        tcp.read_exact(&mut answer).await.unwrap();
        assert_eq!(&answer, b"S");
        let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .unwrap();
        // A key pgnear never issued: ignored, and the connection still closes cleanly.
        tls.write_all(&[0, 0, 0, 16, 0x04, 0xd2, 0x16, 0x2e, 0, 0, 0, 1, 0, 0, 0, 2])
            .await
            .unwrap();
        let mut rest = Vec::new();
        let read = tls.read_to_end(&mut rest).await;
        assert!(read.is_ok(), "pgnear closed without close_notify: {read:?}");
        assert!(rest.is_empty());
    });
}
