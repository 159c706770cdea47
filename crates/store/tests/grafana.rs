//! The Grafana provisioning under `deploy/grafana/`.
//!
//! * The data source file keeps every connection setting in the environment (the password
//!   in `secureJsonData`), and the dashboard provider points at `deploy/grafana/dashboards`.
//! * Every dashboard refers to the provisioned data source by its uid.
//! * Every panel's SQL (and every template variable's), expanded the way Grafana's
//!   PostgreSQL data source expands it for "last 15 minutes", returns rows from a real
//!   PostgreSQL holding pipeline data written through the `Store` API, over a connection
//!   built from the data source file itself.
//!
//! Expansion follows Grafana in two steps. The front end replaces template variables first
//! (`SqlDatasource.interpolateVariable`: a single-value variable is inserted as is with `'`
//! doubled, so the SQL quotes it — `device = '$device'`; a multi-value or "All" variable is
//! inserted quoted). The back end then expands macros (`pkg/tsdb/grafana-postgresql-datasource/
//! macros.go`). Anything left that looks like a macro or a variable fails the test, so a new
//! macro cannot reach PostgreSQL unexpanded and pass by accident.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use fleetpipe_proto::{Reading, Timestamp};
use fleetpipe_store::{open, Record, Snapshot, Store};
use fleetpipe_testkit::PgServer;
use serde_json::{json, Value};
use tokio_postgres::{Client, SimpleQueryMessage};

const DATASOURCE_UID: &str = "fleetpipe-pg";
const DATASOURCE_TYPE: &str = "grafana-postgresql-datasource";
/// `options.path` of the dashboard provider, relative to the repository root.
const DASHBOARDS_PATH: &str = "deploy/grafana/dashboards";

const SEC: i64 = 1_000_000;
const DEVICES: [&str; 3] = ["v001", "v002", "v003"];

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn provisioning(file: &str) -> PathBuf {
    repo_root().join("deploy/grafana/provisioning").join(file)
}

// ------------------------------------------------------------------ provisioning files

#[test]
fn datasource_settings_come_from_the_environment() {
    let ds = read_yaml(&provisioning("datasources/fleetpipe.yaml"));
    assert_eq!(get(&ds, "apiVersion"), "1");
    assert_eq!(get(&ds, "datasources[0].uid"), DATASOURCE_UID);
    assert_eq!(get(&ds, "datasources[0].type"), DATASOURCE_TYPE);
    assert_eq!(get(&ds, "datasources[0].access"), "proxy");
    assert!(
        !ds.keys().any(|k| k.starts_with("datasources[1]")),
        "one data source"
    );
    for (key, var) in [
        ("url", "FLEETPIPE_PG_HOST"),
        ("user", "FLEETPIPE_PG_USER"),
        ("jsonData.database", "FLEETPIPE_PG_DATABASE"),
        ("jsonData.sslmode", "FLEETPIPE_PG_SSLMODE"),
        ("secureJsonData.password", "FLEETPIPE_PG_PASSWORD"),
    ] {
        assert_eq!(
            get(&ds, &format!("datasources[0].{key}")),
            format!("${{{var}}}"),
            "datasources[0].{key}"
        );
    }
    // A credential anywhere else would be stored in plain text, or committed.
    for (key, value) in &ds {
        let leaf = key.rsplit('.').next().unwrap_or(key).to_ascii_lowercase();
        if ["password", "secret", "token"]
            .iter()
            .any(|w| leaf.contains(w))
        {
            assert!(
                key.contains(".secureJsonData."),
                "{key} is outside secureJsonData"
            );
            assert!(
                value.starts_with("${") || value.starts_with("$__env{"),
                "{key} is not taken from the environment: {value:?}"
            );
        }
    }
}

#[test]
fn dashboard_provider_loads_the_dashboards() {
    let p = read_yaml(&provisioning("dashboards/fleetpipe.yaml"));
    assert_eq!(get(&p, "apiVersion"), "1");
    assert_eq!(get(&p, "providers[0].type"), "file");
    assert_eq!(get(&p, "providers[0].options.path"), DASHBOARDS_PATH);
    assert!(
        !p.keys().any(|k| k.starts_with("providers[1]")),
        "one provider"
    );
    let names: Vec<String> = dashboards().into_iter().map(|(name, _)| name).collect();
    for want in ["fleet-overview.json", "vehicle-detail.json"] {
        assert!(names.iter().any(|n| n == want), "{want} missing: {names:?}");
    }
}

#[test]
fn dashboards_use_the_provisioned_datasource() {
    let mut uids = BTreeSet::new();
    for (name, dash) in dashboards() {
        // The "export for sharing" form asks for a data source on import instead.
        assert!(dash.get("__inputs").is_none(), "{name}: has __inputs");
        let uid = dash["uid"].as_str().unwrap_or_default();
        assert!(!uid.is_empty(), "{name}: no uid");
        assert!(uids.insert(uid.to_string()), "{name}: uid {uid} used twice");
        assert!(dash["title"].as_str().is_some_and(|t| !t.is_empty()));
        let schema = dash["schemaVersion"].as_u64().unwrap_or(0);
        assert!(
            (36..=41).contains(&schema),
            "{name}: schemaVersion {schema}"
        );

        // Every data source reference, wherever it is, is the provisioned one.
        let mut refs = 0;
        each_datasource_ref(&dash, &mut |at, ds| {
            refs += 1;
            assert_eq!(
                ds,
                &json!({"type": DATASOURCE_TYPE, "uid": DATASOURCE_UID}),
                "{name}: {at}"
            );
        });

        let panels = query_panels(&dash);
        assert!(
            (4..=6).contains(&panels.len()),
            "{name}: {} panels",
            panels.len()
        );
        let mut ids = BTreeSet::new();
        for panel in &panels {
            let title = panel["title"].as_str().unwrap_or("?");
            assert!(ids.insert(panel["id"].as_u64()), "{name}: panel id twice");
            assert!(
                panel["datasource"].is_object(),
                "{name}/{title}: no datasource"
            );
            let targets = panel["targets"].as_array().map(Vec::as_slice);
            assert!(
                targets.is_some_and(|t| !t.is_empty()),
                "{name}/{title}: no targets"
            );
            for t in targets.unwrap_or_default() {
                assert!(
                    t["datasource"].is_object(),
                    "{name}/{title}: target datasource"
                );
                assert_eq!(t["rawQuery"], true, "{name}/{title}: not raw SQL");
                assert_eq!(t["editorMode"], "code", "{name}/{title}: builder mode");
                assert!(
                    matches!(t["format"].as_str(), Some("time_series" | "table")),
                    "{name}/{title}: format {}",
                    t["format"]
                );
                assert!(t["rawSql"].as_str().is_some_and(|s| !s.trim().is_empty()));
            }
        }
        for var in variables(&dash) {
            assert!(var["datasource"].is_object(), "{name}: variable datasource");
        }
        assert!(refs > panels.len(), "{name}: {refs} data source references");
    }
}

// ------------------------------------------------------------------ the queries, for real

#[tokio::test(flavor = "multi_thread")]
async fn every_panel_query_returns_rows() {
    let Some(pg) = PgServer::start_or_skip() else {
        return;
    };
    let url = pg.create_database("grafana");
    let store = open(&url).await.expect("open store");
    write_fleet(store.as_ref(), Timestamp::now()).await;

    let client = connect_as_datasource(&pg, &url).await;
    // "Last 15 minutes", as Grafana sends it: milliseconds, ending now (after every write).
    let to_ms = Timestamp::now().as_micros() / 1000;
    let range = TimeRange {
        from_ms: to_ms - 15 * 60 * 1000,
        to_ms,
    };

    let mut ran = 0;
    for (name, dash) in dashboards() {
        let vars = resolve_variables(&client, &name, &dash, &range).await;
        for panel in query_panels(&dash) {
            let title = panel["title"].as_str().unwrap_or("?");
            for target in panel["targets"].as_array().into_iter().flatten() {
                let raw = target["rawSql"].as_str().unwrap_or_default();
                let sql = expand(raw, &range, &vars)
                    .unwrap_or_else(|e| panic!("{name} / {title}: {e}\n{raw}"));
                let result = query(&client, &sql)
                    .await
                    .unwrap_or_else(|e| panic!("{name} / {title}: {e}\n{sql}"));
                let what = format!("{name} / {title}");
                result.check(&what, &sql, target["format"] == "time_series");
                println!("{what}: {} rows", result.rows.len());
                ran += 1;
            }
        }
    }
    assert!(ran >= 10, "only {ran} panel queries");
}

/// Three vehicles × speed, soc, torque, gps.lat, gps.lon every 5 s over the last 14
/// minutes, one message (stream sequence) per reading like the simulator's, and a snapshot
/// per vehicle every 10 s — all through the `Store` API, as the collectors and the
/// aggregator write them.
async fn write_fleet(store: &dyn Store, now: Timestamp) {
    let start = now.as_micros() - 14 * 60 * SEC;
    let mut seq = 0;
    for step in 0..14 * 60 / 5 {
        let at = Timestamp::from_micros(start + step * 5 * SEC);
        let mut batch = Vec::new();
        let mut ticks = Vec::new();
        for (d, device) in DEVICES.iter().enumerate() {
            let (t, phase) = (step as f64, d as f64);
            let values = [
                ("speed", "km/h", 45.0 + 25.0 * (t / 12.0 + phase).sin()),
                ("soc", "%", 90.0 - 20.0 * phase - 0.02 * t),
                ("torque", "Nm", 120.0 + 60.0 * (t / 7.0 + phase).cos()),
                ("gps.lat", "deg", 48.8566 + 0.01 * phase + 0.00005 * t),
                ("gps.lon", "deg", 2.3522 + 0.01 * phase + 0.00008 * t),
            ];
            for (sensor, unit, value) in values {
                seq += 1;
                batch.push(Record {
                    seq,
                    reading: Reading {
                        device: (*device).into(),
                        sensor: sensor.into(),
                        value,
                        ts: at,
                        unit: Some(unit.into()),
                        quality: None,
                        tags: Default::default(),
                    },
                });
            }
            if step % 2 == 0 {
                ticks.push(Snapshot {
                    device: device.to_string(),
                    ts: at,
                    values: values.iter().map(|(s, _, v)| (s.to_string(), *v)).collect(),
                });
            }
        }
        let n = store.write_readings(&batch).await.expect("write readings");
        assert_eq!(n, batch.len() as u64);
        if !ticks.is_empty() {
            store
                .write_snapshots(&ticks)
                .await
                .expect("write snapshots");
        }
    }
}

/// A connection made from the provisioned data source, with its environment variables set
/// to this cluster, so the file's settings are what the queries go through.
async fn connect_as_datasource(pg: &PgServer, url: &str) -> Client {
    let target: tokio_postgres::Config = url.parse().expect("store URL");
    let env = BTreeMap::from([
        ("FLEETPIPE_PG_HOST", format!("127.0.0.1:{}", pg.port())),
        (
            "FLEETPIPE_PG_DATABASE",
            target.get_dbname().expect("dbname").to_string(),
        ),
        (
            "FLEETPIPE_PG_USER",
            target.get_user().expect("user").to_string(),
        ),
        // The test cluster trusts local connections.
        ("FLEETPIPE_PG_PASSWORD", String::new()),
        ("FLEETPIPE_PG_SSLMODE", "disable".to_string()),
    ]);
    let ds = read_yaml(&provisioning("datasources/fleetpipe.yaml"));
    let setting = |key: &str| expand_env(get(&ds, &format!("datasources[0].{key}")), &env);

    let url = setting("url");
    let (host, port) = url.rsplit_once(':').unwrap_or((&url, "5432"));
    let mut config = tokio_postgres::Config::new();
    config
        .host(host)
        .port(port.parse().expect("port"))
        .dbname(setting("jsonData.database"))
        .user(setting("user"));
    let password = setting("secureJsonData.password");
    if !password.is_empty() {
        config.password(password);
    }
    assert_eq!(setting("jsonData.sslmode"), "disable");
    let (client, conn) = config
        .connect(tokio_postgres::NoTls)
        .await
        .expect("connect with the data source's settings");
    tokio::spawn(conn);
    client
}

/// Each template variable's value: its query's first row, as Grafana selects when the
/// dashboard opens with no current value.
async fn resolve_variables(
    client: &Client,
    name: &str,
    dash: &Value,
    range: &TimeRange,
) -> Vec<Var> {
    let mut vars = Vec::new();
    for var in variables(dash) {
        let var_name = var["name"].as_str().unwrap_or_default().to_string();
        assert_eq!(
            var["type"], "query",
            "{name}: variable {var_name}: only query variables are handled here"
        );
        let raw = var["query"].as_str().unwrap_or_else(|| {
            panic!("{name}: variable {var_name}: the query is not a plain string")
        });
        let sql = expand(raw, range, &vars).unwrap_or_else(|e| panic!("{name}: {e}"));
        let result = query(client, &sql)
            .await
            .unwrap_or_else(|e| panic!("{name}: variable {var_name}: {e}\n{sql}"));
        let value = result
            .rows
            .first()
            .and_then(|r| r.first().cloned().flatten())
            .unwrap_or_else(|| panic!("{name}: variable {var_name} has no values\n{sql}"));
        if var_name == "device" {
            assert_eq!(value, DEVICES[0], "{name}: first device");
        }
        vars.push(Var {
            name: var_name,
            value,
            quoted: var["multi"] == true || var["includeAll"] == true,
        });
    }
    vars
}

/// A query's result as text, the way the simple query protocol returns it.
struct QueryResult {
    columns: Vec<String>,
    rows: Vec<Vec<Option<String>>>,
}

async fn query(client: &Client, sql: &str) -> Result<QueryResult, String> {
    let mut result = QueryResult {
        columns: Vec::new(),
        rows: Vec::new(),
    };
    let messages = client
        .simple_query(sql)
        .await
        .map_err(|e| match e.as_db_error() {
            Some(db) => db.to_string(),
            None => e.to_string(),
        })?;
    for message in messages {
        match message {
            SimpleQueryMessage::RowDescription(columns) => {
                result.columns = columns.iter().map(|c| c.name().to_string()).collect();
            }
            SimpleQueryMessage::Row(row) => {
                let values = (0..row.len()).map(|i| row.get(i).map(str::to_string));
                result.rows.push(values.collect());
            }
            _ => {}
        }
    }
    Ok(result)
}

impl QueryResult {
    /// Rows came back and they carry data: some value column is a non-zero number (a join
    /// or a filter that matched nothing would give no rows, NULLs or zero counts). A time
    /// series has a `time` column in ascending order, as Grafana requires.
    fn check(&self, what: &str, sql: &str, time_series: bool) {
        assert!(!self.rows.is_empty(), "{what}: no rows\n{sql}");
        let time = self.columns.iter().position(|c| c == "time");
        let data = self.rows.iter().flat_map(|row| {
            row.iter()
                .enumerate()
                .filter(move |(i, _)| Some(*i) != time)
                .filter_map(|(_, v)| v.as_deref()?.parse::<f64>().ok())
        });
        let data = data.filter(|v| v.is_finite() && *v != 0.0).count();
        assert!(
            data > 0,
            "{what}: no non-zero value in {:?}\n{sql}",
            self.rows
        );
        if time_series {
            let Some(time) = time else {
                panic!(
                    "{what}: time series without a `time` column: {:?}",
                    self.columns
                );
            };
            let times: Vec<&str> = self
                .rows
                .iter()
                .map(|r| r[time].as_deref().expect("time is NULL"))
                .collect();
            let ordered =
                times
                    .windows(2)
                    .all(|w| match (w[0].parse::<f64>(), w[1].parse::<f64>()) {
                        (Ok(a), Ok(b)) => a <= b,
                        _ => w[0] <= w[1],
                    });
            assert!(ordered, "{what}: time not ascending\n{sql}");
        }
    }
}

// ------------------------------------------------------------------ dashboards

/// `(file name, parsed JSON)` of every dashboard the provider loads, by name.
fn dashboards() -> Vec<(String, Value)> {
    let dir = repo_root().join(DASHBOARDS_PATH);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|path| {
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            let text = std::fs::read_to_string(&path).expect("read dashboard");
            let dash = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{name}: {e}"));
            (name, dash)
        })
        .collect()
}

/// Every panel that is not a row, including the panels a collapsed row keeps inside it.
fn query_panels(dash: &Value) -> Vec<&Value> {
    fn walk<'a>(panels: &'a Value, out: &mut Vec<&'a Value>) {
        for panel in panels.as_array().into_iter().flatten() {
            walk(&panel["panels"], out);
            if panel["type"] != "row" {
                out.push(panel);
            }
        }
    }
    let mut out = Vec::new();
    walk(&dash["panels"], &mut out);
    out
}

fn variables(dash: &Value) -> &[Value] {
    dash["templating"]["list"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
}

/// Calls `f` with the JSON path and value of every `datasource` key in `value`.
fn each_datasource_ref(value: &Value, f: &mut dyn FnMut(&str, &Value)) {
    fn walk(value: &Value, at: &str, f: &mut dyn FnMut(&str, &Value)) {
        match value {
            Value::Object(map) => {
                for (k, v) in map {
                    let here = format!("{at}.{k}");
                    if k == "datasource" {
                        f(&here, v);
                    }
                    walk(v, &here, f);
                }
            }
            Value::Array(items) => {
                for (i, v) in items.iter().enumerate() {
                    walk(v, &format!("{at}[{i}]"), f);
                }
            }
            _ => {}
        }
    }
    walk(value, "$", f);
}

#[test]
fn panels_inside_rows_are_found() {
    let dash = json!({"panels": [
        {"id": 1, "type": "timeseries"},
        {"id": 2, "type": "row", "collapsed": true, "panels": [
            {"id": 3, "type": "table"},
            {"id": 4, "type": "stat"}
        ]},
        {"id": 5, "type": "row", "collapsed": false, "panels": []}
    ]});
    let ids: Vec<u64> = query_panels(&dash)
        .iter()
        .filter_map(|p| p["id"].as_u64())
        .collect();
    assert_eq!(ids, [1, 3, 4]);
}

// ------------------------------------------------------------------ Grafana's expansion

/// A dashboard time range in milliseconds since the epoch, as Grafana sends it.
struct TimeRange {
    from_ms: i64,
    to_ms: i64,
}

/// A template variable with its selected value.
struct Var {
    name: String,
    value: String,
    /// Multi-value or with "All": Grafana quotes the value as a literal.
    quoted: bool,
}

/// `rawSql` as PostgreSQL receives it from Grafana: variables, then macros. Errors on
/// anything left that Grafana would have expanded or refused.
fn expand(sql: &str, range: &TimeRange, vars: &[Var]) -> Result<String, String> {
    let sql = expand_macros(&interpolate_variables(sql, vars), range)?;
    if let Some(at) = leftover(&sql) {
        let end = (at + 30).min(sql.len());
        return Err(format!(
            "unexpanded macro or variable at {:?}",
            sql.get(at..end).unwrap_or(&sql[at..])
        ));
    }
    Ok(sql)
}

/// The front end's `templateSrv.replace` with `SqlDatasource.interpolateVariable`, for the
/// forms `$name` and `${name}`; unknown names are left alone (as Grafana does), and so are
/// `${name:format}` and `[[name]]`, which [`leftover`] then reports.
fn interpolate_variables(sql: &str, vars: &[Var]) -> String {
    let mut out = String::with_capacity(sql.len());
    let mut rest = sql;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        let (name, len) = match after.strip_prefix('{') {
            Some(braced) => match braced.find('}') {
                Some(end) => (&braced[..end], end + 2),
                None => ("", 0),
            },
            None => {
                let end = after.find(|c: char| !is_word(c)).unwrap_or(after.len());
                (&after[..end], end)
            }
        };
        match vars.iter().find(|v| !name.is_empty() && v.name == name) {
            Some(var) if var.quoted => {
                out.push_str(&format!("'{}'", var.value.replace('\'', "''")));
                rest = &after[len..];
            }
            Some(var) => {
                out.push_str(&var.value.replace('\'', "''"));
                rest = &after[len..];
            }
            None => {
                out.push('$');
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

/// The PostgreSQL data source's macro engine: every match of `\$(\w+)\(([^)]*)\)` is a
/// macro, its arguments split on `,` and trimmed of spaces; an unknown name is an error.
fn expand_macros(sql: &str, range: &TimeRange) -> Result<String, String> {
    let mut out = String::with_capacity(sql.len());
    let mut rest = sql;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        let name_len = after.find(|c: char| !is_word(c)).unwrap_or(after.len());
        let (name, tail) = after.split_at(name_len);
        let close = tail
            .find(')')
            .filter(|_| !name.is_empty() && tail.starts_with('('));
        let Some(close) = close else {
            out.push('$');
            rest = after;
            continue;
        };
        let args: Vec<&str> = tail[1..close]
            .split(',')
            .map(|a| a.trim_matches(' '))
            .collect();
        let text = &rest[at..at + 1 + name_len + close + 1];
        // Grafana's pre-5.3 compatibility: a `$__timeGroup(…)` directly followed by a comma
        // (looked up at its first occurrence in the query) gets `AS "time"` too.
        let mut name = name;
        if name == "__timeGroup" {
            if let Some(i) = sql.find(text) {
                if sql[i + text.len()..].starts_with(',') {
                    name = "__timeGroupAlias";
                }
            }
        }
        out.push_str(&evaluate_macro(name, &args, range)?);
        rest = &tail[close + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

fn evaluate_macro(name: &str, args: &[&str], range: &TimeRange) -> Result<String, String> {
    let (from, to) = (go_rfc3339_nano(range.from_ms), go_rfc3339_nano(range.to_ms));
    let col = args[0];
    Ok(match name {
        "__time" => format!("{col} AS \"time\""),
        "__timeEpoch" => format!("extract(epoch from {col}) as \"time\""),
        "__timeFilter" => format!("{col} BETWEEN '{from}' AND '{to}'"),
        "__timeFrom" => format!("'{from}'"),
        "__timeTo" => format!("'{to}'"),
        "__timeGroup" => {
            let Some(interval) = args.get(1) else {
                return Err(format!("${name} needs a column and an interval"));
            };
            let s = interval_seconds(interval.trim_matches('\''))?;
            format!("floor(extract(epoch from {col})/{s})*{s}")
        }
        "__timeGroupAlias" => format!(
            "{} AS \"time\"",
            evaluate_macro("__timeGroup", args, range)?
        ),
        "__unixEpochFilter" => format!(
            "{col} >= {} AND {col} <= {}",
            range.from_ms.div_euclid(1000),
            range.to_ms.div_euclid(1000)
        ),
        _ => return Err(format!("macro ${name} is not expanded by this test")),
    })
}

/// `gtime.ParseInterval` for the units a dashboard would use with `$__timeGroup`, in
/// seconds printed like Go's `%v` of a float64 (`60`, `0.5`).
fn interval_seconds(interval: &str) -> Result<f64, String> {
    let split = interval
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(interval.len());
    let (n, unit) = interval.split_at(split);
    let n: f64 = n
        .parse()
        .map_err(|_| format!("bad interval {interval:?}"))?;
    let unit = match unit {
        "ms" => 0.001,
        "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        "d" => 86400.0,
        "w" => 604_800.0,
        _ => {
            return Err(format!(
                "interval unit of {interval:?} not handled by this test"
            ))
        }
    };
    Ok(n * unit)
}

/// Go's `t.UTC().Format(time.RFC3339Nano)`: the fraction without trailing zeros, and none
/// at all on a whole second.
fn go_rfc3339_nano(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let whole = Timestamp::from_micros(secs * SEC).to_rfc3339();
    let base = whole
        .strip_suffix('Z')
        .unwrap_or_else(|| panic!("not UTC: {whole}"));
    let base = base.split('.').next().unwrap_or(base);
    let frac = format!("{:03}", ms.rem_euclid(1000));
    let frac = frac.trim_end_matches('0');
    if frac.is_empty() {
        format!("{base}Z")
    } else {
        format!("{base}.{frac}Z")
    }
}

/// Byte offset of the first `$name`, `${…}`, `$__macro` or `[[…]]` left in `sql`.
fn leftover(sql: &str) -> Option<usize> {
    let dollar = sql.match_indices('$').map(|(i, _)| i).find(|&i| {
        sql[i + 1..]
            .chars()
            .next()
            .is_some_and(|c| c == '{' || c == '_' || c.is_ascii_alphabetic())
    });
    let brackets = sql.find("[[");
    dollar.into_iter().chain(brackets).min()
}

fn is_word(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

#[test]
fn expansion_matches_grafana() {
    // 2026-02-15T09:45:00.120Z .. 2026-02-15T10:00:00Z
    let range = TimeRange {
        from_ms: 1_771_148_700_120,
        to_ms: 1_771_149_600_000,
    };
    let device = |quoted| Var {
        name: "device".into(),
        value: "v'1".into(),
        quoted,
    };
    let single = [device(false)];
    let ok = |sql: &str| expand(sql, &range, &single).unwrap();

    assert_eq!(
        ok("WHERE $__timeFilter(ts)"),
        "WHERE ts BETWEEN '2026-02-15T09:45:00.12Z' AND '2026-02-15T10:00:00Z'"
    );
    assert_eq!(
        ok("$__timeFrom()::timestamptz, $__timeTo()"),
        "'2026-02-15T09:45:00.12Z'::timestamptz, '2026-02-15T10:00:00Z'"
    );
    assert_eq!(
        ok("SELECT $__timeGroupAlias(r.minute, '1m'), x"),
        "SELECT floor(extract(epoch from r.minute)/60)*60 AS \"time\", x"
    );
    assert_eq!(
        ok("GROUP BY $__timeGroup( r.minute ,'5m')"),
        "GROUP BY floor(extract(epoch from r.minute)/300)*300"
    );
    // The pre-5.3 form: followed by a comma, $__timeGroup aliases itself.
    assert_eq!(
        ok("SELECT $__timeGroup(ts,'500ms'), v"),
        "SELECT floor(extract(epoch from ts)/0.5)*0.5 AS \"time\", v"
    );
    assert_eq!(ok("SELECT $__time(ts), v"), "SELECT ts AS \"time\", v");
    assert_eq!(
        ok("$__unixEpochFilter(t)"),
        "t >= 1771148700 AND t <= 1771149600"
    );
    // Single-value variables are inserted bare (the SQL quotes them), multi-value quoted.
    assert_eq!(
        ok("device = '$device' OR device = '${device}'"),
        "device = 'v''1' OR device = 'v''1'"
    );
    assert_eq!(
        expand("device IN ($device)", &range, &[device(true)]).unwrap(),
        "device IN ('v''1')"
    );
    // `$devices` is another (unknown) variable, not `$device` followed by "s".
    for bad in [
        "WHERE $__interval_ms > 0",
        "WHERE $__unixEpochGroup(t, '1m')",
        "WHERE x = $devices",
        "WHERE x = ${device:csv}",
        "WHERE x = [[device]]",
        "WHERE $__timeFilter(ts",
    ] {
        assert!(expand(bad, &range, &single).is_err(), "{bad}");
    }
    // A positional parameter is neither a macro nor a variable.
    assert_eq!(ok("SELECT $1"), "SELECT $1");
}

// ------------------------------------------------------------------ provisioning YAML

/// A provisioning file flattened to `path → scalar` (`datasources[0].jsonData.database`).
/// Grafana reads these with a full YAML parser; this reads the block-style subset they are
/// written in and panics on anything else (flow collections, block scalars, anchors, tags,
/// tabs, duplicate keys), so nothing it would misread passes silently.
fn read_yaml(path: &Path) -> BTreeMap<String, String> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut out = BTreeMap::new();
    // (indent, path, is a sequence item) of the enclosing mappings.
    let mut stack: Vec<(usize, String, bool)> = Vec::new();
    let mut next_item: BTreeMap<String, usize> = BTreeMap::new();
    for (n, raw) in text.lines().enumerate() {
        let at = format!("{}:{}", path.display(), n + 1);
        assert!(!raw.contains('\t'), "{at}: tab");
        let line = strip_comment(raw);
        if line.trim().is_empty() || line.trim() == "---" {
            continue;
        }
        let indent = line.len() - line.trim_start().len();
        let mut content = line.trim_start();
        let mut key_indent = indent;
        if let Some(item) = content.strip_prefix("- ") {
            while stack
                .last()
                .is_some_and(|(i, _, is_item)| *i > indent || (*i == indent && *is_item))
            {
                stack.pop();
            }
            let parent = stack.last().map(|(_, p, _)| p.clone()).unwrap_or_default();
            let index = next_item.entry(parent.clone()).or_insert(0);
            stack.push((indent, format!("{parent}[{index}]"), true));
            *index += 1;
            let item = item.trim_start();
            key_indent = indent + (content.len() - item.len());
            content = item;
        } else {
            while stack.last().is_some_and(|(i, _, _)| *i >= indent) {
                stack.pop();
            }
        }
        let (key, value) = content
            .split_once(':')
            .unwrap_or_else(|| panic!("{at}: expected `key: value`, got {content:?}"));
        assert!(
            !key.is_empty() && key.chars().all(is_word),
            "{at}: unexpected key {key:?}"
        );
        let full = match stack.last() {
            Some((_, parent, _)) => format!("{parent}.{key}"),
            None => key.to_string(),
        };
        let value = value.trim();
        if value.is_empty() {
            stack.push((key_indent, full, false));
        } else {
            let value = yaml_scalar(value, &at);
            assert!(
                out.insert(full.clone(), value).is_none(),
                "{at}: {full} twice"
            );
        }
    }
    out
}

/// `line` without a `#` comment (one at the start or after a space, outside quotes).
fn strip_comment(line: &str) -> &str {
    let mut quote = None;
    let mut prev = ' ';
    for (i, c) in line.char_indices() {
        match (quote, c) {
            (None, '\'' | '"') => quote = Some(c),
            (Some(q), _) if c == q => quote = None,
            (None, '#') if prev == ' ' => return &line[..i],
            _ => {}
        }
        prev = c;
    }
    line
}

fn yaml_scalar(value: &str, at: &str) -> String {
    if let Some(inner) = value.strip_prefix('\'') {
        let inner = inner
            .strip_suffix('\'')
            .unwrap_or_else(|| panic!("{at}: unterminated quote"));
        return inner.replace("''", "'");
    }
    if let Some(inner) = value.strip_prefix('"') {
        let inner = inner
            .strip_suffix('"')
            .unwrap_or_else(|| panic!("{at}: unterminated quote"));
        assert!(!inner.contains('\\'), "{at}: escapes not handled");
        return inner.to_string();
    }
    assert!(
        !value.starts_with(['{', '[', '&', '*', '!', '|', '>', '%', '@', '`']),
        "{at}: YAML construct not handled by this reader: {value:?}"
    );
    value.to_string()
}

fn get<'a>(yaml: &'a BTreeMap<String, String>, key: &str) -> &'a str {
    yaml.get(key)
        .unwrap_or_else(|| panic!("no {key} in {:?}", yaml.keys().collect::<Vec<_>>()))
}

/// Grafana's provisioning expansion of `${NAME}` and `$__env{NAME}` from `env`; any other
/// `$` form is refused here.
fn expand_env(value: &str, env: &BTreeMap<&str, String>) -> String {
    let mut out = String::new();
    let mut rest = value;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at..];
        let body = after
            .strip_prefix("${")
            .or_else(|| after.strip_prefix("$__env{"))
            .unwrap_or_else(|| panic!("unexpected `$` form in {value:?}"));
        let end = body.find('}').expect("closing brace");
        let name = &body[..end];
        out.push_str(
            env.get(name)
                .unwrap_or_else(|| panic!("no test value for ${name}")),
        );
        rest = &body[end + 1..];
    }
    out.push_str(rest);
    out
}

#[test]
fn yaml_reader_reads_block_style() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.yaml");
    std::fs::write(
        &path,
        "# comment\napiVersion: 1\nlist:\n- name: a # trailing\n  nested:\n    k: 'it''s'\n- name: \"b#c\"\nother:\n  - x: ${V}\n",
    )
    .unwrap();
    let y = read_yaml(&path);
    let want: BTreeMap<String, String> = [
        ("apiVersion", "1"),
        ("list[0].name", "a"),
        ("list[0].nested.k", "it's"),
        ("list[1].name", "b#c"),
        ("other[0].x", "${V}"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    assert_eq!(y, want);
    let env = BTreeMap::from([("V", "host:5432".to_string())]);
    assert_eq!(expand_env("${V}/$__env{V}", &env), "host:5432/host:5432");
}
