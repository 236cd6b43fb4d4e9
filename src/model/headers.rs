//! Compact, lossless encoding of Kafka headers for the outbox `headers` column.
//!
//! Kafka headers are an ordered list of (name, optional bytes) that may repeat a name, so
//! neither JSON objects nor Postgres hstore keep them faithfully. The layout is:
//! `u32 count`, then per header `u32 name_len, name, i32 value_len (-1 = null), value`,
//! all big-endian.

/// An ordered list of Kafka headers.
pub type Headers = Vec<(String, Option<Vec<u8>>)>;

pub fn encode(headers: &[(String, Option<Vec<u8>>)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(encoded_len(headers));
    encode_into(&mut out, headers);
    out
}

/// How many bytes [`encode`] writes for `headers`.
pub fn encoded_len(headers: &[(String, Option<Vec<u8>>)]) -> usize {
    4 + headers
        .iter()
        .map(|(k, v)| 8 + k.len() + v.as_ref().map_or(0, Vec::len))
        .sum::<usize>()
}

/// [`encode`], appended to `out`.
pub fn encode_into(out: &mut Vec<u8>, headers: &[(String, Option<Vec<u8>>)]) {
    out.extend_from_slice(&(headers.len() as u32).to_be_bytes());
    for (name, value) in headers {
        out.extend_from_slice(&(name.len() as u32).to_be_bytes());
        out.extend_from_slice(name.as_bytes());
        match value {
            None => out.extend_from_slice(&(-1i32).to_be_bytes()),
            Some(v) => {
                out.extend_from_slice(&(v.len() as i32).to_be_bytes());
                out.extend_from_slice(v);
            }
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("outbox headers are corrupt at byte {0}")]
pub struct CorruptHeaders(usize);

pub fn decode(bytes: &[u8]) -> Result<Headers, CorruptHeaders> {
    let mut pos = 0usize;
    let mut take = |n: usize| -> Result<&[u8], CorruptHeaders> {
        let end = pos.checked_add(n).ok_or(CorruptHeaders(pos))?;
        let slice = bytes.get(pos..end).ok_or(CorruptHeaders(pos))?;
        pos = end;
        Ok(slice)
    };
    let count = u32::from_be_bytes(take(4)?.try_into().expect("4 bytes"));
    let mut headers = Vec::with_capacity(count.min(1024) as usize);
    for _ in 0..count {
        let name_len = u32::from_be_bytes(take(4)?.try_into().expect("4 bytes")) as usize;
        let name = String::from_utf8_lossy(take(name_len)?).into_owned();
        let value_len = i32::from_be_bytes(take(4)?.try_into().expect("4 bytes"));
        let value = if value_len < 0 {
            None
        } else {
            Some(take(value_len as usize)?.to_vec())
        };
        headers.push((name, value));
    }
    Ok(headers)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_repeated_null_and_binary_headers() {
        let h: Headers = vec![
            ("a".into(), Some(b"1".to_vec())),
            ("a".into(), Some(vec![0, 255, 7])),
            ("empty".into(), Some(vec![])),
            ("null".into(), None),
        ];
        assert_eq!(decode(&encode(&h)).unwrap(), h);
        assert_eq!(decode(&encode(&[])).unwrap(), Vec::new());
    }

    #[test]
    fn truncated_input_is_an_error_not_a_panic() {
        let bytes = encode(&[("name".into(), Some(b"value".to_vec()))]);
        for cut in 0..bytes.len() {
            assert!(decode(&bytes[..cut]).is_err(), "cut at {cut}");
        }
    }
}
