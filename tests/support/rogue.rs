//! A hand-driven peer: the real peering client over real mTLS, holding a
//! real SVID, that sends whatever a test (or an attacker) wants to a real
//! gateway and reads its verdicts.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use isthmus_federation::peering::PeerTarget;
use isthmus_federation::peering::proto::{self, peer_message::Kind};
use isthmus_federation::peering::transport::client;
use isthmus_federation::trust::tls::crypto_provider;
use isthmus_federation::trust::{
    BundleSource, DomainTrust, HandshakeMetrics, SpiffeConnector, Svid, TlsMaterial, TrustBundle,
    TrustStore,
};
use tokio::sync::mpsc;
use tokio_stream::StreamExt;

use crate::mesh::Member;

/// Largest message the rogue peer sends or takes.
const MAX_MESSAGE_BYTES: usize = 64 << 20;

/// A peering session driven by hand.
pub struct RoguePeer {
    tx: mpsc::Sender<proto::PeerMessage>,
    inbound: tonic::Streaming<proto::PeerMessage>,
}

/// A message of `kind`.
pub fn msg(kind: Kind) -> proto::PeerMessage {
    proto::PeerMessage { kind: Some(kind) }
}

/// The hello `member` would send, claiming `cluster` and `east_west`.
pub fn hello(member: &Member, cluster: &str, east_west: &str) -> proto::Hello {
    proto::Hello {
        protocol_version: 1,
        spiffe_id: member.spiffe_id(),
        cluster: cluster.into(),
        trust_domain: member.td(),
        locality: Some(proto::Locality {
            region: "test".into(),
            ..Default::default()
        }),
        east_west_address: east_west.into(),
        incarnation: 7,
        lease_millis: 60_000,
        labels: Default::default(),
        ..Default::default()
    }
}

/// `namespace/name` on HTTP port 80, exported by `cluster` at `time`.
pub fn service(namespace: &str, name: &str, cluster: &str, time: u64) -> proto::ExportedService {
    proto::ExportedService {
        namespace: namespace.into(),
        name: name.into(),
        ports: vec![proto::ServicePort {
            port: 80,
            protocol: "http".into(),
            name: String::new(),
        }],
        export_time_millis: time,
        origin_cluster: cluster.into(),
        headless: false,
        endpoints: vec![],
        subsets: vec![],
    }
}

impl RoguePeer {
    /// Connects to `victim`'s federation listener with the SVID in `tls`
    /// (`svid.crt`, `svid.key`), trusting `victim`'s bundle, and sends
    /// `hello`.
    pub async fn connect(victim: &Member, tls: &Path, hello: proto::Hello) -> Result<Self> {
        let provider = crypto_provider();
        let svid = Svid::from_pem(
            &std::fs::read(tls.join("svid.crt"))?,
            &std::fs::read(tls.join("svid.key"))?,
            None,
            &provider,
        )?;
        let bundle = TrustBundle::parse(
            victim.td().parse()?,
            &std::fs::read(victim.ca.join("bundle.pem"))?,
        )?;
        let store = TrustStore::default().with(DomainTrust::new(
            bundle,
            BundleSource::File("victim".into()),
            &provider,
        )?);
        let connector = SpiffeConnector::new(
            TlsMaterial::new(svid, store, provider),
            HandshakeMetrics::new(&prometheus::Registry::new())?,
            Duration::from_secs(5),
            vec![],
        );
        let target = PeerTarget {
            address: victim.federation,
            spiffe_id: victim.spiffe_id().parse()?,
        };
        let mut grpc = client(
            &target,
            &connector,
            Duration::from_secs(5),
            MAX_MESSAGE_BYTES,
        )
        .await
        .map_err(anyhow::Error::msg)?;
        let (tx, rx) = mpsc::channel(16);
        tx.send(msg(Kind::Hello(hello))).await?;
        let inbound = grpc
            .peer(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await?
            .into_inner();
        Ok(Self { tx, inbound })
    }

    /// Sends `kind`.
    pub async fn send(&self, kind: Kind) -> Result<()> {
        self.send_raw(msg(kind)).await
    }

    /// Sends `message` as it is (even one without a kind).
    pub async fn send_raw(&self, message: proto::PeerMessage) -> Result<()> {
        self.tx.send(message).await.context("stream open")
    }

    /// Reads until the first ACK or NACK.
    pub async fn verdict(&mut self) -> Result<Kind> {
        loop {
            let next = tokio::time::timeout(Duration::from_secs(5), self.inbound.next())
                .await
                .context("a reply in time")?
                .context("stream open")??;
            if let Some(kind @ (Kind::Ack(_) | Kind::Nack(_))) = next.kind {
                return Ok(kind);
            }
        }
    }

    /// Reads until the stream ends, returning the NACKs seen on the way
    /// (a refused hello is a NACK, then the end).
    pub async fn nacks_until_closed(&mut self) -> Result<Vec<proto::Nack>> {
        let mut nacks = Vec::new();
        loop {
            let next = tokio::time::timeout(Duration::from_secs(5), self.inbound.next())
                .await
                .context("the stream to end in time")?;
            match next {
                None | Some(Err(_)) => return Ok(nacks),
                Some(Ok(proto::PeerMessage {
                    kind: Some(Kind::Nack(n)),
                })) => nacks.push(n),
                Some(Ok(_)) => {}
            }
        }
    }
}
