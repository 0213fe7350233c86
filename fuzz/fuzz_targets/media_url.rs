//! Media URLs under the default policy with a domain list that admits no host
//! (so nothing touches the network): scheme detection, `data:` decoding,
//! `file:` path checks under an allowed folder, URL parsing and the domain
//! check, plus the address filter on any IP the URL names.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use verdict_engine::multimodal::{fetch_media, is_public_address, MediaPolicy};

fn policy() -> &'static MediaPolicy {
    static POLICY: OnceLock<(tempfile::TempDir, MediaPolicy)> = OnceLock::new();
    &POLICY
        .get_or_init(|| {
            let dir = tempfile::tempdir().expect("temporary folder");
            std::fs::write(dir.path().join("a.png"), b"not really a png").expect("file");
            let policy = MediaPolicy {
                allowed_domains: Some(Vec::new()),
                allowed_local_path: Some(dir.path().canonicalize().expect("path")),
                max_bytes: 1 << 16,
                ..MediaPolicy::default()
            };
            (dir, policy)
        })
        .1
}

fuzz_target!(|data: &[u8]| {
    let Ok(url) = std::str::from_utf8(data) else {
        return;
    };
    let _ = fetch_media(url, policy());
    if let Ok(parsed) = url::Url::parse(url) {
        let ip = match parsed.host() {
            Some(url::Host::Ipv4(ip)) => Some(std::net::IpAddr::V4(ip)),
            Some(url::Host::Ipv6(ip)) => Some(std::net::IpAddr::V6(ip)),
            _ => None,
        };
        if let Some(ip) = ip {
            let _ = is_public_address(ip);
        }
    }
});
