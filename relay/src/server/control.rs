//! Control streams: status requests and (idempotent) registration from an
//! already registered connection.

use std::sync::Arc;

use agent_link_proto::{codec, ErrorCode, InstanceStatus, PeerToRelay, RelayToPeer};
use bytes::Bytes;

use crate::connection::ConnCtx;
use crate::framed::{frame, refuse_stream, FrameReader};
use crate::server::Shared;

/// Serve a control stream; `first` is a frame already read from it.
pub(crate) async fn run(
    shared: Arc<Shared>,
    ctx: Arc<ConnCtx>,
    mut send: quinn::SendStream,
    mut reader: FrameReader,
    mut first: Option<Bytes>,
) {
    loop {
        let body = match first.take() {
            Some(b) => b,
            None => match reader.next().await {
                Ok(Some(b)) => b,
                Ok(None) => {
                    let _ = send.finish();
                    return;
                }
                Err(e) => {
                    if let Some(code) = e.code() {
                        shared.stats.refused(code);
                        refuse_stream(&mut send, code).await;
                    }
                    return;
                }
            },
        };
        let reply = match codec::decode::<PeerToRelay>(&body) {
            Ok(PeerToRelay::StatusRequest) => status(&shared, &ctx),
            Ok(PeerToRelay::Register {
                instance_id,
                name,
                proof,
            }) => {
                if instance_id != ctx.instance {
                    Err(ErrorCode::InstanceIdTaken)
                } else {
                    crate::connection::register(
                        &shared,
                        &ctx.conn,
                        &ctx.key,
                        instance_id,
                        name,
                        &proof,
                    )
                    .await
                    .map(|id| frame(&RelayToPeer::Registered { instance_id: &id }))
                }
            }
            _ => Err(ErrorCode::Malformed),
        };
        match reply {
            Ok(bytes) => {
                if send.write_all(&bytes).await.is_err() {
                    return;
                }
            }
            Err(code) => {
                shared.stats.refused(code);
                refuse_stream(&mut send, code).await;
                return;
            }
        }
    }
}

fn status(shared: &Shared, ctx: &ConnCtx) -> Result<Bytes, ErrorCode> {
    let online = shared.router.snapshot();
    let reg = shared.registry();
    let mut instances = Vec::new();
    let mut you = None;
    for rec in reg.records().iter().filter(|r| !r.revoked) {
        let Ok(pk) = rec.public_key.parse::<agent_link_crypto::PublicKey>() else {
            continue;
        };
        let st = InstanceStatus {
            instance_id: rec.instance_id.clone(),
            name: rec.name.clone(),
            public_key: pk.0,
            online: online.contains_key(&rec.instance_id),
            agents: online.get(&rec.instance_id).cloned().unwrap_or_default(),
        };
        if rec.instance_id == ctx.instance {
            you = Some(st.clone());
        }
        instances.push(st);
    }
    let you = you.ok_or(ErrorCode::NotRegistered)?;
    Ok(frame(&RelayToPeer::Status { you, instances }))
}
