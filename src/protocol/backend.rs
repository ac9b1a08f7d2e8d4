//! Server-to-pgnear: frame headers and the few bodies pgnear reads (ReadyForQuery, ErrorResponse,
//! ParameterStatus, DataRow of its own queries). Everything else passes as raw bytes.

use super::cstr;

pub const READY_FOR_QUERY: u8 = b'Z';
pub const ERROR_RESPONSE: u8 = b'E';
pub const NOTICE_RESPONSE: u8 = b'N';
pub const NOTIFICATION: u8 = b'A';
pub const PARAMETER_STATUS: u8 = b'S';
pub const BACKEND_KEY_DATA: u8 = b'K';
pub const AUTHENTICATION: u8 = b'R';
pub const PARSE_COMPLETE: u8 = b'1';
pub const BIND_COMPLETE: u8 = b'2';
pub const CLOSE_COMPLETE: u8 = b'3';
pub const PARAMETER_DESCRIPTION: u8 = b't';
pub const ROW_DESCRIPTION: u8 = b'T';
pub const NO_DATA: u8 = b'n';
pub const COMMAND_COMPLETE: u8 = b'C';
pub const EMPTY_QUERY: u8 = b'I';
pub const PORTAL_SUSPENDED: u8 = b's';
pub const DATA_ROW: u8 = b'D';
pub const FUNCTION_RESULT: u8 = b'V';
pub const COPY_IN: u8 = b'G';
pub const COPY_OUT: u8 = b'H';
pub const COPY_BOTH: u8 = b'W';
pub const COPY_DATA: u8 = b'd';
pub const COPY_DONE: u8 = b'c';
pub const NEGOTIATE_PROTOCOL: u8 = b'v';

/// Tag and total length (tag included) of the frame at the start of `buf`, if its header is there.
#[inline]
pub fn header(buf: &[u8]) -> Option<(u8, usize)> {
    if buf.len() < 5 {
        return None;
    }
    let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
    Some((buf[0], len + 1))
}

/// The fields of an ErrorResponse/NoticeResponse body we care about.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ErrorFields {
    pub severity: String,
    pub code: String,
    pub message: String,
}

pub fn error_fields(body: &[u8]) -> ErrorFields {
    let mut out = ErrorFields::default();
    let mut pos = 0;
    while pos < body.len() && body[pos] != 0 {
        let field = body[pos];
        pos += 1;
        let Some((value, used)) = cstr(&body[pos..]) else {
            break;
        };
        pos += used;
        match field {
            b'V' => out.severity = value.to_string(),
            b'S' if out.severity.is_empty() => out.severity = value.to_string(),
            b'C' => out.code = value.to_string(),
            b'M' => out.message = value.to_string(),
            _ => {}
        }
    }
    out
}

/// Name and value of a ParameterStatus body.
pub fn parameter_status(body: &[u8]) -> Option<(&str, &str)> {
    let (k, used) = cstr(body)?;
    let (v, _) = cstr(&body[used..])?;
    Some((k, v))
}

/// Reported parameters (ParameterStatus) as (name, value).
pub type Params = Vec<(String, String)>;

/// Sets `name` in `params`.
pub fn set_param(params: &mut Params, name: &str, value: &str) {
    match params.iter_mut().find(|(k, _)| k == name) {
        Some((_, v)) if v == value => {}
        Some((_, v)) => *v = value.to_string(),
        None => params.push((name.to_string(), value.to_string())),
    }
}

/// The first column of a DataRow body as text (`None` for NULL or a malformed row).
pub fn first_column(body: &[u8]) -> Option<&str> {
    let n = i16::from_be_bytes(body.get(..2)?.try_into().ok()?);
    if n < 1 {
        return None;
    }
    let len = i32::from_be_bytes(body.get(2..6)?.try_into().ok()?);
    if len < 0 {
        return None;
    }
    std::str::from_utf8(body.get(6..6 + len as usize)?).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_body() {
        let body = b"SERROR\0VERROR\0C25006\0Mcannot execute INSERT in a read-only transaction\0\0";
        let f = error_fields(body);
        assert_eq!(f.code, "25006");
        assert_eq!(f.severity, "ERROR");
        assert!(f.message.starts_with("cannot execute"));
        assert_eq!(error_fields(b"Cxx"), ErrorFields::default());
    }

    #[test]
    fn data_row() {
        let body = b"\0\x01\0\0\0\x090/16B3748";
        assert_eq!(first_column(body), Some("0/16B3748"));
        assert_eq!(first_column(b"\0\x01\xff\xff\xff\xff"), None);
        assert_eq!(first_column(b"\0\x01\0\0\0\x09"), None);
        assert_eq!(first_column(b""), None);
    }

    #[test]
    fn headers() {
        assert_eq!(header(b"Z\0\0\0\x05I"), Some((b'Z', 6)));
        assert_eq!(header(b"Z\0\0"), None);
    }
}
