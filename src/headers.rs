//! Compact, lossless encoding of Kafka headers for the outbox `headers` column.
//!
//! Kafka headers are an ordered list of (name, optional bytes) that may repeat a name, so
//! neither JSON objects nor Postgres hstore keep them faithfully. The layout is:
//! `u32 count`, then per header `u32 name_len, name, i32 value_len (-1 = null), value`,
//! all big-endian.

use rdkafka::message::BorrowedMessage;

/// An ordered list of Kafka headers.
pub type Headers = Vec<(String, Option<Vec<u8>>)>;

/// The headers of a consumed message, and whether every header *name* was UTF-8.
///
/// rdkafka's safe accessor (`Headers::get`/`iter`) unwraps the conversion of each name to
/// `&str`, so one message whose header name is not UTF-8 (any producer can send one)
/// would panic the process; it would restart at the same offset and panic again, and so
/// would every replica the partition moves to. The names are read here as bytes instead,
/// through librdkafka's own C accessor; a name that is not UTF-8 is kept lossily (U+FFFD)
/// and reported, and the pipeline dead-letters the message (`header_not_utf8`).
#[allow(unsafe_code)]
pub fn read(message: &BorrowedMessage<'_>) -> (Headers, bool) {
    use rdkafka::bindings as rd;
    use rdkafka::types::RDKafkaRespErr;

    let mut headers = Vec::new();
    let mut names_utf8 = true;
    let mut native: *mut rd::rd_kafka_headers_t = std::ptr::null_mut();
    // SAFETY: `message.ptr()` is the live rd_kafka_message_t that `message` borrows for
    // its lifetime; librdkafka only parses its headers into a list the message owns.
    let err = unsafe { rd::rd_kafka_message_headers(message.ptr(), &mut native) };
    if err != RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR || native.is_null() {
        return (headers, names_utf8); // no headers
    }
    for idx in 0.. {
        let mut name: *const std::ffi::c_char = std::ptr::null();
        let mut value: *const std::ffi::c_void = std::ptr::null();
        let mut size: usize = 0;
        // SAFETY: `native` belongs to the message, which outlives this loop; librdkafka
        // writes pointers into its own buffers (or an error for an index past the end).
        let err =
            unsafe { rd::rd_kafka_header_get_all(native, idx, &mut name, &mut value, &mut size) };
        if err != RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR || name.is_null() {
            break;
        }
        // SAFETY: librdkafka stores header names NUL-terminated; `value` points at `size`
        // bytes (or is null for a null value). Both are copied before the message goes.
        let (name, value) = unsafe {
            (
                std::ffi::CStr::from_ptr(name).to_bytes(),
                (!value.is_null()).then(|| std::slice::from_raw_parts(value.cast::<u8>(), size)),
            )
        };
        let name = match std::str::from_utf8(name) {
            Ok(n) => n.to_string(),
            Err(_) => {
                names_utf8 = false;
                String::from_utf8_lossy(name).into_owned()
            }
        };
        headers.push((name, value.map(<[u8]>::to_vec)));
    }
    (headers, names_utf8)
}

pub fn encode(headers: &[(String, Option<Vec<u8>>)]) -> Vec<u8> {
    let size: usize = headers
        .iter()
        .map(|(k, v)| 8 + k.len() + v.as_ref().map_or(0, Vec::len))
        .sum();
    let mut out = Vec::with_capacity(4 + size);
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
    out
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
