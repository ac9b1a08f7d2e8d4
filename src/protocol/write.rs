//! Messages pgnear writes to clients itself (pgwire's codec does the encoding).

use bytes::{BufMut, BytesMut};
use pgwire::messages::response::{ErrorResponse, ReadyForQuery, TransactionStatus};
use pgwire::messages::startup::{
    Authentication, BackendKeyData, NegotiateProtocolVersion, ParameterStatus, SecretKey,
};
use pgwire::messages::Message;

use crate::error::PgError;

fn encode<M: Message>(out: &mut BytesMut, m: M) {
    // Encoding into a BytesMut only fails for values pgnear never builds (oversized keys).
    if let Err(e) = m.encode(out) {
        tracing::error!(error = %e, "encoding a message failed");
    }
}

pub fn error_response(out: &mut BytesMut, e: &PgError) {
    let severity = if e.fatal { "FATAL" } else { "ERROR" };
    let mut fields = vec![
        (b'S', severity.to_string()),
        (b'V', severity.to_string()),
        (b'C', e.sqlstate().to_string()),
        (b'M', e.message.clone()),
    ];
    if let Some(d) = &e.detail {
        fields.push((b'D', d.clone()));
    }
    if let Some(h) = &e.hint {
        fields.push((b'H', h.clone()));
    }
    encode(out, ErrorResponse::new(fields));
}

pub fn parameter_status(out: &mut BytesMut, name: &str, value: &str) {
    encode(
        out,
        ParameterStatus::new(name.to_string(), value.to_string()),
    );
}

pub fn backend_key_data(out: &mut BytesMut, pid: i32, secret: i32) {
    encode(out, BackendKeyData::new(pid, SecretKey::I32(secret)));
}

pub fn ready_for_query(out: &mut BytesMut, status: u8) {
    let status = match status {
        b'T' => TransactionStatus::Transaction,
        b'E' => TransactionStatus::Error,
        _ => TransactionStatus::Idle,
    };
    encode(out, ReadyForQuery::new(status));
}

pub fn auth_ok(out: &mut BytesMut) {
    encode(out, Authentication::Ok);
}

pub fn auth_sasl(out: &mut BytesMut) {
    encode(out, Authentication::SASL(vec!["SCRAM-SHA-256".to_string()]));
}

pub fn auth_sasl_continue(out: &mut BytesMut, data: &[u8]) {
    encode(
        out,
        Authentication::SASLContinue(bytes::Bytes::copy_from_slice(data)),
    );
}

pub fn auth_sasl_final(out: &mut BytesMut, data: &[u8]) {
    encode(
        out,
        Authentication::SASLFinal(bytes::Bytes::copy_from_slice(data)),
    );
}

pub fn auth_md5(out: &mut BytesMut, salt: [u8; 4]) {
    encode(out, Authentication::MD5Password(salt.to_vec()));
}

pub fn negotiate_protocol_version(out: &mut BytesMut, unsupported: Vec<String>) {
    encode(out, NegotiateProtocolVersion::new(0, unsupported));
}

/// A one-column text result (RowDescription, DataRow, CommandComplete) for in-band SHOW commands.
pub fn single_text_row(out: &mut BytesMut, column: &str, value: Option<&str>) {
    text_row_description(out, column);
    text_data_row(out, value);
    command_complete(out, "SHOW");
}

/// RowDescription of one text column, no table.
pub fn text_row_description(out: &mut BytesMut, column: &str) {
    out.put_u8(b'T');
    let len_at = out.len();
    out.put_u32(0);
    out.put_i16(1);
    out.put_slice(column.as_bytes());
    out.put_u8(0);
    out.put_i32(0); // table oid
    out.put_i16(0); // column number
    out.put_u32(25); // text
    out.put_i16(-1);
    out.put_i32(-1);
    out.put_i16(0); // text format
    patch_len(out, len_at);
}

/// DataRow of one text value (a text value's binary format is the same bytes).
pub fn text_data_row(out: &mut BytesMut, value: Option<&str>) {
    out.put_u8(b'D');
    let len_at = out.len();
    out.put_u32(0);
    out.put_i16(1);
    match value {
        Some(v) => {
            out.put_i32(v.len() as i32);
            out.put_slice(v.as_bytes());
        }
        None => out.put_i32(-1),
    }
    patch_len(out, len_at);
}

/// A message with an empty body (ParseComplete '1', BindComplete '2', CloseComplete '3',
/// NoData 'n').
pub fn empty(out: &mut BytesMut, tag: u8) {
    out.put_u8(tag);
    out.put_u32(4);
}

/// ParameterDescription of a statement without parameters.
pub fn no_parameters(out: &mut BytesMut) {
    out.put_u8(b't');
    out.put_u32(6);
    out.put_i16(0);
}

pub fn command_complete(out: &mut BytesMut, tag: &str) {
    out.put_u8(b'C');
    out.put_u32((4 + tag.len() + 1) as u32);
    out.put_slice(tag.as_bytes());
    out.put_u8(0);
}

fn patch_len(out: &mut BytesMut, len_at: usize) {
    let len = (out.len() - len_at) as u32;
    out[len_at..len_at + 4].copy_from_slice(&len.to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;
    use crate::protocol::backend::{error_fields, header};

    #[test]
    fn error_roundtrip() {
        let mut out = BytesMut::new();
        let e = PgError::new(ErrorKind::Replay, "write must run in iad")
            .with_hint("fly-replay: region=iad");
        error_response(&mut out, &e);
        let (tag, len) = header(&out).unwrap();
        assert_eq!((tag, len), (b'E', out.len()));
        let f = error_fields(&out[5..]);
        assert_eq!((f.code.as_str(), f.severity.as_str()), ("25006", "FATAL"));
    }

    #[test]
    fn show_row_frames_are_well_formed() {
        let mut out = BytesMut::new();
        single_text_row(&mut out, "pgnear.region", Some("syd"));
        let mut pos = 0;
        let mut tags = Vec::new();
        while let Some((tag, len)) = header(&out[pos..]) {
            tags.push(tag);
            pos += len;
        }
        assert_eq!(pos, out.len());
        assert_eq!(tags, b"TDC");
    }
}
