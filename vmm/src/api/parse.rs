//! Parsing a request line. Everything is checked before anything is done: a request that
//! could be read two ways is refused, not guessed at.

use std::fmt;

use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use serde_json::{Map, Value};

use super::{ApiError, Request};

/// A JSON object whose keys are all different. serde_json's `Value` keeps the last of a
/// repeated key, so `{"cmd":"status","cmd":"crash"}` would be a crash: this refuses it.
struct UniqueKeys(Map<String, Value>);

/// The message of a repeated key (recognized again to give [`ApiError::DuplicateKey`]).
const DUPLICATE: &str = "duplicate key `";

impl<'de> Deserialize<'de> for UniqueKeys {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Keys;
        impl<'de> Visitor<'de> for Keys {
            type Value = UniqueKeys;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a request is a JSON object, as {\"cmd\":\"status\"}")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<UniqueKeys, A::Error> {
                let mut map = Map::new();
                while let Some((key, value)) = access.next_entry::<String, Value>()? {
                    if map.contains_key(&key) {
                        return Err(de::Error::custom(format_args!("{DUPLICATE}{key}`")));
                    }
                    map.insert(key, value);
                }
                Ok(UniqueKeys(map))
            }
        }
        deserializer.deserialize_map(Keys)
    }
}

/// Parses one request line; the error says what is wrong, for the error reply.
pub fn parse(line: &str) -> Result<Request, ApiError> {
    let bad = |e: serde_json::Error| {
        let text = e.to_string();
        match text.strip_prefix(DUPLICATE).and_then(|rest| rest.split('`').next()) {
            Some(key) => ApiError::DuplicateKey(key.into()),
            None => ApiError::BadRequest(text),
        }
    };
    let UniqueKeys(object) = serde_json::from_str(line).map_err(bad)?;
    // serde does not reject unknown fields of an internally tagged enum: check them here.
    let is_checkpoint = object.get("cmd").and_then(Value::as_str) == Some("checkpoint");
    if let Some(key) = object.keys().find(|k| *k != "cmd" && !(is_checkpoint && *k == "timeout_ms")) {
        return Err(ApiError::UnknownField(key.clone()));
    }
    serde_json::from_value(Value::Object(object)).map_err(bad)
}

#[cfg(test)]
mod tests {
    use rand::rngs::SmallRng;
    use rand::{RngExt, SeedableRng};

    use super::*;

    #[test]
    fn requests_parse_and_bad_ones_say_why() {
        assert_eq!(parse(r#"{"cmd":"status"}"#), Ok(Request::Status));
        assert_eq!(parse(r#"{"cmd":"checkpoint"}"#), Ok(Request::Checkpoint { timeout_ms: None }));
        assert_eq!(parse(r#"{"cmd":"checkpoint","timeout_ms":50}"#), Ok(Request::Checkpoint { timeout_ms: Some(50) }));
        for bad in
            ["", "{", "null", "[]", r#"{"cmd":"fly"}"#, r#"{"cmd":"status","x":1}"#, r#"{"cmd":7}"#, "\u{0}\u{ff}"]
        {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_repeated_key_is_refused_whichever_it_is() {
        assert_eq!(parse(r#"{"cmd":"status","cmd":"crash"}"#), Err(ApiError::DuplicateKey("cmd".into())));
        assert_eq!(parse(r#"{"cmd":"crash","cmd":"crash"}"#), Err(ApiError::DuplicateKey("cmd".into())));
        assert_eq!(
            parse(r#"{"cmd":"checkpoint","timeout_ms":5,"timeout_ms":0}"#),
            Err(ApiError::DuplicateKey("timeout_ms".into()))
        );
        let e = parse(r#"{"cmd":"status","cmd":"crash"}"#).unwrap_err().to_string();
        assert!(e.contains("bad request") && e.contains("duplicate key `cmd`"), "{e}");
        // Keys repeated inside a value are no concern of the request's (and refused anyway).
        assert!(parse(r#"{"cmd":{"a":1,"a":2}}"#).is_err());
    }

    #[test]
    fn serialized_requests_parse_back() {
        for request in
            [Request::Status, Request::Checkpoint { timeout_ms: Some(7) }, Request::Checkpoint { timeout_ms: None }]
        {
            let line = serde_json::to_string(&request).unwrap();
            assert_eq!(parse(&line), Ok(request), "{line}");
        }
        assert_eq!(serde_json::to_string(&Request::Pause).unwrap(), r#"{"cmd":"pause"}"#);
    }

    #[test]
    fn random_input_never_panics_the_parser() {
        let mut rng = SmallRng::seed_from_u64(0x9e37_79b9_7f4a_7c15);
        let alphabet = br#"{}[]":,cmdstatuheckpoin0123456789 \u"#;
        for _ in 0..50_000 {
            let len = rng.random_range(0..40);
            let line: String = (0..len).map(|_| alphabet[rng.random_range(0..alphabet.len())] as char).collect();
            let _ = parse(&line);
        }
    }
}
