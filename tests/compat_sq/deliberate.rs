//! The requests sq-cloud answers differently from SQ 0.6.0 on purpose, each with the answer it
//! gives instead. The README's "Compatibility with SQ 0.6.0" table lists the same cases.

use crate::raw::Answer;

/// What sq-cloud answers instead of SQ's answer.
#[derive(Debug)]
pub enum Expect {
    /// This status, and a body holding every one of these texts.
    Refused(u16, &'static [&'static str]),
    /// 200 and exactly this body.
    Body(&'static str),
}

impl Expect {
    pub fn holds(&self, answer: &Answer) -> bool {
        let body = String::from_utf8_lossy(&answer.body_bytes()).into_owned();
        match self {
            Expect::Refused(status, texts) => {
                answer.status == Some(*status) && texts.iter().all(|t| body.contains(t))
            }
            Expect::Body(text) => answer.status == Some(200) && body == *text,
        }
    }
}

pub struct Deliberate {
    /// The case's name in its case file.
    pub case: &'static str,
    pub expect: Expect,
}

use Expect::{Body, Refused};

/// Refusals of a coordinate SQ misreads: the canonical form, and SQ's reading.
const WORDS: &[&str] = &["L.S.S/C.V.B/C.S.S", "SQ 0.6.0 would"];
/// Refusals of text SQ would split at a dimension break.
const BREAK: &[&str] =
    &["dimension break", "write each scroll at its own coordinate", "SQ 0.6.0 would store it"];
/// Refusals of bytes that are not UTF-8.
const NOT_UTF8: &[&str] = &["not valid UTF-8", "send UTF-8", "replaced by U+FFFD"];

const fn d(case: &'static str, expect: Expect) -> Deliberate {
    Deliberate { case, expect }
}

pub const DELIBERATE: &[Deliberate] = &[
    // Server paths and connection counters: the tenant's view instead.
    d(
        "print.sh health: status (no p)",
        Body("Hosting: .phext\nConnection ID: 0\nPhext Size: 0\nScrolls: 1"),
    ),
    d(
        "status of a document",
        Body("Hosting: src-body.phext\nConnection ID: 0\nPhext Size: 28\nScrolls: 3"),
    ),
    d("load", Body("Loaded hello.phext")),
    d("load a document", Body("Loaded src-body.phext")),
    d("load a new document", Body("Loaded src-new.phext")),
    // JSON that is JSON.
    d(
        "json-export of backslash and tab",
        Body("[\n   { \"coord\": \"1.1.1/1.1.1/1.1.1\", \"scroll\": \"a\\\\b\\tc\" }\n]\n"),
    ),
    // Coordinates SQ misreads.
    d("ranch-choir coord with word", Refused(400, WORDS)),
    d(
        "skill shorthand coord",
        Refused(400, &["SQ 0.6.0 would read it as 1.1.0/0.1.1/1.1.1", "L.S.S/C.V.B/C.S.S"]),
    ),
    d("coordinate of letters only", Refused(400, &["L.S.S/C.V.B/C.S.S", "use 1.1.1/1.1.1/1.1.1"])),
    d("coordinate with ten parts", Refused(400, &["L.S.S/C.V.B/C.S.S", "use 1.1.1/1.1.1/1.1.5"])),
    d("coordinate with a space inside", Refused(400, WORDS)),
    d("coordinate with a zero", Refused(400, &["components start at 1", "not a coordinate"])),
    d(
        "coord >100 (2026.2.22/1.1.1/1.1.1)",
        Refused(400, &["from 1 to 999", "move the text to 999.2.22/1.1.1/1.1.1"]),
    ),
    d(
        "coordinate with a component of 1000",
        Refused(400, &["from 1 to 999", "move the text to 999.1.1/1.1.1/1.1.1"]),
    ),
    // Text SQ corrupts.
    d("text with a scroll break", Refused(400, BREAK)),
    d("text with a library break in the body", Refused(400, BREAK)),
    d("text with invalid UTF-8 in s", Refused(400, NOT_UTF8)),
    d("body with invalid UTF-8", Refused(400, NOT_UTF8)),
    d("get after refusals", Body("")),
    // SQ's request-line parser keeps ` HTTP/1.0` in the last parameter.
    d("exodroid update HTTP/1.0 +key", Body("Updated 11 bytes")),
    d("read back (HTTP/1.1)", Body("hello world")),
    d("exodroid select HTTP/1.0 +key", Body("hello world")),
    // SQ matches route names by prefix.
    d("route name with a suffix", Refused(404, &["Not Found"])),
];
