//! The HTTP client that talks to the CA: the CA bundle or the platform's roots, a resolver
//! that never connects to an internal address, and the CA's last `Retry-After`.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::Request;
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::connect::dns::Name;
use hyper_util::rt::TokioExecutor;
use instant_acme::{BodyWrapper, BytesResponse, HttpClient};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

use super::Failure;
use crate::validate::{self, Internal};

/// How long one HTTP request to the CA may take before it counts as "CA unreachable".
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// The HTTP client for the CA: rustls with ring, trusting the platform's roots, or only the
/// stack's `caBundleSecretRef` when one is set (as cert-manager does for a private ACME
/// server). It remembers the last `Retry-After` the CA sent, which instant-acme does not
/// surface with a rate-limit error.
///
/// It never connects to an internal address (issue 14, item 8): every host name is resolved
/// by [`GuardedResolver`], which refuses a name with any loopback, link-local (the cloud
/// metadata service) or unspecified address, and connects only to the addresses it checked
/// (no second lookup a changed DNS answer could slip through); a URL with such an address
/// written as a literal (the directory can name any URL for its other resources) is refused
/// before any connection. Loopback is allowed with `--allow-loopback-acme-directory`.
#[derive(Clone)]
pub struct CaClient {
    inner: HyperClient<
        hyper_rustls::HttpsConnector<HttpConnector<GuardedResolver>>,
        BodyWrapper<Bytes>,
    >,
    last_retry_after: Arc<Mutex<Option<SystemTime>>>,
    allow_loopback: bool,
}

/// A connection the CA client refused because of where it would have gone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RefusedAddress {
    pub host: String,
    pub ip: IpAddr,
    pub internal: Internal,
}

impl std::fmt::Display for RefusedAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.host == self.ip.to_string() {
            write!(f, "the CA's URL names {}, {}", self.ip, self.internal.why())
        } else {
            write!(
                f,
                "the CA's host {:?} resolves to {}, {}",
                self.host,
                self.ip,
                self.internal.why()
            )
        }
    }
}

impl std::error::Error for RefusedAddress {}

/// The first address of `addrs` the operator must not connect to (loopback only when
/// `allow_loopback` is false), as the error that refuses `host`.
pub fn refuse_internal(
    host: &str,
    addrs: impl IntoIterator<Item = IpAddr>,
    allow_loopback: bool,
) -> Result<(), RefusedAddress> {
    for ip in addrs {
        match validate::internal_ip(ip) {
            None => {}
            Some(Internal::Loopback) if allow_loopback => {}
            Some(internal) => {
                return Err(RefusedAddress {
                    host: host.to_string(),
                    ip,
                    internal,
                });
            }
        }
    }
    Ok(())
}

/// The CA client's name resolver: the system's (`getaddrinfo`, as hyper's default), then
/// [`refuse_internal`] on all the addresses of the name.
#[derive(Clone, Debug)]
pub struct GuardedResolver {
    allow_loopback: bool,
}

impl tower_service::Service<Name> for GuardedResolver {
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = Box<dyn std::error::Error + Send + Sync>;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, name: Name) -> Self::Future {
        let allow_loopback = self.allow_loopback;
        Box::pin(async move {
            let host = name.as_str().to_string();
            // The port is set by the connector afterwards.
            let addrs: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            refuse_internal(&host, addrs.iter().map(|a| a.ip()), allow_loopback)?;
            Ok(addrs.into_iter())
        })
    }
}

impl CaClient {
    /// A client trusting `ca_bundle` (PEM) only, or the platform's roots without one; it
    /// connects to loopback addresses only when `allow_loopback`.
    pub fn new(ca_bundle: Option<&[u8]>, allow_loopback: bool) -> Result<CaClient, Failure> {
        let builder = hyper_rustls::HttpsConnectorBuilder::new();
        let builder = match ca_bundle {
            Some(pem) => {
                let mut roots = rustls::RootCertStore::empty();
                for cert in CertificateDer::pem_slice_iter(pem) {
                    let cert = cert.map_err(|e| {
                        Failure::config(format!("the CA bundle is not valid PEM: {e}"))
                    })?;
                    roots.add(cert).map_err(|e| {
                        Failure::config(format!("the CA bundle holds an unusable certificate: {e}"))
                    })?;
                }
                if roots.is_empty() {
                    return Err(Failure::config("the CA bundle holds no certificate"));
                }
                let config = rustls::ClientConfig::builder_with_provider(Arc::new(
                    rustls::crypto::ring::default_provider(),
                ))
                .with_safe_default_protocol_versions()
                .map_err(|e| Failure::config(format!("TLS setup: {e}")))?
                .with_root_certificates(roots)
                .with_no_client_auth();
                builder.with_tls_config(config)
            }
            None => builder.try_with_platform_verifier().map_err(|e| {
                Failure::config(format!("cannot load the platform's CA roots: {e}"))
            })?,
        };
        let mut http = HttpConnector::new_with_resolver(GuardedResolver { allow_loopback });
        // The https connector refuses plain `http://` itself.
        http.enforce_http(false);
        let connector = builder
            .https_only()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http);
        Ok(CaClient {
            inner: HyperClient::builder(TokioExecutor::new()).build(connector),
            last_retry_after: Arc::default(),
            allow_loopback,
        })
    }

    /// The `Retry-After` of the CA's last error response, if it sent one.
    pub fn last_retry_after(&self) -> Option<SystemTime> {
        *self.last_retry_after.lock().unwrap()
    }
}

impl HttpClient for CaClient {
    fn request(
        &self,
        req: Request<BodyWrapper<Bytes>>,
    ) -> Pin<Box<dyn Future<Output = Result<BytesResponse, instant_acme::Error>> + Send>> {
        // A literal address skips the resolver.
        let literal = req.uri().host().and_then(|h| {
            h.trim_start_matches('[')
                .trim_end_matches(']')
                .parse::<IpAddr>()
                .ok()
        });
        if let Some(ip) = literal
            && let Err(refused) = refuse_internal(&ip.to_string(), [ip], self.allow_loopback)
        {
            return Box::pin(async move { Err(instant_acme::Error::Other(Box::new(refused))) });
        }
        let fut = self.inner.request(req);
        let slot = self.last_retry_after.clone();
        Box::pin(async move {
            let response = match tokio::time::timeout(REQUEST_TIMEOUT, fut).await {
                Ok(Ok(response)) => response,
                Ok(Err(e)) => {
                    // The resolver's refusal, as itself rather than "client error (Connect)".
                    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&e);
                    while let Some(s) = source {
                        if let Some(refused) = s.downcast_ref::<RefusedAddress>() {
                            return Err(instant_acme::Error::Other(Box::new(refused.clone())));
                        }
                        source = s.source();
                    }
                    return Err(instant_acme::Error::Other(Box::new(e)));
                }
                Err(_) => {
                    return Err(instant_acme::Error::Other(
                        format!("no answer within {}s", REQUEST_TIMEOUT.as_secs()).into(),
                    ));
                }
            };
            if response.status().is_client_error() || response.status().is_server_error() {
                let retry_after = response
                    .headers()
                    .get(http::header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| parse_retry_after(v, SystemTime::now()));
                *slot.lock().unwrap() = retry_after;
            }
            Ok(BytesResponse::from(response))
        })
    }
}

/// `Retry-After` as seconds or an HTTP date (RFC 9110 section 10.2.3).
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<SystemTime> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(now + Duration::from_secs(secs));
    }
    // IMF-fixdate: "Sun, 06 Nov 1994 08:49:37 GMT".
    let parsed = k8s_openapi::jiff::fmt::rfc2822::parse(value).ok()?;
    let secs = parsed.timestamp().as_second();
    (secs >= 0).then(|| SystemTime::UNIX_EPOCH + Duration::from_secs(secs as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_of_a_ca_host_on_loopback_or_link_local_are_refused() {
        let ips =
            |list: &[&str]| -> Vec<IpAddr> { list.iter().map(|a| a.parse().unwrap()).collect() };
        assert_eq!(
            refuse_internal(
                "ca.example",
                ips(&["192.0.2.7", "10.1.2.3", "2001:db8::1"]),
                false
            ),
            Ok(())
        );
        // One bad address among good ones refuses the name (a round-robin answer would reach
        // it sooner or later).
        let refused = refuse_internal("ca.example", ips(&["192.0.2.7", "169.254.169.254"]), true)
            .unwrap_err();
        assert_eq!(refused.internal, Internal::LinkLocal);
        assert_eq!(
            refused.to_string(),
            "the CA's host \"ca.example\" resolves to 169.254.169.254, a link-local address: the \
             node's own services and the cloud metadata service (169.254.169.254) live there, and \
             the operator never fetches from them"
        );
        for (addr, allowed) in [
            ("127.0.0.1", true),
            ("::1", true),
            ("::ffff:127.0.0.2", true),
            ("fe80::1", false),
            ("fd00:ec2::254", false),
            ("0.0.0.0", false),
            ("::", false),
        ] {
            assert!(refuse_internal("h", ips(&[addr]), false).is_err(), "{addr}");
            assert_eq!(
                refuse_internal("h", ips(&[addr]), true).is_ok(),
                allowed,
                "{addr}"
            );
        }
        let literal = refuse_internal("127.0.0.1", ips(&["127.0.0.1"]), false).unwrap_err();
        assert!(
            literal
                .to_string()
                .starts_with("the CA's URL names 127.0.0.1, a loopback address"),
            "{literal}"
        );
    }

    #[tokio::test]
    async fn a_url_with_an_internal_literal_address_is_refused_before_connecting() {
        let http = CaClient::new(None, false).unwrap();
        let request = |uri: &str| {
            Request::get(uri)
                .body(BodyWrapper::from(Vec::new()))
                .unwrap()
        };
        for uri in [
            "https://169.254.169.254/x",
            "https://[::1]:9/x",
            "https://[fe80::1]/x",
        ] {
            let e = http.request(request(uri)).await.err().unwrap();
            let f = Failure::from_acme("fetching the order", e, &http);
            assert_eq!(f.kind, super::super::FailureKind::Config, "{uri}");
            assert!(
                f.message
                    .contains("nothing was sent to it (while fetching the order)"),
                "{uri}: {}",
                f.message
            );
        }
    }

    #[test]
    fn retry_after_seconds_and_dates() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        assert_eq!(
            parse_retry_after("120", now),
            Some(now + Duration::from_secs(120))
        );
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:49:37 GMT", now),
            Some(SystemTime::UNIX_EPOCH + Duration::from_secs(784_111_777))
        );
        assert_eq!(parse_retry_after("soon", now), None);
    }
}
