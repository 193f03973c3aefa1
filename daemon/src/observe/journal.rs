//! The systemd journal: whether stderr goes to it, and its native
//! protocol (one datagram of `KEY=value` fields per record), for records
//! with structured fields such as the audit trail's.

use std::os::unix::net::UnixDatagram;
use std::path::Path;

/// systemd-journald's native protocol socket.
pub const JOURNAL_SOCKET: &str = "/run/systemd/journal/socket";

/// Whether stderr is the systemd journal (JOURNAL_STREAM names its inode).
pub fn stderr_is_journal() -> bool {
    use std::os::unix::fs::MetadataExt;
    let Ok(v) = std::env::var("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = v.split_once(':') else {
        return false;
    };
    let Ok(meta) = std::fs::metadata("/proc/self/fd/2") else {
        return false;
    };
    dev.parse() == Ok(meta.dev()) && ino.parse() == Ok(meta.ino())
}

/// Append one field: `KEY=value\n`, or for values with a newline the
/// binary form `KEY\n`, little-endian 64-bit length, value, `\n`.
pub fn put_journal_field(out: &mut Vec<u8>, key: &str, value: &str) {
    out.extend_from_slice(key.as_bytes());
    if value.contains('\n') {
        out.push(b'\n');
        out.extend_from_slice(&(value.len() as u64).to_le_bytes());
    } else {
        out.push(b'=');
    }
    out.extend_from_slice(value.as_bytes());
    out.push(b'\n');
}

/// Send one datagram to the journal's socket.
pub fn send_journal(path: &Path, datagram: &[u8]) -> std::io::Result<()> {
    let s = UnixDatagram::unbound()?;
    let n = s.send_to(datagram, path)?;
    if n != datagram.len() {
        return Err(std::io::Error::other("short datagram"));
    }
    Ok(())
}

#[cfg(test)]
/// The fields of a datagram made by [`put_journal_field`].
pub(crate) fn parse_datagram(d: &[u8]) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = d;
    while !rest.is_empty() {
        let nl = rest.iter().position(|&c| c == b'\n').unwrap();
        let line = &rest[..nl];
        if let Some(eq) = line.iter().position(|&c| c == b'=') {
            out.push((
                String::from_utf8(line[..eq].to_vec()).unwrap(),
                String::from_utf8(line[eq + 1..].to_vec()).unwrap(),
            ));
            rest = &rest[nl + 1..];
        } else {
            let n = u64::from_le_bytes(rest[nl + 1..nl + 9].try_into().unwrap()) as usize;
            out.push((
                String::from_utf8(line.to_vec()).unwrap(),
                String::from_utf8(rest[nl + 9..nl + 9 + n].to_vec()).unwrap(),
            ));
            assert_eq!(rest[nl + 9 + n], b'\n');
            rest = &rest[nl + 10 + n..];
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn journal_fields_and_binary_values() {
        let mut v = Vec::new();
        put_journal_field(&mut v, "A", "x=y");
        put_journal_field(&mut v, "B", "two\nlines");
        assert_eq!(&v[..6], b"A=x=y\n");
        assert_eq!(&v[6..8], b"B\n");
        assert_eq!(&v[8..16], &9u64.to_le_bytes());
        assert_eq!(&v[16..], b"two\nlines\n");
        assert_eq!(
            parse_datagram(&v),
            vec![
                ("A".to_string(), "x=y".to_string()),
                ("B".to_string(), "two\nlines".to_string())
            ]
        );
    }
}
