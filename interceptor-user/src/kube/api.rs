//! The few Kubernetes API objects a `service:` target needs, parsed
//! leniently (the API adds fields; only what is read must be there), and
//! the addresses they add up to.
//!
//! Everything here is peer input: a malformed object is an error the
//! watcher audits, never a panic.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
};

use serde::Deserialize;
use serde_json::Value;

use super::KubeError;

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct Meta {
    pub name: String,
    pub resource_version: String,
}

/// `ServiceList`, `EndpointSliceList`.
#[derive(Debug, Deserialize)]
#[serde(bound(deserialize = "T: Deserialize<'de>"))]
pub struct List<T> {
    #[serde(default)]
    pub metadata: Meta,
    #[serde(default = "Vec::new", deserialize_with = "null_as_empty")]
    pub items: Vec<T>,
}

fn null_as_empty<'de, D, T>(d: D) -> Result<Vec<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Ok(Option::<Vec<T>>::deserialize(d)?.unwrap_or_default())
}

#[derive(Clone, Debug, Deserialize)]
pub struct Service {
    #[serde(default)]
    pub metadata: Meta,
    #[serde(default)]
    pub spec: ServiceSpec,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct ServiceSpec {
    #[serde(rename = "clusterIP")]
    pub cluster_ip: Option<String>,
    #[serde(rename = "clusterIPs")]
    pub cluster_ips: Option<Vec<String>>,
    pub ports: Option<Vec<ServicePort>>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct ServicePort {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub protocol: Option<String>,
    pub port: u16,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointSlice {
    #[serde(default)]
    pub metadata: Meta,
    #[serde(default)]
    pub address_type: String,
    #[serde(default, deserialize_with = "null_as_empty")]
    pub endpoints: Vec<Endpoint>,
    #[serde(default, deserialize_with = "null_as_empty")]
    pub ports: Vec<EndpointPort>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct Endpoint {
    #[serde(default, deserialize_with = "null_as_empty")]
    pub addresses: Vec<String>,
    #[serde(default)]
    pub conditions: Conditions,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct Conditions {
    /// Absent means unknown, which the API says to read as ready.
    pub ready: Option<bool>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct EndpointPort {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub protocol: Option<String>,
    /// Absent: every port (only on selector-less headless Services).
    #[serde(default)]
    pub port: Option<u16>,
}

/// `metav1.Status`, as an error reply or a watch `ERROR` event.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct Status {
    pub code: u16,
    pub reason: String,
    pub message: String,
}

/// One line of a watch stream.
#[derive(Debug)]
pub enum Event<T> {
    Added(T),
    Modified(T),
    Deleted(T),
    /// Only the resource version moved on.
    Bookmark(String),
}

#[derive(Deserialize)]
struct RawEvent {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    object: Value,
}

/// Parses one watch line.
///
/// # Errors
/// [`KubeError::Gone`] for an `ERROR` event with code 410 (re-list), other
/// `ERROR`s as [`KubeError::Status`], anything malformed as
/// [`KubeError::Malformed`].
pub fn parse_event<T: serde::de::DeserializeOwned>(line: &[u8]) -> Result<Event<T>, KubeError> {
    let raw: RawEvent = serde_json::from_slice(line).map_err(|e| malformed("watch event", &e))?;
    let object = |o: Value| serde_json::from_value::<T>(o).map_err(|e| malformed(&raw.kind, &e));
    match raw.kind.as_str() {
        "ADDED" => object(raw.object).map(Event::Added),
        "MODIFIED" => object(raw.object).map(Event::Modified),
        "DELETED" => object(raw.object).map(Event::Deleted),
        "BOOKMARK" => {
            let meta: Meta = raw
                .object
                .get("metadata")
                .cloned()
                .map(serde_json::from_value)
                .transpose()
                .map_err(|e| malformed("BOOKMARK", &e))?
                .unwrap_or_default();
            Ok(Event::Bookmark(meta.resource_version))
        }
        "ERROR" => {
            let status: Status =
                serde_json::from_value(raw.object).map_err(|e| malformed("ERROR", &e))?;
            Err(status.into())
        }
        other => Err(KubeError::Malformed(format!(
            "watch event of unknown type {:?}",
            other.chars().take(32).collect::<String>()
        ))),
    }
}

fn malformed(what: &str, e: &serde_json::Error) -> KubeError {
    KubeError::Malformed(format!(
        "{}: {e}",
        what.chars().take(32).collect::<String>()
    ))
}

/// Parses a LIST reply.
///
/// # Errors
/// [`KubeError::Malformed`].
pub fn parse_list<T: serde::de::DeserializeOwned>(
    body: &[u8],
    what: &str,
) -> Result<List<T>, KubeError> {
    serde_json::from_slice(body).map_err(|e| malformed(what, &e))
}

impl From<Status> for KubeError {
    fn from(s: Status) -> Self {
        if s.code == 410 {
            Self::Gone
        } else {
            Self::Status {
                code: s.code,
                message: if s.message.is_empty() {
                    s.reason
                } else {
                    s.message
                },
            }
        }
    }
}

/// A Service and its EndpointSlices as last listed and watched.
#[derive(Clone, Debug, Default)]
pub struct ServiceView {
    pub service: Option<Service>,
    pub slices: BTreeMap<String, EndpointSlice>,
}

fn is_tcp(protocol: Option<&String>) -> bool {
    protocol.is_none_or(|p| p == "TCP")
}

impl ServiceView {
    /// The addresses to redirect for Service port `port`: each ClusterIP at
    /// `port`, and each ready endpoint at the port its EndpointSlice gives
    /// the same port name (how kube-proxy maps `port` to `targetPort`).
    ///
    /// # Errors
    /// When the Service is absent or has no TCP port `port`, or an address
    /// does not parse; the caller keeps the last good addresses.
    pub fn addresses(&self, key: &str, port: u16) -> Result<Vec<SocketAddr>, String> {
        let svc = self
            .service
            .as_ref()
            .ok_or_else(|| format!("service {key} does not exist"))?;
        let ports = svc.spec.ports.as_deref().unwrap_or_default();
        let sp = ports
            .iter()
            .find(|p| p.port == port && is_tcp(p.protocol.as_ref()))
            .ok_or_else(|| {
                let have: Vec<String> = ports.iter().map(|p| p.port.to_string()).collect();
                format!(
                    "service {key} has no TCP port {port} (its ports: {})",
                    if have.is_empty() {
                        "none".to_owned()
                    } else {
                        have.join(", ")
                    }
                )
            })?;
        let port_name = sp.name.as_deref().unwrap_or_default();
        let ip = |s: &str| {
            s.parse::<IpAddr>()
                .map_err(|_| format!("service {key}: bad address {:?}", trunc(s)))
        };
        let mut out = Vec::new();
        let cluster: Vec<&String> = match &svc.spec.cluster_ips {
            Some(v) if !v.is_empty() => v.iter().collect(),
            _ => svc.spec.cluster_ip.iter().collect(),
        };
        for c in cluster {
            // Headless Services say "None"; ExternalName ones say nothing.
            if c.is_empty() || c == "None" {
                continue;
            }
            out.push(SocketAddr::new(ip(c)?, port));
        }
        for slice in self.slices.values() {
            if slice.address_type != "IPv4" && slice.address_type != "IPv6" {
                // FQDN slices name hosts, not addresses.
                continue;
            }
            let Some(ep_port) = slice
                .ports
                .iter()
                .find(|p| {
                    p.name.as_deref().unwrap_or_default() == port_name
                        && is_tcp(p.protocol.as_ref())
                })
                .and_then(|p| p.port)
            else {
                continue;
            };
            for ep in &slice.endpoints {
                if ep.conditions.ready == Some(false) {
                    continue;
                }
                for a in &ep.addresses {
                    out.push(SocketAddr::new(ip(a)?, ep_port));
                }
            }
        }
        Ok(out)
    }
}

fn trunc(s: &str) -> String {
    s.chars().take(64).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SERVICES: &str = include_str!("../../../tests/data/k8s/services-list.json");
    const SLICES: &str = include_str!("../../../tests/data/k8s/endpointslices-list.json");
    const WATCH: &str = include_str!("../../../tests/data/k8s/endpointslices-watch.jsonl");

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn recorded() -> ServiceView {
        let services: List<Service> = parse_list(SERVICES.as_bytes(), "services").unwrap();
        let slices: List<EndpointSlice> = parse_list(SLICES.as_bytes(), "slices").unwrap();
        assert!(!services.metadata.resource_version.is_empty());
        ServiceView {
            service: services.items.into_iter().next(),
            slices: slices
                .items
                .into_iter()
                .map(|s| (s.metadata.name.clone(), s))
                .collect(),
        }
    }

    #[test]
    fn recorded_lists_give_cluster_ip_and_ready_endpoints() {
        let view = recorded();
        let mut got = view.addresses("prod/pg", 5432).unwrap();
        got.sort();
        // The not-ready endpoint (10.244.1.9) is left out; the endpoint
        // port is the slice's port named like the Service port.
        assert_eq!(got, [sa("10.96.0.10:5432"), sa("10.244.1.5:5433")]);
        let err = view.addresses("prod/pg", 5433).unwrap_err();
        assert!(
            err.contains("no TCP port 5433") && err.contains("5432"),
            "{err}"
        );
        assert!(
            ServiceView::default()
                .addresses("prod/pg", 5432)
                .unwrap_err()
                .contains("does not exist")
        );
    }

    #[test]
    fn recorded_watch_stream_parses() {
        let mut view = recorded();
        let mut seen = Vec::new();
        for line in WATCH.lines().filter(|l| !l.trim().is_empty()) {
            match parse_event::<EndpointSlice>(line.as_bytes()) {
                Ok(Event::Added(s) | Event::Modified(s)) => {
                    seen.push("upsert");
                    view.slices.insert(s.metadata.name.clone(), s);
                }
                Ok(Event::Deleted(s)) => {
                    seen.push("delete");
                    view.slices.remove(&s.metadata.name);
                }
                Ok(Event::Bookmark(rv)) => {
                    assert!(!rv.is_empty());
                    seen.push("bookmark");
                }
                Err(KubeError::Gone) => seen.push("gone"),
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(seen, ["upsert", "upsert", "delete", "bookmark", "gone"]);
        // After the stream: the first endpoint left, a new one is ready.
        let mut got = view.addresses("prod/pg", 5432).unwrap();
        got.sort();
        assert_eq!(got, [sa("10.96.0.10:5432"), sa("10.244.2.7:5433")]);
    }

    #[test]
    fn named_ports_ipv6_headless_and_fqdn() {
        let svc: Service = serde_json::from_str(
            r#"{"metadata":{"name":"h"},"spec":{"clusterIP":"None","clusterIPs":["None"],
                "ports":[{"name":"a","port":80},{"name":"pg","port":5432,"protocol":"TCP"},
                         {"name":"pgu","port":5432,"protocol":"UDP"}]}}"#,
        )
        .unwrap();
        let slice = |name: &str, ty: &str, addr: &str, port: &str| -> EndpointSlice {
            serde_json::from_str(&format!(
                r#"{{"metadata":{{"name":"{name}"}},"addressType":"{ty}",
                    "endpoints":[{{"addresses":["{addr}"]}}],
                    "ports":[{{"name":"a","port":8080}},{port}]}}"#
            ))
            .unwrap()
        };
        let view = ServiceView {
            service: Some(svc),
            slices: [
                slice("s1", "IPv6", "fd00::5", r#"{"name":"pg","port":6000}"#),
                // A pod whose named targetPort is another number.
                slice("s2", "IPv4", "10.0.0.8", r#"{"name":"pg","port":6001}"#),
                slice("s3", "FQDN", "db.example", r#"{"name":"pg","port":6002}"#),
                slice("s4", "IPv4", "10.0.0.9", r#"{"name":"other","port":6003}"#),
            ]
            .into_iter()
            .map(|s| (s.metadata.name.clone(), s))
            .collect(),
        };
        let mut got = view.addresses("x/h", 5432).unwrap();
        got.sort();
        assert_eq!(got, [sa("10.0.0.8:6001"), sa("[fd00::5]:6000")]);
    }

    #[test]
    fn malformed_input_is_an_error_not_a_panic() {
        for bad in [
            &b""[..],
            b"{",
            b"null",
            b"{\"type\":\"ADDED\"}",
            b"{\"type\":\"ADDED\",\"object\":{\"addressType\":7}}",
            b"{\"type\":\"WHAT\",\"object\":{}}",
            b"{\"type\":\"ERROR\",\"object\":{\"code\":500,\"message\":\"boom\"}}",
        ] {
            assert!(parse_event::<EndpointSlice>(bad).is_err(), "{bad:?}");
        }
        assert!(matches!(
            parse_event::<Service>(
                br#"{"type":"ERROR","object":{"kind":"Status","code":410,"reason":"Expired"}}"#
            ),
            Err(KubeError::Gone)
        ));
        let svc: Service = serde_json::from_str(
            r#"{"metadata":{"name":"x"},"spec":{"clusterIPs":["10.0.0.300"],"ports":[{"port":1}]}}"#,
        )
        .unwrap();
        let view = ServiceView {
            service: Some(svc),
            slices: BTreeMap::new(),
        };
        assert!(
            view.addresses("a/x", 1)
                .unwrap_err()
                .contains("bad address")
        );
        assert!(
            parse_list::<Service>(
                b"{\"items\":[{\"spec\":{\"ports\":[{\"port\":70000}]}}]}",
                "s"
            )
            .is_err()
        );
        assert!(
            parse_list::<Service>(b"{\"items\":null}", "s")
                .unwrap()
                .items
                .is_empty()
        );
        // Every prefix of a recorded list is an error, never a panic.
        for n in 0..SLICES.len() {
            let _ = parse_list::<EndpointSlice>(&SLICES.as_bytes()[..n], "slices");
        }
    }
}
