//! The client side of the wire: startup packets (`parse_startup_body`, `read_startup_packet`)
//! and frames (`next_frame`, `read_frame`, `frames`, `query_text`).
#![no_main]

use std::sync::OnceLock;

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use pgnear::protocol::frontend::{
    next_frame, parse_startup_body, query_text, read_startup_packet, StartupPacket,
    MAX_STARTUP_PACKET,
};
use pgnear::protocol::{frames, read_frame, tag};

fn rt() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime")
    })
}

fn encode_startup(minor: u16, params: &[(String, String)]) -> Vec<u8> {
    let mut body = (3u32 << 16 | u32::from(minor)).to_be_bytes().to_vec();
    for (k, v) in params {
        body.extend_from_slice(k.as_bytes());
        body.push(0);
        body.extend_from_slice(v.as_bytes());
        body.push(0);
    }
    body.push(0);
    body
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, data)) = data.split_first() else {
        return;
    };
    if mode & 1 == 0 {
        // A startup packet body.
        if let Ok(p) = parse_startup_body(data) {
            if let StartupPacket::Startup(s) = &p {
                assert!(s.get("user").is_some_and(|u| !u.is_empty()));
                // Re-encoding what was parsed gives the same packet back.
                let again = encode_startup(s.minor, &s.params);
                assert_eq!(again, data);
                assert_eq!(parse_startup_body(&again).unwrap(), p);
            }
        }
        // The same bytes as a whole packet, length first, off an async reader.
        let mut r: &[u8] = data;
        let got = rt().block_on(read_startup_packet(&mut r));
        if let Ok(Some(_)) = got {
            let len = u32::from_be_bytes(data[..4].try_into().unwrap()) as usize;
            assert!((8..=MAX_STARTUP_PACKET).contains(&len));
            assert_eq!(
                parse_startup_body(&data[4..len]).ok(),
                got.as_ref().ok().and_then(|p| p.as_ref().map(clone_packet))
            );
        }
        return;
    }
    // A stream of tagged frames, split the way the session splits them.
    let max = 5 + usize::from(mode >> 1) * 64;
    let mut buf = BytesMut::from(data);
    let mut whole = 0;
    loop {
        match next_frame(&buf, max) {
            Ok(Some((t, len))) => {
                assert!(len >= 5 && len <= buf.len() && len <= max + 1);
                assert_eq!(t, buf[0]);
                let frame = buf.split_to(len);
                whole += len;
                if t == tag::QUERY {
                    let _ = query_text(&frame[5..]);
                }
            }
            Ok(None) => break,
            Err(_) => break,
        }
    }
    // `frames` sees the same frames in the prefix that `next_frame` accepted.
    let n = frames(&data[..whole]).map(|(_, f)| f.len()).sum::<usize>();
    assert_eq!(n, whole);
    // And `read_frame`, reading from a stream, agrees with `next_frame` on the first one.
    let mut r: &[u8] = data;
    let mut rbuf = BytesMut::new();
    let first = rt().block_on(read_frame(&mut r, &mut rbuf, max + 1));
    if let Ok((t, body)) = first {
        assert_eq!(
            Some((t, body.len() + 5)),
            next_frame(&BytesMut::from(data), max).ok().flatten()
        );
    }
});

fn clone_packet(p: &StartupPacket) -> StartupPacket {
    match p {
        StartupPacket::SslRequest => StartupPacket::SslRequest,
        StartupPacket::GssEncRequest => StartupPacket::GssEncRequest,
        StartupPacket::Cancel { pid, secret } => StartupPacket::Cancel {
            pid: *pid,
            secret: secret.clone(),
        },
        StartupPacket::Startup(s) => StartupPacket::Startup(s.clone()),
    }
}
