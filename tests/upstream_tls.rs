//! pgnear to Postgres over TLS by `sslmode`: the primary gets a certificate from a test CA, and
//! pgnear connects with require, verify-ca and verify-full, and refuses a wrong CA.

mod common;

use std::path::Path;

use common::*;
use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};

struct Pki {
    ca_pem: String,
    server_pem: String,
    server_key: String,
}

fn pki(names: Vec<String>) -> Pki {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(vec![]).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(names)
        .unwrap()
        .signed_by(&key, &ca, &ca_key)
        .unwrap();
    Pki {
        ca_pem: ca.pem(),
        server_pem: cert.pem(),
        server_key: key.serialize_pem(),
    }
}

fn write_owned_by_postgres(path: &Path, contents: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, contents).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
    // Postgres (running as `postgres` when we are root) must own its key file.
    let _ = std::process::Command::new("chown")
        .args(["postgres:postgres", &path.display().to_string()])
        .status();
}

async fn enable_ssl(p: &Pki) {
    let data = &cluster().primary().data_dir;
    write_owned_by_postgres(&data.join("server.crt"), &p.server_pem);
    write_owned_by_postgres(&data.join("server.key"), &p.server_key);
    let admin = primary_admin().await;
    admin
        .batch_execute("ALTER SYSTEM SET ssl = on")
        .await
        .unwrap();
    admin
        .batch_execute("SELECT pg_reload_conf()")
        .await
        .unwrap();
    eventually(
        "ssl to be on",
        std::time::Duration::from_secs(10),
        || async {
            let v: String = primary_admin()
                .await
                .query_one("SHOW ssl", &[])
                .await
                .unwrap()
                .get(0);
            v == "on"
        },
    )
    .await;
}

/// Whether the server connection pgnear opened for this client uses TLS.
async fn upstream_ssl(primary_url: &str) -> Result<bool, String> {
    let p = proxy(PRIMARY, |c| {
        c.upstream.primary_url = primary_url.to_string()
    })
    .await;
    let result = match tokio_postgres::connect(&url(&p), tokio_postgres::NoTls).await {
        Ok((c, conn)) => {
            tokio::spawn(conn);
            let row = c
                .query_one(
                    "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
                    &[],
                )
                .await
                .map_err(|e| e.to_string())?;
            Ok(row.get(0))
        }
        Err(e) => Err(e.as_db_error().map_or(e.to_string(), |d| {
            format!("{} {}", d.code().code(), d.message())
        })),
    };
    p.shutdown().await;
    result
}

#[test]
fn sslmodes_against_a_tls_primary() {
    run(async {
        let good = pki(vec!["localhost".into()]);
        let other = pki(vec!["localhost".into()]);
        enable_ssl(&good).await;
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        let wrong_ca = dir.path().join("wrong-ca.pem");
        std::fs::write(&ca, &good.ca_pem).unwrap();
        std::fs::write(&wrong_ca, &other.ca_pem).unwrap();
        let o = cluster().options();
        let port = cluster().primary().addr().port();
        let base = |host: &str| {
            format!(
                "postgres://{}:{}@{host}:{port}/{}",
                o.app_user, o.app_password, o.database
            )
        };

        assert_eq!(
            upstream_ssl(&format!("{}?sslmode=disable", base("127.0.0.1"))).await,
            Ok(false)
        );
        assert_eq!(
            upstream_ssl(&format!("{}?sslmode=prefer", base("127.0.0.1"))).await,
            Ok(true)
        );
        assert_eq!(
            upstream_ssl(&format!("{}?sslmode=require", base("127.0.0.1"))).await,
            Ok(true)
        );
        let verify_full = format!(
            "{}?sslmode=verify-full&sslrootcert={}",
            base("localhost"),
            ca.display()
        );
        assert_eq!(upstream_ssl(&verify_full).await, Ok(true));
        // verify-ca checks the chain, not the name.
        let verify_ca = format!(
            "{}?sslmode=verify-ca&sslrootcert={}",
            base("127.0.0.1"),
            ca.display()
        );
        assert_eq!(upstream_ssl(&verify_ca).await, Ok(true));
        // verify-full checks the name too: the certificate is for localhost, not 127.0.0.1.
        let wrong_name = format!(
            "{}?sslmode=verify-full&sslrootcert={}",
            base("127.0.0.1"),
            ca.display()
        );
        let e = upstream_ssl(&wrong_name).await.unwrap_err();
        assert!(e.contains("08006") || e.contains("TLS"), "{e}");
        // A certificate from another CA is refused, with an error naming the primary.
        let wrong = format!(
            "{}?sslmode=verify-full&sslrootcert={}",
            base("localhost"),
            wrong_ca.display()
        );
        let e = upstream_ssl(&wrong).await.unwrap_err();
        assert!(
            e.contains("primary upstream") && e.contains("TLS handshake"),
            "{e}"
        );
    });
}
