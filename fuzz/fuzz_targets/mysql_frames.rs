//! MySQL framing on arbitrary peer bytes: multi-packet messages, sequence
//! ids, and the handshake and reply views the agent decodes. Must never
//! panic or allocate past the limit.
#![no_main]

use bytes::BytesMut;
use interceptor::protocol::mysql::codec;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut buf = BytesMut::from(data);
    let mut seq = 0u8;
    while let Ok(Some(msg)) = codec::decode_message(&mut buf, seq, 1 << 20) {
        seq = msg.last_seq.wrapping_add(1);
        let mut payload = msg.payload().into_owned();
        let _ = codec::err_fields(&payload);
        let _ = codec::ok_status(&payload);
        let _ = codec::prepare_ok(&payload);
        let _ = codec::statement_id(&payload);
        let _ = codec::change_user(&payload, u64::MAX);
        let _ = codec::adjust_greeting(&mut payload.clone());
        let _ = codec::adjust_handshake_response(&mut payload);
    }
});
