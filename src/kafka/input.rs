//! Copying a consumed message out of librdkafka's buffer, header names included as bytes.

use rdkafka::message::BorrowedMessage;
use rdkafka::Message;

use crate::model::headers::Headers;
use crate::model::InputMessage;

/// A consumed message as an [`InputMessage`], so a batch can outlive the poll.
pub fn input_message(m: &BorrowedMessage<'_>) -> InputMessage {
    let (headers, header_names_utf8) = read_headers(m);
    InputMessage {
        header_names_utf8,
        topic: m.topic().to_string(),
        partition: m.partition(),
        offset: m.offset(),
        timestamp_ms: m.timestamp().to_millis(),
        key: m.key().map(<[u8]>::to_vec),
        value: m.payload().map(<[u8]>::to_vec),
        headers,
    }
}

/// The headers of a consumed message, and whether every header *name* was UTF-8.
///
/// rdkafka's safe accessor (`Headers::get`/`iter`) unwraps the conversion of each name to
/// `&str`, so one message whose header name is not UTF-8 (any producer can send one)
/// would panic the process; it would restart at the same offset and panic again, and so
/// would every replica the partition moves to. The names are read here as bytes instead,
/// through librdkafka's own C accessor; a name that is not UTF-8 is kept lossily (U+FFFD)
/// and reported, and the pipeline dead-letters the message (`header_not_utf8`).
#[allow(unsafe_code)]
fn read_headers(message: &BorrowedMessage<'_>) -> (Headers, bool) {
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
