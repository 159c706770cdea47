//! Which subjects each user may publish and subscribe to: every fleetpipe service, and
//! a device. Derived from what the code does with the broker (see ARCHITECTURE.md):
//!
//! * the JetStream API is requests on `$JS.API.…` whose replies come to the requester's
//!   inbox, so every user subscribes to its own inbox prefix only (`_INBOX_<name>.>`,
//!   set with async-nats `ConnectOptions::custom_inbox_prefix`);
//! * a KV put is a publish on `$KV.<bucket>.<key>`; a KV get a direct get
//!   (`$JS.API.DIRECT.GET.KV_<bucket>.$KV.<bucket>.<key>`) or a `STREAM.MSG.GET`;
//! * a KV watch (the aggregator's and the API's mirrors) is an ordered push consumer:
//!   created, replaced and deleted through `CONSUMER.*` on `KV_<bucket>`, delivered to
//!   the inbox, with flow-control replies on `$JS.FC.…`;
//! * consumer acknowledgements and "in progress" go to `$JS.ACK.<stream>.<consumer>.…`
//!   (`$JS.ACK.<domain>.<account hash>.<stream>.<consumer>.…` in the v2 format).

use fleetpipe_proto::SubjectTemplate;

use super::jwt::Permission;
use crate::config::{names, Config};

/// The KV bucket holding each device's configuration, one key per device id.
pub const DEVICE_CONFIG_BUCKET: &str = names::CONFIG_BUCKET;

/// fleetpipe's own users. Each gets `<data-dir>/security/creds/<name>.creds`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Service {
    /// Creates and updates the broker objects (`broker::ensure`), runs CLI commands: every
    /// subject of the fleetpipe account.
    Admin,
    Collector,
    Aggregator,
    Api,
    Simulator,
    /// A user of the system account: pushes account JWTs (revocations) to the server.
    System,
}

impl Service {
    pub const ALL: [Service; 6] = [
        Service::Admin,
        Service::Collector,
        Service::Aggregator,
        Service::Api,
        Service::Simulator,
        Service::System,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Service::Admin => "admin",
            Service::Collector => "collector",
            Service::Aggregator => "aggregator",
            Service::Api => "api",
            Service::Simulator => "simulator",
            Service::System => "system",
        }
    }

    /// The inbox prefix this user's connections must use (`ConnectOptions::custom_inbox_prefix`).
    pub fn inbox_prefix(self) -> String {
        format!("_INBOX_{}", self.name())
    }
}

fn api(s: &str) -> String {
    format!("$JS.API.{s}")
}

/// Reading messages of a stream by sequence or subject, direct or through the leader.
fn stream_reads(stream: &str) -> [String; 3] {
    [
        api(&format!("STREAM.MSG.GET.{stream}")),
        api(&format!("DIRECT.GET.{stream}")),
        api(&format!("DIRECT.GET.{stream}.>")),
    ]
}

/// Pulling from a durable consumer and acknowledging what it delivers.
fn pull_consumer(stream: &str, consumer: &str) -> [String; 4] {
    [
        api(&format!("CONSUMER.INFO.{stream}.{consumer}")),
        api(&format!("CONSUMER.MSG.NEXT.{stream}.{consumer}")),
        format!("$JS.ACK.{stream}.{consumer}.>"),
        format!("$JS.ACK.*.*.{stream}.{consumer}.>"),
    ]
}

/// Watching a KV bucket: an ordered consumer created, recreated and deleted at will.
fn kv_watch(bucket: &str) -> [String; 6] {
    let stream = format!("KV_{bucket}");
    [
        api(&format!("CONSUMER.CREATE.{stream}")),
        api(&format!("CONSUMER.CREATE.{stream}.>")),
        api(&format!("CONSUMER.DELETE.{stream}.>")),
        api(&format!("CONSUMER.INFO.{stream}.>")),
        format!("$JS.FC.{stream}.>"),
        format!("$JS.FC.*.*.{stream}.>"),
    ]
}

/// Stream info on every fleetpipe stream and the collectors' consumer: how a service
/// opens its handles (`broker::open`, which creates nothing).
fn stream_infos(config: &Config) -> Vec<String> {
    let consumer = api(&format!(
        "CONSUMER.INFO.{}.{}",
        config.stream.name, config.collector.durable
    ));
    [
        config.stream.name.clone(),
        names::DLQ_STREAM.to_string(),
        names::ADVISORY_STREAM.to_string(),
        format!("KV_{}", names::STATE_BUCKET),
        format!("KV_{}", names::LEASE_BUCKET),
        format!("KV_{}", names::TOKEN_BUCKET),
        format!("KV_{}", names::CONFIG_BUCKET),
    ]
    .iter()
    .map(|s| api(&format!("STREAM.INFO.{s}")))
    .chain([consumer])
    .collect()
}

/// What `service` may publish and subscribe to, in this configuration.
pub fn service_permissions(service: Service, config: &Config) -> (Permission, Permission) {
    let inbox = vec![format!("{}.>", service.inbox_prefix())];
    let tel = config.stream.name.as_str();
    let durable = config.collector.durable.as_str();
    let state_stream = format!("KV_{}", names::STATE_BUCKET);
    let lease_stream = format!("KV_{}", names::LEASE_BUCKET);
    let mut publish: Vec<String> = match service {
        Service::Admin => return (Permission::allow([">"]), Permission::allow([">"])),
        Service::System => {
            return (
                Permission::allow([
                    "$SYS.REQ.CLAIMS.UPDATE".to_string(),
                    "$SYS.REQ.ACCOUNT.*.CLAIMS.UPDATE".to_string(),
                ]),
                Permission::allow(inbox),
            )
        }
        Service::Simulator => {
            let mut p = config.capture_subjects().unwrap_or_default();
            p.push(api("INFO"));
            return (Permission::allow(p), Permission::allow(inbox));
        }
        Service::Collector => {
            let mut p = stream_infos(config);
            p.extend(pull_consumer(tel, durable));
            p.extend(pull_consumer(
                names::ADVISORY_STREAM,
                names::ADVISORY_CONSUMER,
            ));
            // Max-delivery advisories: read the original message, then remove it.
            p.extend(stream_reads(tel));
            p.push(api(&format!("STREAM.MSG.DELETE.{tel}")));
            p.push(format!("{}.>", names::DLQ_SUBJECT_PREFIX));
            p.extend(stream_reads(names::DLQ_STREAM));
            p.push(format!("$KV.{}.>", names::STATE_BUCKET));
            p.extend(stream_reads(&state_stream));
            p
        }
        Service::Aggregator => {
            let mut p = stream_infos(config);
            p.extend(kv_watch(names::STATE_BUCKET));
            // Purges of idle state keys, and the lease.
            p.push(format!("$KV.{}.>", names::STATE_BUCKET));
            p.extend(stream_reads(&state_stream));
            p.push(format!("$KV.{}.>", names::LEASE_BUCKET));
            p.extend(stream_reads(&lease_stream));
            p
        }
        Service::Api => {
            let mut p = stream_infos(config);
            p.extend(kv_watch(names::STATE_BUCKET));
            p.extend(stream_reads(&state_stream));
            p.extend(stream_reads(names::DLQ_STREAM));
            // Bearer tokens: mirrored by a watch; written by the admin routes.
            let tokens_stream = format!("KV_{}", names::TOKEN_BUCKET);
            p.extend(kv_watch(names::TOKEN_BUCKET));
            p.extend(stream_reads(&tokens_stream));
            p.push(format!("$KV.{}.>", names::TOKEN_BUCKET));
            // Devices' live configuration: read and written by its routes.
            p.extend(stream_reads(&format!("KV_{}", names::CONFIG_BUCKET)));
            p.push(format!("$KV.{}.>", names::CONFIG_BUCKET));
            p
        }
    };
    publish.push(api("INFO"));
    (Permission::allow(publish), Permission::allow(inbox))
}

/// The subjects device `id` publishes telemetry on: the template up to `{device}`, other
/// placeholders as `*`, the id, then `>` (`vehicle.ID.>`, `acme.*.ID.>`).
pub fn device_telemetry_filter(template: &SubjectTemplate, id: &str) -> String {
    let mut parts = Vec::new();
    for token in template.as_str().split('.') {
        match token {
            "{device}" => {
                parts.push(id);
                break;
            }
            t if t.starts_with('{') => parts.push("*"),
            t => parts.push(t),
        }
    }
    parts.push(">");
    parts.join(".")
}

/// The inbox prefix a device must use: its JetStream publish acks come there.
pub fn device_inbox_prefix(id: &str) -> String {
    format!("_INBOX_{id}")
}

/// What device `id` may do: publish its own telemetry, receive replies on its own inbox,
/// read its own configuration key (direct get, and a core subscription for changes).
/// Nothing else. `id` must be valid (see [`super::check_device_id`]).
pub fn device_permissions(template: &SubjectTemplate, id: &str) -> (Permission, Permission) {
    let b = DEVICE_CONFIG_BUCKET;
    let publish = Permission::allow([
        device_telemetry_filter(template, id),
        format!("$JS.API.DIRECT.GET.KV_{b}.$KV.{b}.{id}"),
    ]);
    let subscribe = Permission::allow([
        format!("{}.>", device_inbox_prefix(id)),
        format!("$KV.{b}.{id}"),
    ]);
    (publish, subscribe)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_device_gets_its_own_subjects_only() {
        let t = SubjectTemplate::parse("vehicle.{device}.{sensor}").unwrap();
        let (p, s) = device_permissions(&t, "d-1");
        assert_eq!(
            p.allow,
            [
                "vehicle.d-1.>",
                "$JS.API.DIRECT.GET.KV_fleetpipe_config.$KV.fleetpipe_config.d-1"
            ]
        );
        assert_eq!(s.allow, ["_INBOX_d-1.>", "$KV.fleetpipe_config.d-1"]);
        let deep = SubjectTemplate::parse("acme.{site}.{area}.{device}.{sensor}").unwrap();
        assert_eq!(device_telemetry_filter(&deep, "m7"), "acme.*.*.m7.>");
        let first = SubjectTemplate::parse("{device}.{sensor}").unwrap();
        assert_eq!(device_telemetry_filter(&first, "m7"), "m7.>");
    }

    #[test]
    fn services_subscribe_to_their_inbox_only() {
        let config = Config::default();
        for service in Service::ALL {
            let (p, s) = service_permissions(service, &config);
            assert!(!p.allow.is_empty());
            if service != Service::Admin {
                assert_eq!(s.allow, [format!("_INBOX_{}.>", service.name())]);
                assert!(
                    !p.allow.iter().any(|x| x == ">" || x == "vehicle.>")
                        || service == Service::Simulator
                );
            }
        }
        let (p, _) = service_permissions(Service::Simulator, &config);
        assert!(p.allow.contains(&"vehicle.>".to_string()));
    }
}
