//! One new stream of a registered connection: read its first frame within
//! `auth_timeout_secs` and hand the stream to what that frame makes it
//! (`core::admission::first_frame`): an agent stream or a control stream.

use std::sync::Arc;
use std::time::Duration;

use tracing::{debug_span, Instrument};

use super::hub::{ConnInfo, Hub};
use crate::core::admission::{self, FirstFrame};
use agent_link_proto::ErrorCode;
use agent_link_quic::frames::refuse_stream;
use agent_link_quic::frames::FrameReader;

/// Serve a stream the peer opened until it ends.
pub(crate) async fn serve_stream(
    hub: Arc<Hub>,
    info: Arc<ConnInfo>,
    mut send: quinn::SendStream,
    recv: quinn::RecvStream,
) {
    let mut reader = FrameReader::new(recv, hub.config().max_frame());
    reader.set_frame_timeout(hub.config().frame_timeout());
    let auth = Duration::from_secs(hub.config().auth_timeout_secs);
    let first = match tokio::time::timeout(auth, reader.next()).await {
        Ok(Ok(Some(b))) => b,
        Ok(Ok(None)) => return,
        Ok(Err(e)) => {
            if let Some(code) = e.code() {
                hub.refused(code);
                refuse_stream(&mut send, code).await;
            }
            return;
        }
        Err(_) => {
            hub.refused(ErrorCode::AuthTimeout);
            refuse_stream(&mut send, ErrorCode::AuthTimeout).await;
            return;
        }
    };
    match admission::first_frame(&first) {
        FirstFrame::Agent { agent, receive } => {
            let agent = agent.to_string();
            let span = debug_span!("agent", instance = %info.instance, %agent, receive);
            super::agent::serve_agent(hub, info, send, reader, agent, receive)
                .instrument(span)
                .await
        }
        // Boxed: a control stream is rare, and its state would otherwise
        // size every agent stream's task (see `serve_agent`).
        FirstFrame::Control => {
            Box::pin(super::control::serve_control(
                hub,
                info,
                send,
                reader,
                Some(first),
            ))
            .await
        }
        FirstFrame::Refuse(code) => {
            hub.refused(code);
            refuse_stream(&mut send, code).await;
        }
    }
}
