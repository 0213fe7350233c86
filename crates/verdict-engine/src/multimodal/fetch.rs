//! Media URLs to bytes, with vLLM's media policy: `data:` URLs (base64),
//! `http(s)://` (optionally only from `--allowed-media-domains`) and `file://`
//! (only under `--allowed-local-media-path`). Every failure is the request's
//! fault: `EngineError::Validation`. Hosts that resolve to loopback, private,
//! link-local or metadata addresses are refused unless the policy allows them
//! (`--allow-private-media-hosts`, or the address itself on the domain list).

use std::io::Read;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use base64::Engine as _;

use super::MediaPolicy;
use crate::error::{EngineError, Result};

/// Redirects followed for http(s) URLs (each hop is checked against the policy).
const MAX_REDIRECTS: usize = 5;

/// Fetches one media URL with the policy's whole timeout as its deadline.
pub fn fetch_media(url: &str, policy: &MediaPolicy) -> Result<Vec<u8>> {
    fetch_media_until(
        url,
        policy,
        deadline_after(policy.timeout),
        &AtomicBool::new(false),
    )
}

/// Fetches one media URL, giving up at `deadline` (every redirect hop and the
/// body included) or once `stop` is set.
pub fn fetch_media_until(
    url: &str,
    policy: &MediaPolicy,
    deadline: Instant,
    stop: &AtomicBool,
) -> Result<Vec<u8>> {
    let url = url.trim();
    let lower: String = url.chars().take(8).collect::<String>().to_ascii_lowercase();
    if lower.starts_with("data:") {
        data_url(url, policy)
    } else if lower.starts_with("http://") || lower.starts_with("https://") {
        http(url, policy, deadline, stop)
    } else if lower.starts_with("file:") {
        local_file(url, policy)
    } else {
        let scheme = url.split_once(':').map(|(s, _)| s).unwrap_or("");
        Err(EngineError::validation(format!(
            "unsupported media URL scheme {scheme:?}: use http://, https://, data: or file:// URLs"
        )))
    }
}

/// How often a request's media fetches look at its cancellation flag while waiting.
const CANCEL_POLL: Duration = Duration::from_millis(25);

/// Fetches all of one request's media URLs at once under one deadline
/// (`policy.timeout` from now); bytes in input order. Network fetches run on
/// their own threads; this returns as soon as one fails, the deadline passes
/// or `cancel` is set (the client left), and the fetches still running stop
/// reading at once and end at the deadline at the latest.
pub fn fetch_all(
    urls: &[&str],
    policy: &Arc<MediaPolicy>,
    cancel: Option<&Arc<AtomicBool>>,
) -> Result<Vec<Vec<u8>>> {
    let deadline = deadline_after(policy.timeout);
    let stop = Arc::new(AtomicBool::new(false));
    // Tell the fetch threads to stop reading however this returns.
    struct StopOnExit(Arc<AtomicBool>);
    impl Drop for StopOnExit {
        fn drop(&mut self) {
            self.0.store(true, Ordering::Relaxed);
        }
    }
    let _stop_on_exit = StopOnExit(stop.clone());
    let cancelled = || cancel.is_some_and(|c| c.load(Ordering::Relaxed));
    if cancelled() {
        return Err(EngineError::validation("the request was cancelled"));
    }
    let mut out: Vec<Option<Vec<u8>>> = vec![None; urls.len()];
    let (tx, rx) = mpsc::channel();
    let mut pending = 0usize;
    for (i, url) in urls.iter().enumerate() {
        if !is_network_url(url) {
            continue;
        }
        let (url, policy, stop, tx) = (url.to_string(), policy.clone(), stop.clone(), tx.clone());
        std::thread::Builder::new()
            .name("verdict-media-fetch".into())
            .spawn(move || {
                let _ = tx.send((i, fetch_media_until(&url, &policy, deadline, &stop)));
            })
            .map_err(|e| EngineError::io("starting a media fetch thread", e))?;
        pending += 1;
    }
    // Only the fetch threads hold senders now: a closed channel means one died.
    drop(tx);
    // data: and file: URLs need no network: read them while the others download.
    for (i, url) in urls.iter().enumerate() {
        if !is_network_url(url) {
            out[i] = Some(fetch_media_until(url, policy, deadline, &stop)?);
        }
    }
    while pending > 0 {
        if cancelled() {
            return Err(EngineError::validation("the request was cancelled"));
        }
        match rx.recv_timeout(CANCEL_POLL) {
            Ok((i, result)) => {
                out[i] = Some(result?);
                pending -= 1;
            }
            // The threads' own deadline ends their fetches; this one covers a
            // DNS lookup that does not return.
            Err(mpsc::RecvTimeoutError::Timeout)
                if Instant::now().checked_duration_since(deadline) > Some(DNS_GRACE) =>
            {
                return Err(EngineError::validation(format!(
                    "fetching the request's media took longer than the media fetch deadline ({} s)",
                    policy.timeout.as_secs_f64()
                )));
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                return Err(EngineError::validation(
                    "a media fetch ended without an answer",
                ));
            }
        }
    }
    Ok(out.into_iter().flatten().collect())
}

/// How long past the deadline a fetch thread stuck in a DNS lookup (which
/// has no timeout of its own) is waited for.
const DNS_GRACE: Duration = Duration::from_secs(1);

/// `timeout` from now; a timeout too large to represent means "a year".
fn deadline_after(timeout: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(timeout)
        .unwrap_or_else(|| now + Duration::from_secs(365 * 24 * 3600))
}

fn is_network_url(url: &str) -> bool {
    let head: String = url
        .trim_start()
        .chars()
        .take(8)
        .collect::<String>()
        .to_ascii_lowercase();
    head.starts_with("http://") || head.starts_with("https://")
}

fn too_large(max: usize) -> EngineError {
    EngineError::validation(format!("media is too large (limit {max} bytes)"))
}

fn data_url(url: &str, policy: &MediaPolicy) -> Result<Vec<u8>> {
    let rest = &url[5..];
    let (header, payload) = rest.split_once(',').ok_or_else(|| {
        EngineError::validation("malformed data URL: expected data:<mime>;base64,<data>")
    })?;
    let is_base64 = header
        .rsplit(';')
        .next()
        .is_some_and(|enc| enc.trim().eq_ignore_ascii_case("base64"));
    if !is_base64 {
        return Err(EngineError::validation(
            "only base64 data URLs are supported (data:<mime>;base64,<data>)",
        ));
    }
    let cleaned: Vec<u8> = payload
        .bytes()
        .filter(|b| !b.is_ascii_whitespace())
        .collect();
    if cleaned.len() / 4 * 3 > policy.max_bytes.saturating_add(3) {
        return Err(too_large(policy.max_bytes));
    }
    let lenient = base64::engine::GeneralPurposeConfig::new()
        .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent);
    let standard = base64::engine::GeneralPurpose::new(&base64::alphabet::STANDARD, lenient);
    let url_safe = base64::engine::GeneralPurpose::new(&base64::alphabet::URL_SAFE, lenient);
    let bytes = standard
        .decode(&cleaned)
        .or_else(|e| url_safe.decode(&cleaned).map_err(|_| e))
        .map_err(|e| EngineError::validation(format!("invalid base64 in data URL: {e}")))?;
    if bytes.len() > policy.max_bytes {
        return Err(too_large(policy.max_bytes));
    }
    Ok(bytes)
}

fn check_domain(url: &url::Url, policy: &MediaPolicy) -> Result<()> {
    let Some(allowed) = &policy.allowed_domains else {
        return Ok(());
    };
    let host = url
        .host_str()
        .unwrap_or("")
        .trim_end_matches('.')
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_ascii_lowercase();
    let ok = allowed.iter().any(|d| {
        d.trim()
            .trim_end_matches('.')
            .trim_start_matches('[')
            .trim_end_matches(']')
            .eq_ignore_ascii_case(&host)
    });
    if ok {
        Ok(())
    } else {
        Err(EngineError::validation(format!(
            "the media URL's domain {host:?} is not allowed (allowed domains: {})",
            allowed.join(", ")
        )))
    }
}

/// Resolves an http(s) URL's host and keeps the addresses it may connect to:
/// all of them when private hosts are allowed, else only public ones. ureq then
/// connects to exactly these (its resolver returns them), so a second DNS answer
/// (rebinding) cannot point the connection elsewhere.
fn vetted_addresses(
    url: &str,
    current: &url::Url,
    policy: &MediaPolicy,
) -> Result<Vec<SocketAddr>> {
    let port = current.port_or_known_default().unwrap_or(80);
    let resolved: Vec<SocketAddr> = match current.host() {
        Some(url::Host::Ipv4(ip)) => vec![SocketAddr::new(IpAddr::V4(ip), port)],
        Some(url::Host::Ipv6(ip)) => vec![SocketAddr::new(IpAddr::V6(ip), port)],
        Some(url::Host::Domain(name)) => (name, port)
            .to_socket_addrs()
            .map(Iterator::collect)
            .unwrap_or_default(),
        None => Vec::new(),
    };
    if resolved.is_empty() {
        return Err(EngineError::validation(format!(
            "fetching {url} failed: the host name could not be resolved"
        )));
    }
    if policy.private_host_allowed(current) {
        return Ok(resolved);
    }
    let public: Vec<SocketAddr> = resolved
        .into_iter()
        .filter(|a| is_public_address(a.ip()))
        .collect();
    if public.is_empty() {
        return Err(EngineError::validation(format!(
            "fetching {url} failed: the host is a loopback, private, link-local or metadata address, \
             which media URLs may not name (the server allows them with --allow-private-media-hosts)"
        )));
    }
    Ok(public)
}

/// Not loopback, private, link-local (cloud metadata), CGNAT, unique-local,
/// multicast, reserved or unspecified; IPv6 forms that embed an IPv4 address
/// (mapped, compatible, NAT64, 6to4) are judged by that address.
pub fn is_public_address(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => {
            let s = v6.segments();
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public_v4(v4);
            }
            let embedded = |hi: u16, lo: u16| Ipv4Addr::from((u32::from(hi) << 16) | u32::from(lo));
            match s {
                // ::a.b.c.d (IPv4-compatible, deprecated), :: and ::1 among them.
                [0, 0, 0, 0, 0, 0, hi, lo] => is_public_v4(embedded(hi, lo)),
                // 64:ff9b::/96 (NAT64).
                [0x64, 0xff9b, 0, 0, 0, 0, hi, lo] => is_public_v4(embedded(hi, lo)),
                // 2002::/16 (6to4).
                [0x2002, hi, lo, ..] => is_public_v4(embedded(hi, lo)),
                _ => {
                    let first = s[0];
                    !(first & 0xfe00 == 0xfc00 // fc00::/7 unique local (fd00:ec2::254 metadata)
                        || first & 0xffc0 == 0xfe80 // fe80::/10 link-local
                        || first & 0xffc0 == 0xfec0 // fec0::/10 site-local (deprecated)
                        || first & 0xff00 == 0xff00) // multicast
                }
            }
        }
    }
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    let [a, b, c, _] = ip.octets();
    !(a == 0 // "this network"
        || a == 10
        || a == 127
        || (a == 100 && (64..128).contains(&b)) // CGNAT 100.64.0.0/10
        || (a == 169 && b == 254) // link-local, 169.254.169.254 metadata
        || (a == 172 && (16..32).contains(&b))
        || (a == 192 && b == 168)
        || (a == 192 && b == 0 && c == 0) // IETF protocol assignments
        || (a == 198 && (b == 18 || b == 19)) // benchmarking
        || a >= 224) // multicast, reserved, broadcast
}

fn http(url: &str, policy: &MediaPolicy, deadline: Instant, stop: &AtomicBool) -> Result<Vec<u8>> {
    let mut current = url::Url::parse(url)
        .map_err(|e| EngineError::validation(format!("invalid media URL {url:?}: {e}")))?;
    let past_deadline = || {
        EngineError::validation(format!(
            "fetching {url} failed: no complete answer within the media fetch deadline ({} s)",
            policy.timeout.as_secs_f64()
        ))
    };
    for _ in 0..=MAX_REDIRECTS {
        if !matches!(current.scheme(), "http" | "https") {
            return Err(EngineError::validation(format!(
                "fetching {url} failed: redirected to a non-http URL"
            )));
        }
        if current.host_str().is_none_or(str::is_empty) {
            return Err(EngineError::validation(format!(
                "invalid media URL {url:?}: no host"
            )));
        }
        check_domain(&current, policy)?;
        let addresses = vetted_addresses(url, &current, policy)?;
        let remaining = deadline
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
            .ok_or_else(past_deadline)?;
        let agent = ureq::AgentBuilder::new()
            .redirects(0)
            .resolver(move |_: &str| Ok(addresses.clone()))
            .build();
        let response = match agent.request_url("GET", &current).timeout(remaining).call() {
            Ok(r) => r,
            Err(ureq::Error::Status(code, _)) => {
                return Err(EngineError::validation(format!(
                    "fetching {url} failed with status {code}"
                )))
            }
            // The transport's own words (connection refused, reset, TLS...) would
            // tell a client about the server's network; it gets a generic reason.
            Err(e) => {
                tracing::debug!(%url, error = %e, "media fetch failed");
                if Instant::now() >= deadline {
                    return Err(past_deadline());
                }
                return Err(EngineError::validation(format!(
                    "fetching {url} failed: the host could not be reached or did not answer"
                )));
            }
        };
        let status = response.status();
        if (300..400).contains(&status) {
            let location = response.header("location").ok_or_else(|| {
                EngineError::validation(format!(
                    "fetching {url} failed with status {status} (no Location)"
                ))
            })?;
            current = current.join(location).map_err(|e| {
                EngineError::validation(format!("fetching {url} failed: bad redirect: {e}"))
            })?;
            continue;
        }
        if !(200..300).contains(&status) {
            return Err(EngineError::validation(format!(
                "fetching {url} failed with status {status}"
            )));
        }
        if let Some(len) = response
            .header("content-length")
            .and_then(|v| v.trim().parse::<u64>().ok())
        {
            if len > policy.max_bytes as u64 {
                return Err(too_large(policy.max_bytes));
            }
        }
        return read_body(response.into_reader(), policy, stop).map_err(|e| match e {
            BodyError::TooLarge => too_large(policy.max_bytes),
            BodyError::Stopped => EngineError::validation(format!("fetching {url} was cancelled")),
            BodyError::Io(_) if Instant::now() >= deadline => past_deadline(),
            BodyError::Io(e) => {
                tracing::debug!(%url, error = %e, "reading a media body failed");
                EngineError::validation(format!(
                    "fetching {url} failed: the connection broke while reading the answer"
                ))
            }
        });
    }
    Err(EngineError::validation(format!(
        "fetching {url} failed: more than {MAX_REDIRECTS} redirects"
    )))
}

enum BodyError {
    TooLarge,
    Stopped,
    Io(std::io::Error),
}

/// Reads a body of at most `policy.max_bytes`, in chunks, giving up as soon as
/// `stop` is set (the request is gone or a sibling fetch failed).
fn read_body(
    mut reader: impl Read,
    policy: &MediaPolicy,
    stop: &AtomicBool,
) -> Result<Vec<u8>, BodyError> {
    let mut body = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        if stop.load(Ordering::Relaxed) {
            return Err(BodyError::Stopped);
        }
        let n = match reader.read(&mut chunk) {
            Ok(0) => return Ok(body),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(BodyError::Io(e)),
        };
        if body.len() + n > policy.max_bytes {
            return Err(BodyError::TooLarge);
        }
        body.extend_from_slice(&chunk[..n]);
    }
}

fn local_file(url: &str, policy: &MediaPolicy) -> Result<Vec<u8>> {
    let Some(root) = &policy.allowed_local_path else {
        return Err(EngineError::validation(
            "local files (file:// URLs) are not allowed: the server was started without --allowed-local-media-path",
        ));
    };
    let parsed = url::Url::parse(url)
        .map_err(|e| EngineError::validation(format!("invalid file URL {url:?}: {e}")))?;
    if parsed
        .host_str()
        .is_some_and(|h| !h.is_empty() && h != "localhost")
    {
        return Err(EngineError::validation(format!(
            "file URL {url:?} names a remote host"
        )));
    }
    let path: PathBuf = parsed
        .to_file_path()
        .map_err(|()| EngineError::validation(format!("invalid file URL {url:?}")))?;
    let not_allowed = || {
        EngineError::validation(format!(
            "the file {} is not under the allowed local media path",
            path.display()
        ))
    };
    let root = root.canonicalize().map_err(|_| not_allowed())?;
    // Canonicalising resolves `..` and symlinks; a missing file reads as not allowed
    // rather than telling the client what exists outside the allowed folder.
    let real = path.canonicalize().map_err(|_| {
        if lexically_under(&path, &root) {
            EngineError::validation(format!("the file {} does not exist", path.display()))
        } else {
            not_allowed()
        }
    })?;
    if !real.starts_with(&root) {
        return Err(not_allowed());
    }
    let meta = std::fs::metadata(&real)
        .map_err(|e| EngineError::validation(format!("cannot read {}: {e}", path.display())))?;
    if !meta.is_file() {
        return Err(EngineError::validation(format!(
            "{} is not a file",
            path.display()
        )));
    }
    if meta.len() > policy.max_bytes as u64 {
        return Err(too_large(policy.max_bytes));
    }
    std::fs::read(&real)
        .map_err(|e| EngineError::validation(format!("cannot read {}: {e}", path.display())))
}

/// `path` is under `root` without following anything (no `..` components).
fn lexically_under(path: &Path, root: &Path) -> bool {
    path.starts_with(root)
        && !path
            .components()
            .any(|c| matches!(c, std::path::Component::ParentDir))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_urls() {
        let p = MediaPolicy::default();
        assert_eq!(
            fetch_media("data:image/png;base64,aGVsbG8=", &p).unwrap(),
            b"hello"
        );
        assert_eq!(
            fetch_media("data:image/png;base64,aGVsbG8", &p).unwrap(),
            b"hello"
        );
        let e = fetch_media("data:image/png;base64,@@@@", &p).unwrap_err();
        assert!(e.to_string().contains("invalid base64"), "{e}");
        let e = fetch_media("data:image/png,hello", &p).unwrap_err();
        assert!(e.to_string().contains("only base64"), "{e}");
        let small = MediaPolicy {
            max_bytes: 3,
            ..MediaPolicy::default()
        };
        let e = fetch_media("data:image/png;base64,aGVsbG8=", &small).unwrap_err();
        assert!(e.to_string().contains("too large"), "{e}");
    }

    #[test]
    fn schemes_and_domains() {
        let p = MediaPolicy {
            allowed_domains: Some(vec!["example.org".into()]),
            ..MediaPolicy::default()
        };
        let e = fetch_media("ftp://example.org/a.png", &p).unwrap_err();
        assert!(
            e.to_string().contains("unsupported media URL scheme"),
            "{e}"
        );
        let e = fetch_media("https://evil.test/a.png", &p).unwrap_err();
        assert!(e.to_string().contains("not allowed"), "{e}");
        let e = fetch_media("file:///etc/passwd", &MediaPolicy::default()).unwrap_err();
        assert!(e.to_string().contains("--allowed-local-media-path"), "{e}");
    }

    #[test]
    fn address_classes() {
        for private in [
            "127.0.0.1",
            "10.0.0.1",
            "172.16.5.4",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "224.0.0.1",
            "255.255.255.255",
            "::1",
            "::",
            "fe80::1",
            "fd00:ec2::254",
            "fc00::1",
            "ff02::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "64:ff9b::a9fe:a9fe",
            "2002:0a00:0001::1",
            "::10.0.0.1",
        ] {
            assert!(!is_public_address(private.parse().unwrap()), "{private}");
        }
        for public in [
            "8.8.8.8",
            "1.1.1.1",
            "172.32.0.1",
            "100.128.0.1",
            "2606:4700::1111",
            "::ffff:8.8.8.8",
        ] {
            assert!(is_public_address(public.parse().unwrap()), "{public}");
        }
    }
}
