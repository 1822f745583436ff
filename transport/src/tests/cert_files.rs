use std::fs;
use std::os::unix::fs::PermissionsExt;

use super::*;

#[test]
fn role_names_round_trip_and_nothing_else_parses() {
    // Goal: every role has one common name, and only those names parse back to a role.
    for role in [Role::Node(0), Role::Node(7), Role::Node(u64::MAX), Role::Gateway, Role::Admin] {
        assert_eq!(Role::from_common_name(&role.common_name()), Some(role), "{role}");
    }
    assert_eq!(Role::Node(7).common_name(), "sq-node-7");
    assert_eq!(Role::Node(7).file_stem(), "node-7");
    assert_eq!(Role::Gateway.common_name(), "sq-gateway");
    assert_eq!(Role::Admin.common_name(), "sq-admin");
    for name in [
        "",
        "gateway",
        "sq-",
        "sq-node-",
        "sq-node-07",
        "sq-node-+7",
        "sq-node--7",
        "sq-node-7x",
        "sq-node-18446744073709551616",
        "sq-Gateway",
        "sq-gateway ",
        "sq-intruder",
        "node-7",
    ] {
        assert_eq!(Role::from_common_name(name), None, "{name:?}");
    }
}

#[test]
fn ca_and_certificates_are_written_once_with_private_keys() {
    // Goal: create_ca and issue write the documented files, keys readable by the owner only,
    // and neither ever overwrites what exists.
    let dir = tempfile::tempdir().expect("temp dir");
    certs::create_ca(dir.path()).expect("create CA");
    certs::issue(dir.path(), Role::Node(3)).expect("issue");
    certs::issue(dir.path(), Role::Admin).expect("issue");
    for (file, mode) in [
        ("ca.key", 0o600),
        ("ca.pem", 0o644),
        ("node-3.key", 0o600),
        ("node-3.pem", 0o644),
        ("admin.key", 0o600),
    ] {
        let meta = fs::metadata(dir.path().join(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
        assert_eq!(meta.permissions().mode() & 0o777, mode, "{file}");
    }
    let ca_before = fs::read(dir.path().join("ca.pem")).expect("read");
    assert!(matches!(certs::create_ca(dir.path()), Err(TransportError::Cert(_))));
    assert!(matches!(certs::issue(dir.path(), Role::Node(3)), Err(TransportError::Cert(_))));
    assert_eq!(fs::read(dir.path().join("ca.pem")).expect("read"), ca_before);
    let leftovers: Vec<_> = fs::read_dir(dir.path())
        .expect("list")
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
}

#[test]
fn identity_load_checks_the_certificate_is_the_roles() {
    // Goal: loading an identity verifies the certificate names the requested role, so a
    // misplaced file cannot make a process claim another role.
    let cluster = Cluster::new();
    let node = Identity::load(cluster.path(), Role::Node(1)).expect("load");
    assert_eq!(node.role(), Role::Node(1));
    assert!(!format!("{node:?}").contains("PRIVATE KEY"), "Debug must not print the key");

    fs::copy(
        certs::cert_path(cluster.path(), Role::Gateway),
        certs::cert_path(cluster.path(), Role::Node(2)),
    )
    .expect("copy");
    fs::copy(
        certs::key_path(cluster.path(), Role::Gateway),
        certs::key_path(cluster.path(), Role::Node(2)),
    )
    .expect("copy");
    assert!(matches!(Identity::load(cluster.path(), Role::Node(2)), Err(TransportError::Cert(_))));
    assert!(matches!(Identity::load(cluster.path(), Role::Admin), Err(TransportError::Cert(_))));
    assert!(matches!(
        Identity::from_pem("junk".into(), node.cert_pem().into(), node.key_pem().into()),
        Err(TransportError::Cert(_))
    ));
}

#[test]
fn https_certificate_carries_the_names_given() {
    // Goal: `certs issue --https --name` makes a server certificate for exactly the DNS names and
    // IP addresses given; names that are neither are refused and nothing is written.
    let dir = tempfile::tempdir().expect("temp dir");
    certs::create_ca(dir.path()).expect("create CA");
    for bad in [vec![], vec!["bad name".to_string()], vec!["-x.example".to_string()]] {
        assert!(certs::issue_https_for(dir.path(), "https", &bad).is_err(), "{bad:?}");
    }
    assert!(!dir.path().join("https.pem").exists());
    let names = vec!["gw.example.com".to_string(), "10.1.2.3".to_string(), "::1".to_string()];
    certs::issue_https_for(dir.path(), "https", &names).expect("issue");
    let pem = fs::read_to_string(dir.path().join("https.pem")).expect("read");
    let params = rcgen::CertificateParams::from_ca_cert_pem(&pem).expect("parse");
    let sans: Vec<String> = params
        .subject_alt_names
        .iter()
        .map(|san| match san {
            rcgen::SanType::DnsName(n) => n.to_string(),
            rcgen::SanType::IpAddress(ip) => ip.to_string(),
            other => format!("{other:?}"),
        })
        .collect();
    assert_eq!(sans, names);
    let mode = fs::metadata(dir.path().join("https.key")).expect("key").permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    assert!(certs::issue_https_for(dir.path(), "https", &names).is_err(), "never overwrites");
}
