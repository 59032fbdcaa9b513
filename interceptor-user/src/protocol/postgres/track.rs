//! Which server reply answers which client message, so that each
//! execution's end (rows, error) reaches the audit log.
//!
//! The server answers the messages of one connection strictly in order:
//! Parse with ParseComplete, Bind with BindComplete, Describe with
//! RowDescription or NoData, Execute with DataRows and CommandComplete,
//! PortalSuspended or EmptyQueryResponse, Close with CloseComplete, Sync
//! and Query with ReadyForQuery. After an error it skips every message up
//! to the next Sync. So a queue of what the client sent, popped as the
//! server's answers come, says what each answer belongs to. Only headers
//! and the short messages that matter are read (the names at the start of
//! Bind, Execute and Close; CommandComplete's tag; ErrorResponse's code);
//! the bytes relayed are not touched.

use std::{
    collections::{HashMap, VecDeque},
    time::Instant,
};

use super::codec::error_fields;
use crate::proxy::{Completion, ExecLog, Prepared, ServerError, Unanswered, command_tag_rows};

/// Bytes of a Bind read for its portal and statement names (PostgreSQL
/// keeps names of up to 63 bytes); a Bind whose names do not fit is
/// counted against an unknown statement.
pub(super) const BIND_PREFIX: usize = 1024;

/// A client message waiting for its answer.
enum Expect {
    /// A Parse, with the decision that let it through (`None`: a stand-in).
    Parse(Option<u64>),
    Bind,
    Describe,
    Execute {
        prepared: Prepared,
        started: Instant,
    },
    /// Close of a statement (its summary is written at CloseComplete) or a
    /// portal.
    Close(Option<Prepared>),
    Sync,
    /// A simple Query; its statements' records wait for their answers.
    Query(Option<Unanswered>),
    FunctionCall,
    /// CopyDone or CopyFail: ends a COPY FROM STDIN, during which the
    /// server ignores Sync (drivers send one with the Execute, before they
    /// know it starts a copy).
    CopyDone,
}

pub(super) struct Tracker {
    log: ExecLog,
    expect: VecDeque<Expect>,
    /// Prepared statements by name, as the client defined them.
    statements: HashMap<Vec<u8>, Prepared>,
    /// Portals by name: the statement each was bound to.
    portals: HashMap<Vec<u8>, Prepared>,
    /// DataRows since the last completion.
    rows: u64,
    /// The server is in copy-in mode (CopyInResponse seen).
    copy_in: bool,
    /// The `query` records of the last Parse allowed, waiting for the
    /// statement's first execution in the same Sync group to be written
    /// with its answer (see `Guard::check_parse`); written as decided at
    /// the group's ReadyForQuery if it did not run.
    first: Option<(Prepared, Unanswered)>,
}

fn name(body: &[u8]) -> Option<(&[u8], &[u8])> {
    let end = body.iter().position(|b| *b == 0)?;
    Some((&body[..end], &body[end + 1..]))
}

fn set(map: &mut HashMap<Vec<u8>, Prepared>, key: &[u8], value: Prepared) {
    // The unnamed statement and portal are redefined all the time: no
    // allocation for a key already there.
    if let Some(v) = map.get_mut(key) {
        *v = value;
    } else {
        map.insert(key.to_vec(), value);
    }
}

impl Tracker {
    pub(super) fn new(log: ExecLog) -> Self {
        Self {
            log,
            expect: VecDeque::new(),
            statements: HashMap::new(),
            portals: HashMap::new(),
            rows: 0,
            copy_in: false,
            first: None,
        }
    }

    /// A Parse went to the server: `prepared` when allowed, `None` when
    /// a stand-in that fails replaced it; `records`, its `query` records
    /// when they wait for its first execution.
    pub(super) fn parse(
        &mut self,
        statement: &[u8],
        prepared: Option<Prepared>,
        records: Option<Unanswered>,
    ) {
        if let Some((_, earlier)) = self.first.take() {
            earlier.decided();
        }
        match prepared {
            Some(p) => {
                set(&mut self.statements, statement, p);
                self.first = records.map(|r| (p, r));
            }
            None => {
                self.statements.remove(statement);
            }
        }
        self.expect
            .push_back(Expect::Parse(prepared.map(|p| p.decision)));
    }

    /// An execution of `prepared` ended: into its Parse's records when it
    /// is the first, else into the execution log.
    fn executed(&mut self, prepared: Prepared, done: Completion, started: Instant) {
        if prepared.decision != 0
            && self
                .first
                .as_ref()
                .is_some_and(|(p, _)| p.decision == prepared.decision)
            && let Some((_, records)) = self.first.take()
        {
            records.executed(done, self.log.folded(prepared));
        } else {
            self.log.executed(prepared, done, started);
        }
    }

    /// A simple Query went to the server (its records, when allowed).
    pub(super) fn query(&mut self, records: Option<Unanswered>) {
        self.expect.push_back(Expect::Query(records));
    }

    pub(super) fn function_call(&mut self) {
        self.expect.push_back(Expect::FunctionCall);
    }

    /// Any other client message: `body` is as much of it as the caller
    /// read (all of it for Execute and Close, up to [`BIND_PREFIX`] bytes
    /// for Bind).
    pub(super) fn client(&mut self, tag: u8, body: &[u8]) {
        match tag {
            b'B' => {
                let (portal, statement) = match name(body) {
                    Some((portal, rest)) => (portal, name(rest).map(|(s, _)| s)),
                    None => (&body[..0], None),
                };
                let prepared = statement
                    .and_then(|s| self.statements.get(s).copied())
                    .unwrap_or(Prepared::UNKNOWN);
                set(&mut self.portals, portal, prepared);
                self.expect.push_back(Expect::Bind);
            }
            b'E' => {
                let prepared = name(body)
                    .and_then(|(portal, _)| self.portals.get(portal).copied())
                    .unwrap_or(Prepared::UNKNOWN);
                self.expect.push_back(Expect::Execute {
                    prepared,
                    started: Instant::now(),
                });
            }
            b'D' => self.expect.push_back(Expect::Describe),
            b'C' => {
                let closed = match body.split_first() {
                    Some((b'S', rest)) => name(rest).and_then(|(n, _)| self.statements.remove(n)),
                    Some((b'P', rest)) => {
                        if let Some((n, _)) = name(rest) {
                            self.portals.remove(n);
                        }
                        None
                    }
                    _ => None,
                };
                self.expect.push_back(Expect::Close(closed));
            }
            b'S' => self.expect.push_back(Expect::Sync),
            b'c' | b'f' => self.expect.push_back(Expect::CopyDone),
            _ => {}
        }
    }

    /// A server message: its tag, and its body for CommandComplete,
    /// ErrorResponse (`None` when too large to read).
    pub(super) fn server(&mut self, tag: u8, body: Option<&[u8]>) {
        // A CopyDone of no copy the server saw is no answer's.
        while !self.copy_in && matches!(self.expect.front(), Some(Expect::CopyDone)) {
            self.expect.pop_front();
        }
        match tag {
            b'G' | b'W' => self.copy_in = true,
            b'D' => self.rows += 1,
            b'1' => self.pop_if(|e| matches!(e, Expect::Parse(_))),
            b'2' => self.pop_if(|e| matches!(e, Expect::Bind)),
            b'T' | b'n' => self.pop_if(|e| matches!(e, Expect::Describe)),
            b'3' => {
                if let Some(Expect::Close(_)) = self.expect.front()
                    && let Some(Expect::Close(Some(p))) = self.expect.pop_front()
                {
                    self.log.closed(p);
                }
            }
            b'C' => {
                let tagged = body.and_then(command_tag_rows);
                let rows = tagged.or((self.rows > 0).then_some(self.rows));
                self.complete(Completion::rows(rows));
            }
            b's' => {
                let rows = Some(self.rows);
                self.complete(Completion::rows(rows));
            }
            b'I' => self.complete(Completion::rows(None)),
            b'E' => {
                let code = body.and_then(|b| error_fields(b).code);
                self.error(ServerError::postgres(code));
            }
            b'Z' => {
                self.rows = 0;
                while let Some(e) = self.expect.pop_front() {
                    match e {
                        Expect::Sync | Expect::FunctionCall => break,
                        Expect::Query(records) => {
                            if let Some(r) = records {
                                r.finish();
                            }
                            break;
                        }
                        Expect::Execute { prepared, started } => {
                            // Not answered before ReadyForQuery: the
                            // agent lost track; count it all the same.
                            self.executed(prepared, Completion::Unfinished, started);
                        }
                        _ => {}
                    }
                }
                // The group is over: a statement parsed and not run in it.
                if let Some((_, records)) = self.first.take() {
                    records.decided();
                }
            }
            _ => {}
        }
    }

    fn pop_if(&mut self, want: impl Fn(&Expect) -> bool) {
        if self.expect.front().is_some_and(want) {
            self.expect.pop_front();
        }
    }

    /// A copy ended: the Syncs sent during it were ignored by the server,
    /// and its CopyDone has no answer.
    fn end_copy(&mut self) {
        if !std::mem::take(&mut self.copy_in) {
            return;
        }
        let Some(end) = self
            .expect
            .iter()
            .position(|e| matches!(e, Expect::CopyDone))
        else {
            return;
        };
        let mut i = 0;
        self.expect.retain(|e| {
            let keep = i > end || !matches!(e, Expect::Sync | Expect::CopyDone);
            i += 1;
            keep
        });
    }

    /// An Execute, or a statement of the Query in progress, is complete.
    fn complete(&mut self, done: Completion) {
        self.end_copy();
        self.rows = 0;
        match self.expect.front_mut() {
            Some(Expect::Execute { .. }) => {
                if let Some(Expect::Execute { prepared, started }) = self.expect.pop_front() {
                    self.executed(prepared, done, started);
                }
            }
            Some(Expect::Query(Some(records))) => records.answer(done),
            _ => {}
        }
    }

    fn error(&mut self, e: ServerError) {
        self.end_copy();
        self.rows = 0;
        match self.expect.front_mut() {
            None | Some(Expect::Sync | Expect::FunctionCall | Expect::Query(None)) => {}
            Some(Expect::Query(Some(records))) => records.answer(Completion::error(e)),
            Some(_) => {
                match self.expect.pop_front() {
                    Some(Expect::Execute { prepared, started }) => {
                        self.executed(prepared, Completion::error(e), started);
                    }
                    // The server refused the Parse: its record says so
                    // (when it still waits: a later Parse wrote it).
                    Some(Expect::Parse(Some(decision)))
                        if self
                            .first
                            .as_ref()
                            .is_some_and(|(p, _)| p.decision == decision) =>
                    {
                        if let Some((_, records)) = self.first.take() {
                            records.executed(Completion::error(e), None);
                        }
                    }
                    _ => {}
                }
                // The server skips everything up to the next Sync.
                while self.expect.front().is_some_and(|e| {
                    !matches!(e, Expect::Sync | Expect::Query(_) | Expect::FunctionCall)
                }) {
                    self.expect.pop_front();
                }
            }
        }
    }
}

impl Drop for Tracker {
    /// The connection ended: executions sent and not answered are counted
    /// as unfinished; a Query's records are written by their own drop.
    fn drop(&mut self) {
        let expect = std::mem::take(&mut self.expect);
        for e in expect {
            if let Expect::Execute { prepared, started } = e {
                self.executed(prepared, Completion::Unfinished, started);
            }
        }
        if let Some((_, records)) = self.first.take() {
            records.decided();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{path::Path, sync::Arc};

    use super::*;
    use crate::{
        conn::{ConnInfo, OrigDstLookup},
        identity::IdentityResolver,
        policy::{Engine, PolicyFile},
        proxy::{Guard, Limits, Outcome, Shared},
    };

    struct NoLookup;
    impl OrigDstLookup for NoLookup {
        fn take(&self, _: u64, _: std::net::SocketAddr) -> Option<interceptor_common::ConnRecord> {
            None
        }
    }

    fn records(
        mode: &str,
        script: impl FnOnce(&mut Guard, &mut Tracker),
    ) -> Vec<serde_json::Value> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.jsonl");
        let (audit, writer) =
            crate::audit::AuditWriter::start(crate::audit::AuditConfig::new(&path)).unwrap();
        let policy = format!(
            "version: 1\ndefault: allow\ntargets:\n  - {{name: pg, protocol: postgres, address: '127.0.0.1:5432'}}\naudit:\n  executions: {mode}\n"
        );
        let engine = Engine::new(PolicyFile::parse(&policy, Path::new("t")).unwrap()).unwrap();
        let target = engine.file().targets[0].clone();
        let shared = Arc::new(Shared::new(
            engine,
            audit,
            Arc::new(NoLookup),
            IdentityResolver::new(None, 1 << 20),
            0,
            Limits::default(),
        ));
        let info = ConnInfo::new(
            7,
            target,
            "127.0.0.1:5432".parse().unwrap(),
            crate::identity::Identity::default(),
        );
        {
            let mut guard = Guard::new(Arc::clone(&shared), info);
            let mut t = Tracker::new(guard.exec_log());
            script(&mut guard, &mut t);
            drop(t);
            guard.exec_log().flush();
        }
        drop(shared);
        writer.finish();
        std::fs::read_to_string(&path)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    fn parse(g: &mut Guard, t: &mut Tracker, name: &str, sql: &str) {
        let (outcome, records) = g.check_parse(sql);
        assert_eq!(outcome, Outcome::Forward);
        t.parse(name.as_bytes(), Some(g.last_decision()), records);
    }

    fn bind(t: &mut Tracker, portal: &str, statement: &str) {
        t.client(b'B', format!("{portal}\0{statement}\0\0\0").as_bytes());
    }

    fn execute(t: &mut Tracker, portal: &str) {
        t.client(b'E', format!("{portal}\0\0\0\0\0").as_bytes());
    }

    fn error(code: &str) -> Vec<u8> {
        format!("SERROR\0C{code}\0Mboom\0\0").into_bytes()
    }

    #[test]
    fn answers_are_matched_to_executions_in_order() {
        let evs = records("each", |g, t| {
            // A pipeline: two statements, a portal fetched in parts.
            parse(g, t, "s1", "SELECT * FROM t");
            parse(g, t, "s2", "INSERT INTO t VALUES ($1)");
            bind(t, "p", "s1");
            execute(t, "p");
            execute(t, "p");
            bind(t, "", "s2");
            execute(t, "");
            t.client(b'S', b"");
            for _ in 0..2 {
                t.server(b'1', None);
            }
            t.server(b'2', None);
            t.server(b'D', None);
            t.server(b'D', None);
            t.server(b's', None);
            t.server(b'D', None);
            t.server(b'C', Some(b"SELECT 1\0"));
            t.server(b'2', None);
            t.server(b'C', Some(b"INSERT 0 1\0"));
            t.server(b'Z', Some(b"I"));
            // A failing Bind: its Execute never runs.
            bind(t, "", "s2");
            execute(t, "");
            t.client(b'S', b"");
            t.server(b'E', Some(&error("22P02")));
            t.server(b'Z', Some(b"I"));
            // A failing Execute, then one left without an answer.
            bind(t, "", "s2");
            execute(t, "");
            t.client(b'S', b"");
            bind(t, "", "s2");
            execute(t, "");
            t.server(b'2', None);
            t.server(b'E', Some(&error("23505")));
            t.server(b'Z', Some(b"E"));
            t.server(b'2', None);
        });
        let exec: Vec<&serde_json::Value> =
            evs.iter().filter(|e| e["event"] == "execute").collect();
        let got: Vec<(String, String, serde_json::Value)> = exec
            .iter()
            .map(|e| {
                (
                    e["decision_id"]
                        .as_str()
                        .unwrap()
                        .rsplit('-')
                        .next()
                        .unwrap()
                        .to_owned(),
                    e["outcome"].as_str().unwrap().to_owned(),
                    e["rows"].clone(),
                )
            })
            .collect();
        let j = serde_json::Value::from;
        assert_eq!(
            got,
            [
                ("1".into(), "ok".into(), j(2)),
                ("1".into(), "ok".into(), j(1)),
                ("2".into(), "ok".into(), j(1)),
                ("2".into(), "error".into(), serde_json::Value::Null),
                ("2".into(), "unfinished".into(), serde_json::Value::Null),
            ]
        );
        assert_eq!(exec[3]["error"], "23505");
        assert_eq!(exec[0]["conn"], 7);
        assert_eq!(exec[0]["decision"], "allow");
    }

    #[test]
    fn syncs_sent_during_a_copy_are_not_answered() {
        let evs = records("each", |g, t| {
            // As tokio-postgres does: Bind, Execute, Sync, then the data,
            // CopyDone and another Sync; the server ignores the first.
            parse(g, t, "c", "COPY t FROM STDIN");
            t.client(b'S', b"");
            t.server(b'1', None);
            t.server(b'Z', Some(b"I"));
            bind(t, "", "c");
            execute(t, "");
            t.client(b'S', b"");
            t.client(b'c', b"");
            t.client(b'S', b"");
            t.server(b'2', None);
            t.server(b'G', None);
            t.server(b'C', Some(b"COPY 5\0"));
            t.server(b'Z', Some(b"I"));
            let (_, recs) = g.check_query("SELECT 1");
            t.query(recs);
            t.server(b'T', None);
            t.server(b'D', None);
            t.server(b'C', Some(b"SELECT 1\0"));
            t.server(b'Z', Some(b"I"));
        });
        let exec = evs.iter().find(|e| e["event"] == "execute").unwrap();
        assert_eq!(exec["rows"], 5);
        let q = evs.iter().rfind(|e| e["event"] == "query").unwrap();
        assert_eq!(
            (&q["outcome"], &q["rows"]),
            (&"ok".into(), &1.into()),
            "{q}"
        );
    }

    #[test]
    fn summaries_close_with_the_statement_and_queries_get_answers() {
        let evs = records("summary", |g, t| {
            parse(g, t, "s1", "SELECT 1");
            for _ in 0..3 {
                bind(t, "", "s1");
                execute(t, "");
            }
            t.client(b'C', b"Ss1\0");
            t.client(b'S', b"");
            t.server(b'1', None);
            for _ in 0..3 {
                t.server(b'2', None);
                t.server(b'D', None);
                t.server(b'C', Some(b"SELECT 1\0"));
            }
            t.server(b'3', None);
            t.server(b'Z', Some(b"I"));
            // A simple query of two statements, the second failing, the
            // third never run.
            let (outcome, recs) = g.check_query("UPDATE t SET a = 1; SELECT x; SELECT 2");
            assert_eq!(outcome, Outcome::Forward);
            t.query(recs);
            t.server(b'C', Some(b"UPDATE 4\0"));
            t.server(b'E', Some(&error("42703")));
            t.server(b'Z', Some(b"I"));
        });
        let names: Vec<&str> = evs.iter().map(|e| e["event"].as_str().unwrap()).collect();
        // The summary is written at CloseComplete, before the next query.
        assert_eq!(
            names,
            ["query", "executions", "query", "query", "query"],
            "{evs:?}"
        );
        // The first execution is in the Parse's record, the other two in
        // the summary.
        assert_eq!(
            (&evs[0]["outcome"], &evs[0]["rows"]),
            (&"ok".into(), &1.into())
        );
        let s = &evs[1];
        assert_eq!(
            (&s["count"], &s["rows"], &s["errors"]),
            (&2.into(), &2.into(), &0.into())
        );
        let answers: Vec<(&str, &serde_json::Value, &serde_json::Value)> = evs[2..]
            .iter()
            .map(|e| (e["outcome"].as_str().unwrap(), &e["rows"], &e["error"]))
            .collect();
        assert_eq!(
            answers,
            [
                ("ok", &4.into(), &serde_json::Value::Null),
                ("error", &serde_json::Value::Null, &"42703".into()),
                (
                    "skipped",
                    &serde_json::Value::Null,
                    &serde_json::Value::Null
                ),
            ]
        );
    }

    /// The unnamed statement as drivers send it (Parse, Bind, Execute,
    /// Sync for each query): one `query` record each, with the answer, and
    /// no execution records. A statement parsed in one group and run in
    /// the next, and a Parse the server refuses, are written as such.
    #[test]
    fn a_statement_run_once_in_its_group_is_one_record() {
        let evs = records("summary", |g, t| {
            for n in 1..=2 {
                parse(g, t, "", "SELECT * FROM t");
                bind(t, "", "");
                execute(t, "");
                t.client(b'S', b"");
                t.server(b'1', None);
                t.server(b'2', None);
                for _ in 0..n {
                    t.server(b'D', None);
                }
                t.server(b'C', Some(format!("SELECT {n}\0").as_bytes()));
                t.server(b'Z', Some(b"I"));
            }
            // Prepared in one group, run in the next.
            parse(g, t, "s", "SELECT 3");
            t.client(b'S', b"");
            t.server(b'1', None);
            t.server(b'Z', Some(b"I"));
            bind(t, "", "s");
            execute(t, "");
            t.client(b'S', b"");
            t.server(b'2', None);
            t.server(b'C', Some(b"SELECT 1\0"));
            t.server(b'Z', Some(b"I"));
            // Refused by the server.
            parse(g, t, "", "SELECT nope FROM t");
            t.client(b'S', b"");
            t.server(b'E', Some(&error("42703")));
            t.server(b'Z', Some(b"I"));
            // Decided and connection gone before any answer.
            parse(g, t, "", "SELECT 4");
        });
        let got: Vec<(&str, &serde_json::Value, &serde_json::Value)> = evs
            .iter()
            .filter(|e| e["event"] == "query")
            .map(|e| (e["event"].as_str().unwrap(), &e["outcome"], &e["rows"]))
            .collect();
        let null = &serde_json::Value::Null;
        assert_eq!(
            got,
            [
                ("query", &"ok".into(), &1.into()),
                ("query", &"ok".into(), &2.into()),
                ("query", null, null),
                ("query", &"error".into(), null),
                ("query", null, null),
            ],
            "{evs:?}"
        );
        assert_eq!(evs[3]["error"], "42703");
        // Only the statement prepared in an earlier group has a summary
        // (written when the connection ends).
        let summaries: Vec<&serde_json::Value> =
            evs.iter().filter(|e| e["event"] == "executions").collect();
        assert_eq!(summaries.len(), 1, "{evs:?}");
        assert_eq!(summaries[0]["count"], 1);
    }

    /// Pipelined groups: the server's error for a first Parse is not put on
    /// a later Parse's record, and every execution is counted once.
    #[test]
    fn a_pipelined_parse_error_stays_with_its_statement() {
        let evs = records("summary", |g, t| {
            parse(g, t, "", "SELECT bad FROM t");
            t.client(b'S', b"");
            parse(g, t, "", "SELECT 5");
            bind(t, "", "");
            execute(t, "");
            t.client(b'S', b"");
            t.server(b'E', Some(&error("42703")));
            t.server(b'Z', Some(b"I"));
            t.server(b'1', None);
            t.server(b'2', None);
            t.server(b'D', None);
            t.server(b'C', Some(b"SELECT 1\0"));
            t.server(b'Z', Some(b"I"));
        });
        let queries: Vec<&serde_json::Value> =
            evs.iter().filter(|e| e["event"] == "query").collect();
        assert_eq!(queries.len(), 2, "{evs:?}");
        assert!(
            queries.iter().all(|q| q["error"].is_null()),
            "an error on the wrong record: {evs:?}"
        );
        let counted: u64 = evs
            .iter()
            .filter(|e| e["event"] == "executions")
            .map(|e| e["count"].as_u64().unwrap())
            .sum();
        let folded = queries.iter().filter(|q| q["outcome"] == "ok").count() as u64;
        assert_eq!(counted + folded, 1, "{evs:?}");
    }
}
