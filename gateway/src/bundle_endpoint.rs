//! This gateway's SPIFFE bundle endpoint (`[trust.bundle_endpoint]`): serves its
//! trust domain's bundle in the SPIFFE format over HTTPS with the gateway's SVID
//! (the `https_spiffe` profile), for federated peers to fetch.
//!
//! The sequence number is the bundle file's own `spiffe_sequence` when it has one;
//! for a PEM bundle it is the store's revision of the content (Unix milliseconds
//! of its first load, and always past the previous revision), which only grows as
//! the content changes.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use http::{Method, Response, StatusCode, header};
use isthmus_federation::TrustDomain;
use isthmus_federation::trust::TlsMaterial;
use pingora_core::apps::http_app::ServeHttp;
use pingora_core::protocols::http::ServerSession;

/// Serves one trust domain's bundle at every path.
pub struct BundleEndpointApp {
    /// The material whose trust store holds the bundle.
    pub material: Arc<TlsMaterial>,
    /// This gateway's trust domain.
    pub trust_domain: TrustDomain,
    /// `spiffe_refresh_hint` to publish.
    pub refresh_hint: Duration,
}

impl BundleEndpointApp {
    /// The current bundle document, or why there is none.
    pub fn document(&self) -> Result<String, String> {
        let trust = self.material.trust();
        let domain = trust
            .get(self.trust_domain.as_str())
            .ok_or_else(|| format!("no bundle for {}", self.trust_domain))?;
        let sequence = domain.bundle.sequence.unwrap_or(domain.revision);
        domain
            .bundle
            .to_spiffe_json(sequence, Some(self.refresh_hint))
            .map_err(|e| format!("bundle {e}"))
    }
}

#[async_trait]
impl ServeHttp for BundleEndpointApp {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        // The headers are in: the next request is due from its first byte.
        crate::limits::request_done(session.stream());
        let method = session.req_header().method.clone();
        let (status, body) = if method != Method::GET && method != Method::HEAD {
            (StatusCode::METHOD_NOT_ALLOWED, b"only GET\n".to_vec())
        } else {
            match self.document() {
                Ok(doc) => (StatusCode::OK, doc.into_bytes()),
                Err(e) => (StatusCode::SERVICE_UNAVAILABLE, e.into_bytes()),
            }
        };
        let length = body.len();
        let body = if method == Method::HEAD {
            Vec::new()
        } else {
            body
        };
        Response::builder()
            .status(status)
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::CONTENT_LENGTH, length)
            .header(header::CACHE_CONTROL, "no-store")
            .body(body)
            .unwrap_or_else(|_| Response::new(Vec::new()))
    }
}
