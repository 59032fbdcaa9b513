//! Splitter, normaliser, fingerprint and analyser on arbitrary text, in
//! both dialects: must never panic, overflow the stack or loop.
#![no_main]

use interceptor::sql::{self, Dialect, Fingerprint, Limits, Resolution, Scratch};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut scratch = Scratch::default();
    let mut canonical = String::new();
    for dialect in [Dialect::Postgres, Dialect::Mysql] {
        let ctx = Resolution {
            dialect,
            schemas: vec!["public".into()],
            unknown: false,
        };
        for span in sql::split(&text, dialect) {
            let info = sql::normalize(span.text(&text), span.mode, span.in_exec_comment, &mut canonical, &mut scratch);
            let _ = Fingerprint::of(&canonical, dialect);
            let analysis = sql::analyze(&canonical, &info, dialect, &Limits::default());
            let _ = analysis.resolve(&ctx);
        }
    }
});
