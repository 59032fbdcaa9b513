//! Targets given by Kubernetes Service (`service: prod/pg`, `port:`),
//! against a fake API server in this test process: HTTPS on 127.0.0.1 with
//! a certificate of the test's own CA (given to the agent as the service
//! account's `ca.crt`, with a token it must send), replaying the recorded
//! API stream in `tests/data/k8s/` (a Service LIST, an EndpointSlice LIST,
//! then WATCH events), its addresses mapped onto loopback ones where real
//! PostgreSQL servers listen. No cluster is involved: this is the only
//! test of the API path. Real psql in the test cgroup; real eBPF.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    ffi::OsStr,
    fs,
    path::{Path, PathBuf},
    process::{Command, Output},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use interceptor_tests::{
    Agent, PgServer, TestCgroup, agent_bin, free_port, pg_bin, pki::TestCa, run_any, scrape,
    wait_for,
};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

const HBA: &str = "local all all trust\nhost all all 127.0.0.0/8 trust\n";
const TOKEN: &str = "test-service-account-token";
/// The recording's addresses and the loopback ones standing in for them.
const CLUSTER_IP: (&str, &str) = ("10.96.0.10", "127.0.0.3");
const FIRST_POD: (&str, &str) = ("10.244.1.5", "127.0.0.4");
const NEW_POD: (&str, &str) = ("10.244.2.7", "127.0.0.5");
const NOT_READY_POD: (&str, &str) = ("10.244.1.9", "127.0.0.6");

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn data(file: &str) -> String {
    fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("data/k8s")
            .join(file),
    )
    .unwrap()
}

/// The recording with its addresses and ports replaced by the test's.
fn recorded(file: &str, svc_port: u16, ep_port: u16) -> String {
    let mut t = data(file);
    for (from, to) in [CLUSTER_IP, FIRST_POD, NEW_POD, NOT_READY_POD] {
        t = t.replace(&format!("\"{from}\""), &format!("\"{to}\""));
    }
    t.replace("\"port\":5432", &format!("\"port\":{svc_port}"))
        .replace("\"port\": 5432", &format!("\"port\": {svc_port}"))
        .replace("\"port\":5433", &format!("\"port\":{ep_port}"))
        .replace("\"port\": 5433", &format!("\"port\": {ep_port}"))
}

/// What the fake API server serves and has seen.
struct ApiState {
    services: String,
    slices: String,
    relist: String,
    /// Watch events released so far: (resource version, line).
    released: Mutex<Vec<(u64, String)>>,
    /// Every request's path and query.
    requests: Mutex<Vec<String>>,
    broken: AtomicBool,
}

impl ApiState {
    fn gone(&self) -> bool {
        self.released
            .lock()
            .unwrap()
            .iter()
            .any(|(_, l)| l.contains("\"ERROR\""))
    }
}

/// An API server on 127.0.0.1 that answers the agent's LISTs and WATCHes
/// from the recording, and the service account directory pointing at it.
struct FakeApi {
    port: u16,
    state: Arc<ApiState>,
    _ca: TestCa,
    sa_dir: tempfile::TempDir,
    stream: Vec<String>,
    _thread: std::thread::JoinHandle<()>,
}

impl FakeApi {
    fn start(svc_port: u16, ep_port: u16) -> Self {
        let ca = TestCa::new("interceptor k8s test CA");
        let issued = ca.issue("apiserver", &["127.0.0.1"], None);
        let sa_dir = tempfile::tempdir().unwrap();
        fs::copy(&ca.cert, sa_dir.path().join("ca.crt")).unwrap();
        fs::write(sa_dir.path().join("token"), format!("{TOKEN}\n")).unwrap();
        let state = Arc::new(ApiState {
            services: recorded("services-list.json", svc_port, ep_port),
            slices: recorded("endpointslices-list.json", svc_port, ep_port),
            relist: recorded("endpointslices-relist.json", svc_port, ep_port),
            released: Mutex::new(Vec::new()),
            requests: Mutex::new(Vec::new()),
            broken: AtomicBool::new(false),
        });
        let stream = recorded("endpointslices-watch.jsonl", svc_port, ep_port)
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(str::to_owned)
            .collect();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let config = server_config(&issued.cert, &issued.key);
        let st = Arc::clone(&state);
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(serve(listener, config, st));
        });
        Self {
            port,
            state,
            _ca: ca,
            sa_dir,
            stream,
            _thread: thread,
        }
    }

    /// The agent's environment: in a cluster whose API server is this one.
    fn env(&self) -> Vec<(&'static str, std::ffi::OsString)> {
        vec![
            ("KUBERNETES_SERVICE_HOST", "127.0.0.1".into()),
            ("KUBERNETES_SERVICE_PORT", self.port.to_string().into()),
            ("INTERCEPTOR_K8S_SA_DIR", self.sa_dir.path().into()),
        ]
    }

    /// Releases the recorded watch events `range` (0-based) to the
    /// EndpointSlice watch.
    fn release(&self, range: std::ops::Range<usize>) {
        let mut r = self.state.released.lock().unwrap();
        for line in &self.stream[range] {
            let v: Value = serde_json::from_str(line).unwrap();
            // An ERROR carries no version: it reaches every watch begun
            // before the re-list's version.
            let rv = v["object"]["metadata"]["resourceVersion"]
                .as_str()
                .map_or(48_400, |s| s.parse().unwrap());
            r.push((rv, line.clone()));
        }
    }

    fn requests(&self, pred: impl Fn(&str) -> bool) -> usize {
        self.state
            .requests
            .lock()
            .unwrap()
            .iter()
            .filter(|p| pred(p))
            .count()
    }
}

fn server_config(cert: &Path, key: &Path) -> Arc<rustls::ServerConfig> {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _};
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let key = PrivateKeyDer::from_pem_file(key).unwrap();
    Arc::new(
        rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap(),
    )
}

async fn serve(
    listener: std::net::TcpListener,
    config: Arc<rustls::ServerConfig>,
    st: Arc<ApiState>,
) {
    let listener = tokio::net::TcpListener::from_std(listener).unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let (acceptor, st) = (acceptor.clone(), Arc::clone(&st));
        tokio::spawn(async move {
            if let Ok(tls) = acceptor.accept(tcp).await {
                handle(tls, st).await;
            }
        });
    }
}

async fn reply(s: &mut (impl tokio::io::AsyncWrite + Unpin), code: &str, body: &str) {
    let head = format!(
        "HTTP/1.1 {code}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    let _ = s.write_all(head.as_bytes()).await;
    let _ = s.write_all(body.as_bytes()).await;
    let _ = s.flush().await;
}

fn status_body(code: u16, reason: &str, message: &str) -> String {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
    .to_string()
}

async fn handle(mut s: tokio_rustls::server::TlsStream<tokio::net::TcpStream>, st: Arc<ApiState>) {
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let path = head.split(' ').nth(1).unwrap_or_default().to_owned();
    st.requests.lock().unwrap().push(path.clone());
    let authorized = head.lines().any(|l| {
        l.to_ascii_lowercase().starts_with("authorization:")
            && l.split_once(':').unwrap().1.trim() == format!("Bearer {TOKEN}")
    });
    if !authorized {
        return reply(
            &mut s,
            "401 Unauthorized",
            &status_body(401, "Unauthorized", "no token"),
        )
        .await;
    }
    if st.broken.load(Ordering::SeqCst) {
        return reply(
            &mut s,
            "503 Service Unavailable",
            &status_body(503, "ServiceUnavailable", "the test broke the API server"),
        )
        .await;
    }
    let services =
        path.starts_with("/api/v1/namespaces/prod/services?fieldSelector=metadata.name%3Dpg");
    let slices = path.starts_with(
        "/apis/discovery.k8s.io/v1/namespaces/prod/endpointslices?labelSelector=kubernetes.io%2Fservice-name%3Dpg",
    );
    if !services && !slices {
        return reply(
            &mut s,
            "404 Not Found",
            &status_body(404, "NotFound", &path),
        )
        .await;
    }
    if !path.contains("watch=1") {
        let body = if services {
            st.services.clone()
        } else if st.gone() {
            st.relist.clone()
        } else {
            st.slices.clone()
        };
        return reply(&mut s, "200 OK", &body).await;
    }
    let from: u64 = path
        .split('&')
        .find_map(|kv| kv.strip_prefix("resourceVersion="))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let head =
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n";
    if s.write_all(head.as_bytes()).await.is_err() {
        return;
    }
    let _ = s.flush().await;
    let mut sent = 0;
    loop {
        if st.broken.load(Ordering::SeqCst) {
            // Cut off mid-stream, as a dying API server would.
            return;
        }
        let lines: Vec<(u64, String)> = if slices {
            st.released.lock().unwrap()[sent..].to_vec()
        } else {
            Vec::new()
        };
        for (rv, line) in lines {
            sent += 1;
            if rv <= from {
                continue;
            }
            let chunk = format!("{:x}\r\n{line}\n\r\n", line.len() + 1);
            if s.write_all(chunk.as_bytes()).await.is_err() {
                return;
            }
            let _ = s.flush().await;
            if line.contains("\"ERROR\"") {
                let _ = s.write_all(b"0\r\n\r\n").await;
                let _ = s.flush().await;
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn policy(svc_port: u16) -> String {
    format!(
        "version: 1\ndefault: allow\ntargets:\n  - {{name: db, protocol: postgres, service: prod/pg, port: {svc_port}}}\nrules:\n  - {{name: no-ddl, kinds: [ddl], decision: deny}}\n"
    )
}

/// A DDL statement from the test cgroup to `host:port`: denied (42501)
/// when redirected, run by the server when not.
fn drop_table(cg: &TestCgroup, host: &str, port: u16) -> Output {
    run_any(cg.command(pg_bin("psql").to_str().unwrap()).args([
        "-X",
        "-h",
        host,
        "-p",
        &port.to_string(),
        "-U",
        "postgres",
        "-d",
        "postgres",
        "-v",
        "ON_ERROR_STOP=1",
        "-Atc",
        "drop table if exists nope",
    ]))
}

fn denied(out: &Output) -> bool {
    !out.status.success()
        && (text(&out.stderr).contains("42501")
            || text(&out.stderr).contains("interceptor: denied by rule"))
}

fn status(agent: &Agent) -> Value {
    let out = agent.cli(&["status", "--json"]);
    assert!(out.status.success(), "status: {}", text(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn addresses(agent: &Agent) -> Value {
    status(agent)["targets"][0]["resolved"]["addresses"].clone()
}

/// Waits until `status` shows `want` as the Service's addresses.
fn wait_addresses(agent: &Agent, want: &Value) {
    let start = std::time::Instant::now();
    while addresses(agent) != *want {
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "addresses {} never became {want}; events:\n{}\nagent log:\n{}",
            addresses(agent),
            agent
                .events()
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("\n"),
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn connects_to(agent: &Agent, dst: &str) -> usize {
    agent
        .events()
        .iter()
        .filter(|e| e["event"] == "connect" && e["dst"] == dst)
        .count()
}

/// Redirected and decided as target `db`: the statement is denied and
/// the agent audited a connect to `host:port`.
fn assert_redirected(agent: &Agent, cg: &TestCgroup, host: &str, port: u16) {
    let dst = format!("{host}:{port}");
    let before = connects_to(agent, &dst);
    let out = drop_table(cg, host, port);
    assert!(denied(&out), "{dst}: {}", text(&out.stderr));
    // The audit writer may lag the client's exit: wait for this
    // connection's record, not an earlier one to the same address.
    wait_for(
        &format!("a new connect to {dst}"),
        Duration::from_secs(15),
        || connects_to(agent, &dst) > before,
    );
    let c = agent
        .events()
        .into_iter()
        .rev()
        .find(|e| e["event"] == "connect" && e["dst"] == dst.as_str())
        .unwrap();
    assert_eq!(c["target"], "db", "{c}");
}

fn assert_direct(agent: &Agent, cg: &TestCgroup, host: &str, port: u16) {
    let dst = format!("{host}:{port}");
    let before = connects_to(agent, &dst);
    let out = drop_table(cg, host, port);
    assert!(out.status.success(), "{dst}: {}", text(&out.stderr));
    assert_eq!(connects_to(agent, &dst), before, "{dst} was redirected");
}

#[test]
fn a_service_target_follows_its_endpoints() {
    let svc_port = free_port();
    let ep_port = free_port();
    // The ClusterIP at the Service port; the pods at the endpoint port.
    let _cluster = PgServer::start_port(None, CLUSTER_IP.1, &[], Some(HBA), svc_port);
    let _pods = PgServer::start_port(
        None,
        &format!("{},{}", FIRST_POD.1, NEW_POD.1),
        &[],
        Some(HBA),
        ep_port,
    );
    let api = FakeApi::start(svc_port, ep_port);
    let cg = TestCgroup::new();
    let metrics = free_port();
    let env = api.env();
    let env: Vec<(&str, &OsStr)> = env.iter().map(|(k, v)| (*k, v.as_os_str())).collect();
    let agent = Agent::start_wrapped(
        &policy(svc_port),
        &cg,
        &["--metrics", &format!("127.0.0.1:{metrics}")],
        &[],
        &env,
    );
    let cluster = format!("{}:{svc_port}", CLUSTER_IP.1);
    let first = format!("{}:{ep_port}", FIRST_POD.1);
    let moved = format!("{}:{ep_port}", NEW_POD.1);

    // The LISTs: the ClusterIP at the Service port and the ready pod at
    // the port its EndpointSlice names (the not-ready pod left out).
    let ev = agent.wait_event("the first listing", |e| e["event"] == "target_resolved");
    assert_eq!(ev["target"], "db");
    assert_eq!(ev["service"], "prod/pg");
    assert_eq!(ev["port"], svc_port);
    assert_eq!(ev["added"], json!([cluster, first]), "{ev}");
    assert_eq!(ev["removed"], json!([]));
    let st = status(&agent);
    assert_eq!(st["targets"][0]["service"], "prod/pg", "{st}");
    assert_eq!(addresses(&agent), json!([cluster, first]));
    let txt = text(&agent.cli(&["status"]).stdout);
    assert!(
        txt.contains(&format!("resolved to {cluster}, {first} at ")),
        "{txt}"
    );

    // Both the ClusterIP (kube-proxy rewrites after the socket hook) and
    // the endpoint (a socket-level balancer rewrites before it) are
    // redirected and decided; the pod not yet in the Service is not.
    assert_redirected(&agent, &cg, CLUSTER_IP.1, svc_port);
    assert_redirected(&agent, &cg, FIRST_POD.1, ep_port);
    assert_direct(&agent, &cg, NEW_POD.1, ep_port);

    // The watch: a new pod's slice (added not ready, then ready), then
    // the first pod's slice deleted. New connections follow.
    api.release(0..1);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(addresses(&agent), json!([cluster, first]), "not ready yet");
    api.release(1..3);
    wait_addresses(&agent, &json!([cluster, moved]));
    let ev = agent.wait_event("the new pod", |e| {
        e["event"] == "target_resolved" && e["added"] == json!([moved])
    });
    assert_eq!(ev["service"], "prod/pg", "{ev}");
    agent.wait_event("the first pod leaving", |e| {
        e["event"] == "target_resolved" && e["removed"] == json!([first])
    });
    assert_redirected(&agent, &cg, NEW_POD.1, ep_port);
    assert_direct(&agent, &cg, FIRST_POD.1, ep_port);
    assert_redirected(&agent, &cg, CLUSTER_IP.1, svc_port);

    // A bookmark, then 410 Gone: the agent LISTs again (the same
    // addresses), quietly.
    let lists = || api.requests(|p| p.contains("endpointslices") && !p.contains("watch=1"));
    assert_eq!(lists(), 1);
    api.release(3..5);
    let start = std::time::Instant::now();
    while lists() < 2 {
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "no re-list after 410"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(addresses(&agent), json!([cluster, moved]));
    assert!(
        !agent
            .events()
            .iter()
            .any(|e| e["event"] == "target_resolve_failed"),
        "410 is no failure"
    );

    // The API server fails: the last addresses stay in force, audited and
    // counted, and status says what went wrong.
    api.state.broken.store(true, Ordering::SeqCst);
    let ev = agent.wait_event("the failure", |e| e["event"] == "target_resolve_failed");
    assert_eq!(ev["target"], "db");
    assert_eq!(ev["service"], "prod/pg");
    assert_eq!(ev["addresses"], json!([cluster, moved]), "{ev}");
    assert!(ev["error"].is_string(), "{ev}");
    // The retry (a LIST after the backoff) fails too, with the server's
    // message.
    let ev = agent.wait_event("the failed re-list", |e| {
        e["event"] == "target_resolve_failed"
            && e["error"]
                .as_str()
                .is_some_and(|s| s.contains("broke the API server"))
    });
    assert!(ev["error"].as_str().unwrap().contains("503"), "{ev}");
    assert_eq!(addresses(&agent), json!([cluster, moved]));
    let st = status(&agent);
    assert!(
        st["targets"][0]["resolved"]["last_error"].is_string(),
        "{st}"
    );
    assert_redirected(&agent, &cg, NEW_POD.1, ep_port);
    assert_redirected(&agent, &cg, CLUSTER_IP.1, svc_port);
    let m = scrape(metrics);
    assert!(
        m.lines()
            .any(|l| l
                .starts_with("interceptor_audit_events_total{event=\"target_resolve_failed\"}")),
        "{m}"
    );

    // It comes back: watched again, nothing changed.
    api.state.broken.store(false, Ordering::SeqCst);
    let start = std::time::Instant::now();
    while status(&agent)["targets"][0]["resolved"]["last_error"].is_string() {
        assert!(start.elapsed() < Duration::from_secs(40), "never recovered");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(addresses(&agent), json!([cluster, moved]));
}

/// A token the API server does not take: audited as a failure, nothing
/// redirected, the agent serves on.
#[test]
fn a_refused_token_is_audited() {
    let svc_port = free_port();
    let api = FakeApi::start(svc_port, free_port());
    fs::write(api.sa_dir.path().join("token"), "wrong\n").unwrap();
    let cg = TestCgroup::new();
    let env = api.env();
    let env: Vec<(&str, &OsStr)> = env.iter().map(|(k, v)| (*k, v.as_os_str())).collect();
    let agent = Agent::start_wrapped(&policy(svc_port), &cg, &[], &[], &env);
    let ev = agent.wait_event("the failure", |e| e["event"] == "target_resolve_failed");
    assert_eq!(ev["service"], "prod/pg");
    assert!(ev["error"].as_str().unwrap().contains("401"), "{ev}");
    assert_eq!(ev["addresses"], json!([]));
    assert_eq!(addresses(&agent), json!([]));
    assert_eq!(status(&agent)["maps"]["TARGETS"]["entries"], 0);
}

/// Runs `cmd`, which must fail; its stderr.
fn refused(cmd: &mut Command) -> String {
    let out = run_any(cmd);
    assert!(!out.status.success());
    text(&out.stderr)
}

/// `cmd` as run outside any cluster.
fn outside(cmd: &mut Command) -> &mut Command {
    cmd.env_remove("KUBERNETES_SERVICE_HOST")
        .env_remove("KUBERNETES_SERVICE_PORT")
        .env_remove("INTERCEPTOR_K8S_SA_DIR")
}

/// Outside a cluster a policy naming a Service is refused, with the
/// reason: by `policy check`, at start, and on reload.
#[test]
fn outside_a_cluster_service_targets_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("policy.yaml");
    fs::write(&file, policy(5432)).unwrap();
    let err = refused(outside(
        Command::new(agent_bin())
            .args(["policy", "check"])
            .arg(&file),
    ));
    assert!(
        err.contains("target \"db\" (service prod/pg)")
            && err.contains("KUBERNETES_SERVICE_HOST is not set"),
        "{err}"
    );
    // A pod without a service account token.
    let err = refused(
        Command::new(agent_bin())
            .args(["policy", "check"])
            .arg(&file)
            .env("KUBERNETES_SERVICE_HOST", "127.0.0.1")
            .env("KUBERNETES_SERVICE_PORT", "443")
            .env("INTERCEPTOR_K8S_SA_DIR", dir.path()),
    );
    assert!(err.contains("no service account credentials"), "{err}");
    // `run` refuses before it touches a cgroup or the kernel.
    let state: PathBuf = dir.path().join("state");
    let err = refused(outside(
        Command::new(agent_bin())
            .arg("run")
            .arg("--policy")
            .arg(&file)
            .arg("--cgroup")
            .arg(dir.path())
            .arg("--state-dir")
            .arg(&state)
            .arg("--control-socket")
            .arg(dir.path().join("c.sock"))
            .arg("--audit-log")
            .arg(dir.path().join("audit.jsonl"))
            .arg("--pin-dir")
            .arg(dir.path().join("pins")),
    ));
    assert!(err.contains("KUBERNETES_SERVICE_HOST is not set"), "{err}");

    // A running agent (plain targets) rejects a reload that adds one.
    let port = free_port();
    let cg = TestCgroup::new();
    let mut agent = Agent::start(&interceptor_tests::pg_policy(port, ""), &cg, false);
    fs::write(&agent.policy, policy(port)).unwrap();
    let ev = agent.wait_event("the rejected reload", |e| {
        e["event"] == "policy" && e["status"] == "rejected"
    });
    assert!(
        ev["error"]
            .as_str()
            .unwrap()
            .contains("KUBERNETES_SERVICE_HOST is not set"),
        "{ev}"
    );
    assert!(agent.stop().success());
}
