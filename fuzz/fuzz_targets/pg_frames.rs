//! PostgreSQL framing on arbitrary client bytes: the startup packet, then
//! tagged messages and the typed views the agent decodes. Must never panic
//! or allocate past the limit.
#![no_main]

use bytes::BytesMut;
use interceptor::protocol::postgres::codec;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut buf = BytesMut::from(data);
    let _ = codec::decode_startup(&mut buf.clone());
    while let Ok(Some(frame)) = codec::decode_frame(&mut buf, 1 << 20) {
        let body = frame.body();
        let _ = codec::query_sql(body);
        let _ = codec::parse_message(body);
        let _ = codec::function_call_oid(body);
        let _ = codec::error_fields(body);
        let _ = codec::backend_key(body);
    }
});
