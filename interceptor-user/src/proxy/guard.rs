//! Between a protocol session and the policy: decides each query message
//! for one connection, audits every statement, and tells the protocol
//! whether to forward or refuse. Protocols see [`Outcome`], never rules.

use std::sync::{Arc, atomic::Ordering};

use super::{
    LiveConn, Shared,
    executions::{Completion, ExecLog, Prepared},
};
use crate::{
    approval::{NewApproval, Resolution, Ticket},
    conn::{ConnInfo, truncate},
    policy::{Decision, DecisionRequest, Engine, IdentityBinding, SessionState, Verdict},
    sql::Kind,
};

/// What the protocol does with a message.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Send it on, unchanged.
    Forward,
    /// Refuse it with this message; nothing of it reaches the server.
    Refuse(Refusal),
    /// Hold it (and everything the client sends after it) until people
    /// decide: [`Hold::wait`] then says `Forward` or `Refuse`.
    Hold(Hold),
}

/// A statement waiting for approval. Dropping it (the session ended)
/// withdraws the approval.
pub struct Hold {
    ticket: Ticket,
    shared: Arc<Shared>,
    decision_id: String,
    who: String,
    /// The text for the client while it waits (PostgreSQL NoticeResponse).
    pub notice: String,
}

impl std::fmt::Debug for Hold {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hold")
            .field("approval", &self.ticket.id)
            .field("decision_id", &self.decision_id)
            .finish_non_exhaustive()
    }
}

impl PartialEq for Hold {
    fn eq(&self, other: &Self) -> bool {
        self.ticket.id == other.ticket.id
    }
}

impl Eq for Hold {}

impl Hold {
    /// The pending approval's id.
    #[must_use]
    pub fn approval_id(&self) -> &str {
        &self.ticket.id
    }

    /// Waits for the decision: `None` once approved (forward it), the
    /// refusal (exactly like a denial's) when denied or timed out.
    /// Cancel-safe.
    pub async fn wait(&mut self) -> Option<Refusal> {
        match self.ticket.wait().await {
            Resolution::Approved => None,
            Resolution::Denied { reason } => {
                self.shared.stats.denied.fetch_add(1, Ordering::Relaxed);
                Some(Refusal {
                    message: format!(
                        "interceptor: denied {}: {reason} (decision {})",
                        self.who, self.decision_id
                    ),
                    id: self.decision_id.clone(),
                })
            }
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// Decision id, also in the audit log.
    pub id: String,
    /// The whole text for the client: rule or default, reason, decision id.
    pub message: String,
}

/// How a session logs in (see [`Guard::plan_login`]).
#[derive(Debug)]
pub enum LoginPlan {
    /// The workload authenticates with the server itself.
    Passthrough,
    /// The agent logs in with this entry's secret.
    Brokered(crate::policy::LoginSpec),
    /// Refused; the message for the workload.
    Refused(String),
}

/// Per-connection decision state.
pub struct Guard {
    shared: Arc<Shared>,
    pub info: ConnInfo,
    live: Arc<LiveConn>,
    binding: IdentityBinding,
    session: SessionState,
    /// Shared with the audit records.
    pub db_user: Arc<str>,
    pub database: Arc<str>,
    /// `BOOT-CONN-`: decision ids are this and a counter.
    id_prefix: Arc<str>,
    next_decision: u64,
    /// What each leg negotiated, for `session` events.
    tls: crate::tls::Legs,
    /// The `logins:` entry the agent logs in with, once planned, and the
    /// method the server asked for.
    login: Option<crate::policy::LoginSpec>,
    login_method: Option<&'static str>,
    /// The last message decided, as a statement the protocol may prepare.
    last: Prepared,
    /// While deciding a simple-protocol message: its `query` records wait
    /// here for the server's answer instead of going to the log.
    deferring: bool,
    deferred: Vec<(crate::audit::AuditEvent, QueryEvent)>,
}

impl Guard {
    /// A guard for a connection outside the registry (tests, tools).
    #[must_use]
    pub fn new(shared: Arc<Shared>, info: ConnInfo) -> Self {
        Self::with_live(shared, Arc::new(LiveConn::new(info)))
    }

    /// The guard of a registered live connection.
    #[must_use]
    pub fn with_live(shared: Arc<Shared>, live: Arc<LiveConn>) -> Self {
        let info = live.info.clone();
        let binding = shared.engine.load().bind_identity(&info.identity);
        let id_prefix = Arc::from(format!("{}-{}-", shared.boot_id, info.id));
        Self {
            shared,
            info,
            live,
            binding,
            session: SessionState::default(),
            db_user: Arc::from(""),
            database: Arc::from(""),
            id_prefix,
            next_decision: 1,
            tls: crate::tls::Legs::default(),
            login: None,
            login_method: None,
            last: Prepared::UNKNOWN,
            deferring: false,
            deferred: Vec::new(),
        }
    }

    /// Where the protocol reports executions of prepared statements.
    #[must_use]
    pub fn exec_log(&self) -> ExecLog {
        ExecLog::new(
            Arc::clone(&self.shared),
            Arc::clone(&self.live),
            Arc::clone(&self.id_prefix),
        )
    }

    /// The decision of the message decided last (a Parse, a
    /// COM_STMT_PREPARE), to tie its executions to.
    #[must_use]
    pub fn last_decision(&self) -> Prepared {
        self.last
    }

    /// Decides a PostgreSQL Parse. Unless every execution has a record of
    /// its own (`audit.executions: each`), an allowed statement's `query`
    /// records wait in the returned [`Unanswered`]: its first execution in
    /// the same Sync group (Parse, Bind, Execute, Sync, as drivers send
    /// the unnamed statement) is written in them, as a simple query's
    /// answer is, instead of in an `executions` record of its own.
    pub fn check_parse(&mut self, sql: &str) -> (Outcome, Option<Unanswered>) {
        if self.shared.executions_mode() == crate::policy::Executions::Each {
            (self.check(sql), None)
        } else {
            self.check_query(sql)
        }
    }

    /// Decides a simple-protocol message (PostgreSQL Query, MySQL
    /// COM_QUERY). When it goes to the server, its `query` records wait in
    /// the returned [`Unanswered`] for the server's answer (rows, error);
    /// otherwise they are written now.
    pub fn check_query(&mut self, sql: &str) -> (Outcome, Option<Unanswered>) {
        self.deferring = true;
        let outcome = self.check(sql);
        self.deferring = false;
        let records = std::mem::take(&mut self.deferred);
        let mut pending = Unanswered {
            shared: Arc::clone(&self.shared),
            records,
            next: 0,
        };
        if outcome == Outcome::Forward {
            (outcome, Some(pending))
        } else {
            // Refused or held: already recorded as decided, as before.
            pending.write(None);
            (outcome, None)
        }
    }

    /// The agent's TLS state.
    #[must_use]
    pub fn tls_context(&self) -> Arc<crate::tls::TlsContext> {
        Arc::clone(&self.shared.tls)
    }

    /// Adds the client's plain TCP socket to the kernel's local bypass when
    /// it is on (see [`crate::conn::OrigDstLookup::join_bypass`]): the
    /// protocol calls this before its first write to the client, at a
    /// moment the client waits for that write.
    pub fn join_local_bypass(&self, client: &super::stream::Stream) {
        if let (super::stream::Stream::Plain(tcp), Some(netns)) = (client, &self.info.netns) {
            self.shared
                .lookup
                .join_bypass(netns.cookie, std::os::fd::AsFd::as_fd(tcp));
        }
    }

    /// What the legs negotiated, carried by `session` events from now on.
    pub fn set_tls(&mut self, legs: crate::tls::Legs) {
        self.tls = legs;
    }

    /// What the legs negotiated.
    #[must_use]
    pub fn tls(&self) -> &crate::tls::Legs {
        &self.tls
    }

    /// Session facts learnt from the protocol's startup.
    pub fn set_session(&mut self, db_user: &str, database: &str) {
        self.db_user = Arc::from(db_user);
        self.database = Arc::from(database);
        self.session.database = Some(database.to_owned());
        self.live.update(|s| {
            db_user.clone_into(&mut s.db_user);
            database.clone_into(&mut s.database);
        });
    }

    /// This connection's entry among the live connections.
    #[must_use]
    pub fn live(&self) -> Arc<LiveConn> {
        Arc::clone(&self.live)
    }

    /// Largest client message to buffer for a decision.
    #[must_use]
    pub fn max_frame(&self) -> usize {
        self.shared.max_frame
    }

    /// How a workload asking to log in as `db_user` logs in: through to
    /// the server, by the agent (the target's `logins:` entry names one of
    /// its identities), or not at all (an entry exists and names none of
    /// them: audited as `login_refused`).
    pub fn plan_login(&mut self, db_user: &str) -> LoginPlan {
        use crate::policy::{Login, login_for, login_refusal};
        // A MySQL COM_CHANGE_USER plans again: what held for the previous
        // user goes.
        self.login = None;
        self.login_method = None;
        match login_for(&self.info.target.logins, db_user, &self.info.identities) {
            Login::Passthrough => {
                self.live.update(|s| s.brokered = false);
                LoginPlan::Passthrough
            }
            Login::Brokered(entry) => {
                self.login = Some(entry.clone());
                self.live.update(|s| s.brokered = true);
                LoginPlan::Brokered(entry.clone())
            }
            Login::Refused(entry) => {
                let message = login_refusal(entry, &self.info.identities);
                self.shared.audit.record(
                    self.info
                        .event("login_refused")
                        .with("db_user", db_user)
                        .with("database", &self.database)
                        .with("allowed", &entry.identities)
                        .with("message", &message),
                );
                LoginPlan::Refused(message)
            }
        }
    }

    /// The method of a brokered login that succeeded (`SCRAM-SHA-256-PLUS`,
    /// `md5`, `mysql_native_password`, ...), for the `session` record.
    pub fn set_login_method(&mut self, method: &'static str) {
        self.login_method = Some(method);
    }

    /// Audits a brokered login that did not succeed: the secret could not
    /// be read (`stage` `secret`) or the server refused the agent
    /// (`server`, with its SQLSTATE or MySQL error code).
    pub fn record_login_failed(&self, stage: &str, code: Option<&str>, error: &str) {
        let entry = self.login.as_ref();
        self.shared.audit.record(
            self.info
                .event("login_failed")
                .with("db_user", &self.db_user)
                .with("database", &self.database)
                .with("stage", stage)
                .with("code", code)
                .with("error", error)
                .with("secret", entry.map(crate::policy::LoginSpec::secret_source)),
        );
    }

    /// Audits the session facts once the protocol's startup is read.
    pub fn record_session(&self, application_name: Option<&str>) {
        let (login, entry) = match &self.login {
            Some(l) => (
                "brokered",
                Some(serde_json::json!({
                    "db_user": l.db_user,
                    "identities": l.identities,
                    "secret": l.secret_source(),
                    "method": self.login_method,
                })),
            ),
            None => ("passthrough", None),
        };
        self.shared.audit.record(
            self.info
                .event("session")
                .with("db_user", &self.db_user)
                .with("database", &self.database)
                .with("application_name", application_name)
                .with("tls", &self.tls)
                .with("login", login)
                .with("login_entry", entry),
        );
    }

    /// Audits a cancel request passed on to the server.
    pub fn record_cancel(&self, backend_pid: u32) {
        self.shared
            .audit
            .record(self.info.event("cancel").with("backend_pid", backend_pid));
    }

    /// Decides one query message (which may hold several statements).
    pub fn check(&mut self, sql: &str) -> Outcome {
        let verdict = self.decide_with(sql, |engine, req, session| engine.decide(req, session));
        self.conclude(sql, verdict)
    }

    /// Decides a call of a function given by name or OID (PostgreSQL FunctionCall).
    pub fn check_call(&mut self, function: &str) -> Outcome {
        let text = format!("-- FunctionCall {function}");
        let verdict = self.decide_with(&text, |engine, req, session| {
            engine.decide_function_call(req, function, session)
        });
        self.conclude(&text, verdict)
    }

    /// Runs one engine call with this connection's request for `sql`.
    fn decide_with(
        &mut self,
        sql: &str,
        call: impl FnOnce(&Engine, &DecisionRequest<'_>, &mut SessionState) -> Verdict,
    ) -> Verdict {
        let engine = self.shared.engine.load();
        if !engine.is_current(&self.binding) {
            // The policy was reloaded: bind once to the new one.
            self.binding = engine.bind_identity(&self.info.identity);
        }
        let req = DecisionRequest {
            identity: &self.info.identity,
            binding: &self.binding,
            target: &self.info.target.name,
            db_user: &self.db_user,
            database: &self.database,
            sql,
        };
        call(&engine, &req, &mut self.session)
    }

    fn conclude(&mut self, sql: &str, mut v: Verdict) -> Outcome {
        let v = &mut v;
        let n = self.next_decision;
        self.next_decision += 1;
        self.last = Prepared {
            decision: n,
            verdict: v.decision,
        };
        self.audit(n, sql, v);
        if self.deferring && v.blocks() {
            // Refused or held: the records go now, before any approval's.
            for (ev, body) in self.deferred.drain(..) {
                self.shared.audit.record(ev.with_body(body));
            }
        }
        self.live.decisions.add(v.decision);
        if !v.blocks() {
            return Outcome::Forward;
        }
        let id = format!("{}{n}", self.id_prefix);
        let who = v.rule.as_deref().map_or_else(
            || "no rule allowed this statement".to_owned(),
            |r| format!("by rule \"{r}\""),
        );
        if v.decision == Decision::Approve {
            return self.hold(sql, v, id, who);
        }
        self.shared.stats.denied.fetch_add(1, Ordering::Relaxed);
        let message = format!("interceptor: denied {who}: {} (decision {id})", v.reason);
        Outcome::Refuse(Refusal { id, message })
    }

    /// An `approve` verdict: let it through under a standing grant, or
    /// hold it as a pending approval.
    fn hold(&self, sql: &str, v: &Verdict, id: String, who: String) -> Outcome {
        let store = &self.shared.approvals;
        let now = time::OffsetDateTime::now_utc();
        let fingerprint = message_fingerprint(v);
        if store
            .use_grant(&self.info, &id, v.rule.as_deref(), &fingerprint, now)
            .is_some()
        {
            return Outcome::Forward;
        }
        let spec = v.approval.clone().unwrap_or_default();
        let redacted = self.redacting();
        if spec.approvers.is_empty() {
            // `default: approve`, `on_parse_error: approve` or a rule
            // without `approval:`: nobody could ever answer, so do not
            // keep the client waiting for the timeout.
            self.shared.stats.denied.fetch_add(1, Ordering::Relaxed);
            return Outcome::Refuse(Refusal {
                message: format!(
                    "interceptor: denied {who}: {}; the statement needs approval, but no approvers are configured for it (decision {id})",
                    v.reason
                ),
                id,
            });
        }
        let ticket = store.request(
            &NewApproval {
                info: &self.info,
                decision_id: &id,
                db_user: &self.db_user,
                database: &self.database,
                query: sql,
                logged_query: &self.query_text(sql, redacted),
                redacted,
                fingerprint: &fingerprint,
                rule: v.rule.as_deref(),
                spec,
            },
            now,
        );
        let notice = format!(
            "interceptor: statement held for approval {} ({who}: {}); it runs once approved (interceptor approvals approve {}), and is denied if not approved within {} (decision {id})",
            ticket.id,
            v.reason,
            ticket.id,
            v.approval.as_deref().map_or_else(
                || "5m".to_owned(),
                |a| a.timeout.clone().unwrap_or_else(|| "5m".to_owned())
            ),
        );
        Outcome::Hold(Hold {
            ticket,
            shared: Arc::clone(&self.shared),
            decision_id: id,
            who,
            notice,
        })
    }

    /// One `query` event per statement of the message. The verdict's
    /// texts move into the records; the rest is shared (`Arc`), so a
    /// record costs the data path no copies.
    fn audit(&mut self, decision: u64, sql: &str, v: &mut Verdict) {
        let redact = self.redacting();
        if v.statements.is_empty() {
            v.statements.push(crate::policy::StatementVerdict {
                text: sql.to_owned(),
                kind: Kind::Other,
                tables: Arc::from([]),
                fingerprint: Arc::from(""),
                decision: v.decision,
                rule: v.rule.clone(),
                reason: Arc::clone(&v.reason),
                unparsed: true,
                flags: crate::sql::FlagSet::default(),
            });
        }
        for (i, st) in v.statements.iter_mut().enumerate() {
            let text = std::mem::take(&mut st.text);
            let body = QueryEvent {
                decision_id: (Arc::clone(&self.id_prefix), decision),
                statement: i,
                decision: st.decision,
                message_decision: v.decision,
                rule: st.rule.clone().or_else(|| v.rule.clone()),
                reason: if st.reason.is_empty() {
                    Arc::clone(&v.reason)
                } else {
                    Arc::clone(&st.reason)
                },
                enforced: v.enforced,
                query: self.logged_text(text, redact),
                fingerprint: Arc::clone(&st.fingerprint),
                kind: st.kind,
                tables: Arc::clone(&st.tables),
                unparsed: st.unparsed,
                flags: st.flags,
                db_user: Arc::clone(&self.db_user),
                database: Arc::clone(&self.database),
                eval_us: v.eval_us,
                done: None,
            };
            let ev = self.info.query_event(st.decision, v.eval_us);
            if self.deferring {
                self.deferred.push((ev, body));
            } else {
                self.shared.audit.record(ev.with_body(body));
            }
        }
    }

    /// [`Self::query_text`] of an owned text, kept as it is when it needs
    /// neither cutting nor redacting.
    fn logged_text(&self, text: String, redact: bool) -> String {
        if !redact && text.len() <= self.shared.audit_query_max {
            return text;
        }
        self.query_text(&text, redact)
    }
}

/// The shape of a whole message: its statements' fingerprints, in order.
fn message_fingerprint(v: &Verdict) -> String {
    match v.statements.as_slice() {
        [one] => one.fingerprint.to_string(),
        many => many
            .iter()
            .map(|s| &*s.fingerprint)
            .collect::<Vec<_>>()
            .join(";"),
    }
}

/// The `query` records of a simple-protocol message on its way to the
/// server: each statement's record is written with the server's answer
/// to it (rows or error). Dropped before the answer came (the connection
/// ended), they are written as `unfinished`.
pub struct Unanswered {
    shared: Arc<Shared>,
    records: Vec<(crate::audit::AuditEvent, QueryEvent)>,
    /// The statement the next answer belongs to.
    next: usize,
}

impl std::fmt::Debug for Unanswered {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Unanswered")
            .field("statements", &self.records.len())
            .field("next", &self.next)
            .finish_non_exhaustive()
    }
}

impl Unanswered {
    /// The server's answer to the next statement. Answers beyond the
    /// statements the agent saw (a procedure's further result sets, a
    /// message it could not split) are added to the last one.
    pub fn answer(&mut self, c: Completion) {
        let Some(last) = self.records.len().checked_sub(1) else {
            return;
        };
        if self.next <= last {
            self.records[self.next].1.done = Some(c);
            self.next += 1;
            return;
        }
        let slot = &mut self.records[last].1.done;
        *slot = Some(match (*slot, c) {
            (
                Some(Completion::Done {
                    rows: a,
                    error: None,
                }),
                Completion::Done { rows: b, error },
            ) => Completion::Done {
                rows: match (a, b) {
                    (None, None) => None,
                    (a, b) => Some(a.unwrap_or(0) + b.unwrap_or(0)),
                },
                error,
            },
            (Some(prev), _) => prev,
            (None, c) => c,
        });
    }

    /// The reply ended: statements without an answer did not run.
    pub fn finish(mut self) {
        self.write(Some(Completion::Skipped));
    }

    /// A Parse's records with its first execution's answer; `facts` (the
    /// execution, for metrics) go with the first record.
    pub fn executed(mut self, done: Completion, facts: Option<crate::audit::ExecutionFacts>) {
        self.answer(done);
        if let Some(first) = self.records.first_mut() {
            first.0.executions = facts;
        }
        self.write(None);
    }

    /// A Parse's records, its statement not executed in the same group:
    /// written as decided, without an answer.
    pub fn decided(mut self) {
        self.write(None);
    }

    /// Writes the records; `missing` for those without an answer (`None`:
    /// the message was not sent, so no result fields at all).
    fn write(&mut self, missing: Option<Completion>) {
        for (ev, mut body) in self.records.drain(..) {
            if body.done.is_none() {
                body.done = missing;
            }
            self.shared.audit.record(ev.with_body(body));
        }
    }
}

impl Drop for Unanswered {
    fn drop(&mut self) {
        self.write(Some(Completion::Unfinished));
    }
}

/// Fields of a `query` event, rendered by the audit writer.
struct QueryEvent {
    /// The decision id's prefix and number, joined when rendered.
    decision_id: (Arc<str>, u64),
    statement: usize,
    decision: Decision,
    message_decision: Decision,
    rule: Option<Arc<str>>,
    reason: Arc<str>,
    enforced: bool,
    query: String,
    fingerprint: Arc<str>,
    kind: Kind,
    tables: Arc<[String]>,
    unparsed: bool,
    flags: crate::sql::FlagSet,
    db_user: Arc<str>,
    database: Arc<str>,
    eval_us: u64,
    /// What the server said, for a simple-protocol statement sent to it.
    done: Option<Completion>,
}

impl crate::audit::EventBody for QueryEvent {
    /// Written member by member (no serde map machinery): this runs once
    /// per statement on the writer thread.
    fn write_json(&self, out: &mut Vec<u8>) {
        use crate::audit::json::{
            bool_member, numbered_member, opt_str_member, str_array_member, str_iter_member,
            str_member, u64_member,
        };
        out.push(b'{');
        numbered_member(out, "decision_id", &self.decision_id.0, self.decision_id.1);
        u64_member(out, "statement", self.statement as u64);
        str_member(out, "decision", self.decision.as_str());
        str_member(out, "message_decision", self.message_decision.as_str());
        opt_str_member(out, "rule", self.rule.as_deref());
        str_member(out, "reason", &self.reason);
        bool_member(out, "enforced", self.enforced);
        str_member(out, "query", &self.query);
        str_member(out, "fingerprint", &self.fingerprint);
        str_member(out, "kind", self.kind.as_str());
        str_array_member(out, "tables", &self.tables);
        bool_member(out, "unparsed", self.unparsed);
        // Added after the first release: the statement's flags
        // (`dynamic_sql`, `file_access`, ...).
        str_iter_member(
            out,
            "flags",
            self.flags.iter().map(crate::sql::Flag::as_str),
        );
        str_member(out, "db_user", &self.db_user);
        str_member(out, "database", &self.database);
        u64_member(out, "eval_us", self.eval_us);
        if let Some(done) = &self.done {
            done.write_members(out);
        }
        out.push(b'}');
    }
}

/// What the MySQL protocol needs beyond deciding statements: the current
/// database changing mid-session, session resets, refusals of messages
/// that are not statements, and the server's LOCAL INFILE requests.
impl Guard {
    /// The current database changed (COM_INIT_DB or `USE`, once the server
    /// accepted it, or put back after it refused).
    pub fn set_database(&mut self, database: &str) {
        self.database = Arc::from(database);
        self.session.database = Some(database.to_owned());
        self.live.update(|s| database.clone_into(&mut s.database));
    }

    /// The server reset the session (COM_CHANGE_USER, COM_RESET_CONNECTION):
    /// SQL-level prepared statements and other session facts are gone.
    pub fn reset_session(&mut self, db_user: &str, database: &str) {
        self.session = SessionState::default();
        self.set_session(db_user, database);
    }

    /// Refuses a message that is no statement the policy could judge (an
    /// unsupported command, a prepared statement the agent never allowed),
    /// audited like a denied statement.
    pub fn refuse(&mut self, what: &str, reason: &str) -> Refusal {
        let id = self.take_decision_id();
        self.shared.stats.denied.fetch_add(1, Ordering::Relaxed);
        self.live.decisions.add(Decision::Deny);
        self.audit_other("query", &id, what, Decision::Deny, None, reason, true);
        Refusal {
            message: format!("interceptor: denied: {reason} (decision {id})"),
            id,
        }
    }

    /// Decides the server's request for a client-side file (MySQL LOCAL
    /// INFILE). Granted only when the statement being answered asked for
    /// a local file and the policy allows that statement (it carries the
    /// `file_access` flag); otherwise a server could read any file the
    /// client can. Audited as a `local_infile` event.
    pub fn check_local_infile(&mut self, statement: &str, file: &str) -> Outcome {
        let v = self.decide_with(statement, |engine, req, session| {
            engine.decide(req, session)
        });
        let id = self.take_decision_id();
        let (decision, rule, reason) = if asks_for_local_file(statement) {
            (v.decision, v.rule.clone(), v.reason.to_string())
        } else {
            (
                Decision::Deny,
                None,
                format!(
                    "the server asked for the client's file \"{file}\", but the statement did not ask to load a local file"
                ),
            )
        };
        // The file name is the server's request, kept; the statement is
        // redacted like any query.
        let what = format!(
            "LOCAL INFILE {file}: {}",
            self.query_text(statement, self.redacting())
        );
        self.audit_other(
            "local_infile",
            &id,
            &what,
            decision,
            rule.as_deref(),
            &reason,
            v.enforced,
        );
        if !v.enforced || decision == Decision::Allow {
            return Outcome::Forward;
        }
        self.shared.stats.denied.fetch_add(1, Ordering::Relaxed);
        let who = rule.map_or_else(String::new, |r| format!(" by rule \"{r}\""));
        Outcome::Refuse(Refusal {
            message: format!(
                "interceptor: denied{who}: reading local file \"{file}\": {reason} (decision {id})"
            ),
            id,
        })
    }

    /// Whether the policy in force wants literals out of the log.
    fn redacting(&self) -> bool {
        self.shared.engine.load().file().audit.redact_literals
    }

    /// A statement's text as the audit log keeps it: at most
    /// `audit_query_max` bytes, with literals replaced when redacting. Only
    /// a prefix of that length is redacted, so a 20 MiB `INSERT` costs no
    /// more than a short one; a literal cut off by it still counts as one.
    fn query_text(&self, text: &str, redact: bool) -> String {
        let max = self.shared.audit_query_max;
        if redact {
            let dialect = self.info.target.protocol.dialect();
            truncate(&crate::sql::redact(truncate(text, max), dialect), max).to_owned()
        } else {
            truncate(text, max).to_owned()
        }
    }

    fn take_decision_id(&mut self) -> String {
        let id = format!("{}{}", self.id_prefix, self.next_decision);
        self.next_decision += 1;
        id
    }

    #[allow(clippy::too_many_arguments)]
    fn audit_other(
        &self,
        event: &'static str,
        id: &str,
        what: &str,
        decision: Decision,
        rule: Option<&str>,
        reason: &str,
        enforced: bool,
    ) {
        self.shared.audit.record(
            self.info
                .event(event)
                .with("decision_id", id)
                .with("statement", 0)
                .with("decision", decision)
                .with("message_decision", decision)
                .with("rule", rule)
                .with("reason", reason)
                .with("enforced", enforced)
                .with("query", truncate(what, self.shared.audit_query_max))
                .with("fingerprint", "")
                .with("kind", Kind::Other)
                .with("tables", [(); 0])
                .with("unparsed", true)
                .with("db_user", &self.db_user)
                .with("database", &self.database)
                .with("eval_us", 0),
        );
    }
}

/// Whether a MySQL statement asks the client to send a file (`LOAD DATA
/// LOCAL INFILE`, `LOAD XML LOCAL INFILE`): the words `LOCAL INFILE` in a
/// statement that starts with `LOAD` (comments and case ignored).
fn asks_for_local_file(sql: &str) -> bool {
    let lower = sql.to_ascii_lowercase();
    let words = lower
        .split(|c: char| !c.is_ascii_alphanumeric() && c != '_')
        .filter(|w| !w.is_empty());
    let mut prev = "";
    let mut saw_load = false;
    for w in words {
        saw_load |= w == "load";
        if saw_load && prev == "local" && w == "infile" {
            return true;
        }
        prev = w;
    }
    false
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::QueryEvent;
    use crate::{audit::EventBody as _, policy::Decision, sql::Kind};

    #[test]
    fn query_record_body_is_the_json_object_it_claims() {
        let mut ev = QueryEvent {
            decision_id: (Arc::from("b1-7-"), 3),
            statement: 1,
            decision: Decision::Deny,
            message_decision: Decision::Approve,
            rule: None,
            reason: Arc::from("no rule allowed \"this\"\nstatement"),
            enforced: true,
            query: "SELECT '\u{1}é\\' FROM t".to_owned(),
            fingerprint: Arc::from("0011aabb"),
            kind: Kind::Select,
            tables: Arc::from(["public.a".to_owned(), "public.\"b\"".to_owned()]),
            unparsed: false,
            flags: [crate::sql::Flag::DynamicSql, crate::sql::Flag::Lock]
                .into_iter()
                .collect(),
            db_user: Arc::from("app"),
            database: Arc::from("shop"),
            eval_us: 12,
            done: None,
        };
        let mut out = Vec::new();
        ev.write_json(&mut out);
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        let mut keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        keys.sort_unstable();
        let mut expected = vec![
            "decision_id",
            "statement",
            "decision",
            "message_decision",
            "rule",
            "reason",
            "enforced",
            "query",
            "fingerprint",
            "kind",
            "tables",
            "unparsed",
            "flags",
            "db_user",
            "database",
            "eval_us",
        ];
        expected.sort_unstable();
        assert_eq!(keys, expected);
        assert_eq!(v["decision_id"], "b1-7-3");
        assert_eq!(v["decision"], "deny");
        assert_eq!(v["message_decision"], "approve");
        assert!(v["rule"].is_null());
        assert_eq!(v["reason"], "no rule allowed \"this\"\nstatement");
        assert_eq!(v["query"], "SELECT '\u{1}é\\' FROM t");
        assert_eq!(v["tables"], serde_json::json!(["public.a", "public.\"b\""]));
        assert_eq!(v["kind"], "select");
        assert_eq!(v["statement"], 1);
        assert_eq!(v["eval_us"], 12);
        assert_eq!(v["enforced"], true);
        assert_eq!(v["unparsed"], false);
        assert_eq!(v["flags"], serde_json::json!(["lock", "dynamic_sql"]));
        ev.rule = Some(Arc::from("no-drops"));
        ev.tables = Arc::from([]);
        ev.flags = crate::sql::FlagSet::default();
        out.clear();
        ev.write_json(&mut out);
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["rule"], "no-drops");
        assert_eq!(v["tables"], serde_json::json!([]));
        assert_eq!(v["flags"], serde_json::json!([]));
        // The names written by hand are the ones serde gives the types.
        for k in Kind::ALL {
            assert_eq!(serde_json::to_value(k).unwrap(), k.as_str());
        }
        for d in [Decision::Allow, Decision::Deny, Decision::Approve] {
            assert_eq!(serde_json::to_value(d).unwrap(), d.as_str());
        }
        for f in crate::sql::Flag::ALL {
            assert_eq!(serde_json::to_value(f).unwrap(), f.as_str());
        }
    }

    #[test]
    fn local_file_statements() {
        use super::asks_for_local_file as f;
        assert!(f("LOAD DATA LOCAL INFILE '/tmp/x' INTO TABLE t"));
        assert!(f("load xml /* c */ local\n infile 'x' into table t"));
        assert!(!f("LOAD DATA INFILE '/tmp/x' INTO TABLE t"));
        assert!(!f("SELECT 'local infile'"));
        assert!(!f("SELECT 1"));
    }
}
