//! pgnear's in-band commands: `SHOW`, `SET` and `RESET` of `pgnear.*` settings (the route,
//! the write mode, causal tokens), answered by pgnear itself in both protocols.

use bytes::BytesMut;

use super::Session;
use crate::config::WriteMode;
use crate::error::{ErrorKind, PgError};
use crate::lsn::Lsn;
use crate::protocol::{cstr, frames, tag, write};
use crate::router::classify::{Classified, Kind};
use crate::router::route::RouteSetting;

pub(super) fn is_command(c: &Classified) -> bool {
    c.statements.iter().any(|s| {
        matches!(
            s.kind,
            Kind::PgnearSet { .. } | Kind::PgnearShow { .. } | Kind::PgnearReset { .. }
        )
    })
}

/// The command, when `c` is exactly one pgnear command.
pub(super) fn command(c: &Classified) -> Option<Kind> {
    let mut statements = c.statements.iter().filter(|s| s.kind != Kind::Empty);
    match (statements.next(), statements.next()) {
        (Some(s), None) if is_command(c) => Some(s.kind.clone()),
        _ => None,
    }
}

impl Session {
    /// Answers SHOW/SET/RESET pgnear.* itself, after everything sent before it was answered.
    pub(super) async fn answer_pgnear(&mut self, c: &Classified) -> Result<(), PgError> {
        self.drain_all().await?;
        let mut out = BytesMut::new();
        match command(c) {
            Some(kind) => {
                self.run_pgnear(&kind, &mut out, true);
            }
            None => {
                let e = PgError::new(
                    ErrorKind::Protocol,
                    "pgnear commands must be sent alone, one per query",
                )
                .non_fatal();
                write::error_response(
                    &mut out,
                    &PgError {
                        code: Some("0A000".into()),
                        ..e
                    },
                );
            }
        }
        write::ready_for_query(&mut out, self.client_tx_status());
        self.write_client(&out).await
    }

    /// Runs one in-band command, writing its answer (with the RowDescription of a SHOW when
    /// `describe`, as the simple protocol has it). False when it failed.
    fn run_pgnear(&mut self, kind: &Kind, out: &mut BytesMut, describe: bool) -> bool {
        let done = match kind {
            Kind::PgnearShow { name } => match self.show(name) {
                Some(value) => {
                    if describe {
                        write::text_row_description(out, &format!("pgnear.{name}"));
                    }
                    write::text_data_row(out, value.as_deref());
                    Ok("SHOW")
                }
                None => Err(unknown_setting(name)),
            },
            Kind::PgnearSet { name, value } => self.set(name, Some(value)).map(|()| "SET"),
            Kind::PgnearReset { name } => self
                .set(name.as_deref().unwrap_or("route"), None)
                .map(|()| "RESET"),
            _ => Ok("SHOW"),
        };
        match done {
            Ok(tag) => {
                write::command_complete(out, tag);
                true
            }
            Err(e) => {
                write::error_response(out, &e);
                false
            }
        }
    }

    /// Answers an extended-protocol batch whose every statement is a pgnear command (drivers
    /// that prepare everything, e.g. psycopg after a few runs, send `SHOW pgnear.write_lsn`
    /// this way), after everything sent before it was answered. `batch`: its frames, with the
    /// statement names the session knows them by.
    pub(super) async fn answer_pgnear_batch(&mut self, batch: &[u8]) -> Result<(), PgError> {
        self.drain_all().await?;
        let mut out = BytesMut::new();
        let mut portals: Vec<(String, Option<Kind>)> = Vec::new();
        let mut failed = false;
        for (t, frame) in frames(batch) {
            let body = &frame[5..];
            if failed && t != tag::SYNC {
                continue;
            }
            let name_at =
                |at: usize| cstr(body.get(at..).unwrap_or_default()).map_or("", |(n, _)| n);
            match t {
                tag::PARSE => {
                    if name_at(0).is_empty() {
                        // The server's unnamed statement is no longer the client's.
                        self.unnamed_role = None;
                    }
                    write::empty(&mut out, b'1');
                }
                tag::BIND => {
                    let (portal, used) = cstr(body).unwrap_or_default();
                    let kind = self.statement_command(name_at(used));
                    portals.retain(|(p, _)| p != portal);
                    portals.push((portal.to_string(), kind));
                    write::empty(&mut out, b'2');
                }
                tag::DESCRIBE => {
                    let name = name_at(1);
                    let kind = if body.first() == Some(&b'S') {
                        write::no_parameters(&mut out);
                        self.statement_command(name)
                    } else {
                        portals
                            .iter()
                            .find(|(p, _)| p == name)
                            .and_then(|(_, k)| k.clone())
                    };
                    match kind {
                        Some(Kind::PgnearShow { name }) => {
                            write::text_row_description(&mut out, &format!("pgnear.{name}"))
                        }
                        _ => write::empty(&mut out, b'n'),
                    }
                }
                tag::EXECUTE => {
                    let portal = name_at(0);
                    let kind = portals
                        .iter()
                        .find(|(p, _)| p == portal)
                        .and_then(|(_, k)| k.clone());
                    if let Some(kind) = kind {
                        failed = !self.run_pgnear(&kind, &mut out, false);
                    }
                }
                tag::CLOSE => write::empty(&mut out, b'3'),
                tag::SYNC => {
                    failed = false;
                    write::ready_for_query(&mut out, self.client_tx_status());
                }
                _ => {}
            }
        }
        self.write_client(&out).await
    }

    /// The pgnear command a prepared statement (`""`: the unnamed one) is, if it is one.
    fn statement_command(&self, name: &str) -> Option<Kind> {
        let (_, c) = self.statement_class((!name.is_empty()).then_some(name))?;
        command(&c)
    }

    fn show(&self, name: &str) -> Option<Option<String>> {
        let regions = &self.shared.config.regions;
        Some(match name {
            "route" => Some(self.state.setting.name().to_string()),
            "write_lsn" => Some(self.write_lsn.map(|l| l.to_string()).unwrap_or_default()),
            "min_lsn" => Some(self.min_lsn.map(|l| l.to_string()).unwrap_or_default()),
            "region" => Some(regions.current.clone()),
            "write_mode" => Some(match self.write_mode {
                WriteMode::Forward => "forward".to_string(),
                WriteMode::Replay => "replay".to_string(),
            }),
            "primary_region" => Some(regions.primary.clone()),
            _ => return None,
        })
    }

    fn set(&mut self, name: &str, value: Option<&str>) -> Result<(), PgError> {
        match name {
            "route" => {
                let v = value.unwrap_or("auto");
                self.state.setting = RouteSetting::parse(v)
                    .ok_or_else(|| invalid_value(name, v, "auto, primary, replica"))?;
                Ok(())
            }
            "write_mode" => {
                self.write_mode = match value.map(|v| v.to_ascii_lowercase()).as_deref() {
                    None => self.shared.config.routing.write_mode,
                    Some("forward") => WriteMode::Forward,
                    Some("replay") => WriteMode::Replay,
                    Some(v) => return Err(invalid_value(name, v, "forward, replay")),
                };
                Ok(())
            }
            "min_lsn" => {
                self.min_lsn = match value.map(str::trim).filter(|v| !v.is_empty()) {
                    None => None,
                    Some(v) => Some(
                        v.parse::<Lsn>()
                            .map_err(|e| invalid_value(name, v, &e.to_string()))?,
                    ),
                };
                Ok(())
            }
            _ => Err(unknown_setting(name)),
        }
    }
}

fn unknown_setting(name: &str) -> PgError {
    let e = PgError::new(
        ErrorKind::Protocol,
        format!("unrecognized configuration parameter \"pgnear.{name}\""),
    )
    .non_fatal();
    PgError {
        code: Some("42704".into()),
        ..e
    }
}

fn invalid_value(name: &str, value: &str, allowed: &str) -> PgError {
    let e = PgError::new(
        ErrorKind::Protocol,
        format!("invalid value for parameter \"pgnear.{name}\": \"{value}\""),
    )
    .non_fatal()
    .with_hint(format!("Available values: {allowed}."));
    PgError {
        code: Some("22023".into()),
        ..e
    }
}
