//! Small HTTP/1.1 helpers on hyper: a server loop, a GET client, and the demo
//! services' endpoints.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};

use super::members::{EndpointSpec, MEMBERS, NAMESPACE};

/// A response body.
pub(super) type Body = Full<Bytes>;

/// A response with `status` and a JSON (or text) `body` ending in a newline.
pub(super) fn reply(status: StatusCode, body: String) -> Response<Body> {
    let mut body = body;
    if !body.ends_with('\n') {
        body.push('\n');
    }
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    response
}

/// Serves HTTP/1.1 on `listener` with `handler` until the runtime stops.
pub(super) async fn serve<F, Fut>(listener: TcpListener, handler: F)
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<Body>> + Send + 'static,
{
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let handler = handler.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let handler = handler.clone();
                async move { Ok::<_, Infallible>(handler(req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// `GET path` from `addr`; the status and the body as text.
pub(super) async fn get(addr: SocketAddr, path: &str) -> Result<(u16, String), String> {
    let exchange = async {
        let stream = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        let request = Request::get(path)
            .header(header::HOST, addr.to_string())
            .body(Empty::<Bytes>::new())
            .map_err(|e| e.to_string())?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| e.to_string())?;
        let status = response.status().as_u16();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    };
    tokio::time::timeout(Duration::from_secs(5), exchange)
        .await
        .map_err(|_| format!("no answer from {addr} within 5s"))?
}

/// Starts one demo endpoint on a free 127.0.0.1 port: every request gets a
/// one-line JSON saying which service, cluster, locality and version answered.
pub(super) async fn start_endpoint(spec: &'static EndpointSpec) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let member = &MEMBERS[spec.member];
    let doc = serde_json::json!({
        "service": format!("{NAMESPACE}/{}", spec.service),
        "cluster": member.cluster,
        "region": member.region,
        "zone": member.zone,
        "version": spec.version,
    })
    .to_string();
    tokio::spawn(serve(listener, move |_req| {
        let doc = doc.clone();
        async move { reply(StatusCode::OK, doc) }
    }));
    Ok(addr)
}
