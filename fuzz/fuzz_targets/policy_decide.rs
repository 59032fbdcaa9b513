//! Whole decisions, with session effects (PREPARE/EXECUTE, search_path,
//! USE) carried across the statements of one input.
#![no_main]

use std::{path::Path, sync::OnceLock};

use interceptor::{
    identity::Identity,
    policy::{DecisionRequest, Engine, PolicyFile, SessionState},
};
use libfuzzer_sys::fuzz_target;

const POLICY: &str = r#"
version: 1
default: deny
on_parse_error: deny
targets:
  - {name: pg, protocol: postgres, address: 127.0.0.1:5432}
  - {name: my, protocol: mysql, address: 127.0.0.1:3306}
rules:
  - {name: dangerous, flags: [file_access, program_exec, role_change, remote_access, admin], decision: deny}
  - {name: bounded, kinds: [select], tables: ["public.*", "shop.*"], max_limit: 100, decision: allow}
  - {name: session, kinds: [tcl, session], decision: allow}
"#;

fn engine() -> &'static Engine {
    static E: OnceLock<Engine> = OnceLock::new();
    E.get_or_init(|| {
        let file = PolicyFile::parse(POLICY, Path::new("fuzz")).unwrap_or_else(|e| panic!("{e}"));
        Engine::new(file).unwrap_or_else(|e| panic!("{e}"))
    })
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let e = engine();
    let id = Identity::default();
    let binding = e.bind_identity(&id);
    for target in ["pg", "my"] {
        let mut session = SessionState::default();
        // Each line is one query message of the same session.
        for message in text.split('\n') {
            let req = DecisionRequest {
                identity: &id,
                binding: &binding,
                target,
                db_user: "app",
                database: "shop",
                sql: message,
            };
            let v = e.decide(&req, &mut session);
            assert_eq!(v.statements.len(), v.details.len());
        }
    }
});
