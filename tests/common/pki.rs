//! Certificates made for one test, with rcgen: files in a folder of the
//! test's own (`ca.pem`, `server.pem`, `server.key`, `client.pem`,
//! `client.key`) and the same in memory.

use uuid::Uuid;

/// Certificates made for one test: a CA, a server certificate for
/// localhost and 127.0.0.1, and two client certificates, one signed by the CA and one not.
pub struct Pki {
    pub dir: std::path::PathBuf,
    pub ca_pem: String,
    pub client: (String, String, Vec<u8>),
    pub stranger: (String, String),
}

pub fn pki() -> Pki {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    // Names of their own: OpenSSL (Mosquitto) takes a certificate whose
    // subject is its issuer's for a self-signed one.
    let named = |mut p: CertificateParams, name: &str| {
        p.distinguished_name.push(DnType::CommonName, name);
        p
    };
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = named(
        CertificateParams::new(Vec::<String>::new()).unwrap(),
        "locus test CA",
    );
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let ca = Issuer::new(ca_params, ca_key);
    let server_key = KeyPair::generate().unwrap();
    let server = named(
        CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()]).unwrap(),
        "localhost",
    )
    .signed_by(&server_key, &ca)
    .unwrap();
    let client_key = KeyPair::generate().unwrap();
    let client = named(
        CertificateParams::new(vec!["van-7.devices.example".into()]).unwrap(),
        "van-7",
    )
    .signed_by(&client_key, &ca)
    .unwrap();
    let stranger_key = KeyPair::generate().unwrap();
    let stranger = CertificateParams::new(vec!["stranger.example".into()])
        .unwrap()
        .self_signed(&stranger_key)
        .unwrap();
    let dir = std::env::temp_dir().join(format!("locus-pki-{}", Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("ca.pem"), ca_cert.pem()).unwrap();
    std::fs::write(dir.join("server.pem"), server.pem()).unwrap();
    std::fs::write(dir.join("server.key"), server_key.serialize_pem()).unwrap();
    std::fs::write(dir.join("client.pem"), client.pem()).unwrap();
    std::fs::write(dir.join("client.key"), client_key.serialize_pem()).unwrap();
    Pki {
        dir,
        ca_pem: ca_cert.pem(),
        client: (
            client.pem(),
            client_key.serialize_pem(),
            client.der().to_vec(),
        ),
        stranger: (stranger.pem(), stranger_key.serialize_pem()),
    }
}
