//! Small changes to a document's bytes or lines, for property tests that feed decoders mutated
//! versions of valid inputs (the never-panic tests of the config, manifest and object
//! decoders). Each test brings the tokens and odd values of its own format.

use proptest::prelude::*;

/// One change to a document's bytes or lines. Positions are taken modulo the length.
#[derive(Debug, Clone)]
pub enum Mutation {
    FlipBit(usize, u8),
    SetByte(usize, u8),
    Insert(usize, Vec<u8>),
    Delete(usize, usize),
    Truncate(usize),
    DuplicateLine(usize),
    DeleteLine(usize),
    SwapLines(usize, usize),
    /// `key: value` becomes `key: <odd scalar>` (a line without a colon gets it appended).
    ReplaceValue(usize, String),
}

/// Mutations that insert `tokens` (bytes that mean something to the format) or random bytes.
/// With `odd_values` (scalars at the edges of the fields' types) they also work on lines:
/// duplicate, delete, swap, and replace a value; without, they are byte changes only.
pub fn mutations(
    tokens: &'static [&'static str],
    odd_values: &'static [&'static str],
) -> BoxedStrategy<Mutation> {
    let at = any::<usize>();
    let inserted = prop_oneof![
        prop::sample::select(tokens).prop_map(|t| t.as_bytes().to_vec()),
        prop::collection::vec(any::<u8>(), 1..6),
    ];
    if odd_values.is_empty() {
        return prop_oneof![
            (at, 0u8..8).prop_map(|(i, b)| Mutation::FlipBit(i, b)),
            (at, any::<u8>()).prop_map(|(i, b)| Mutation::SetByte(i, b)),
            (at, inserted).prop_map(|(i, b)| Mutation::Insert(i, b)),
            (at, 1usize..16).prop_map(|(i, n)| Mutation::Delete(i, n)),
            at.prop_map(Mutation::Truncate),
        ]
        .boxed();
    }
    prop_oneof![
        1 => (at, 0u8..8).prop_map(|(i, b)| Mutation::FlipBit(i, b)),
        1 => (at, any::<u8>()).prop_map(|(i, b)| Mutation::SetByte(i, b)),
        2 => (at, inserted).prop_map(|(i, b)| Mutation::Insert(i, b)),
        1 => (at, 1usize..16).prop_map(|(i, n)| Mutation::Delete(i, n)),
        1 => at.prop_map(Mutation::Truncate),
        1 => at.prop_map(Mutation::DuplicateLine),
        1 => at.prop_map(Mutation::DeleteLine),
        1 => (at, at).prop_map(|(a, b)| Mutation::SwapLines(a, b)),
        3 => (at, prop::sample::select(odd_values))
            .prop_map(|(i, v)| Mutation::ReplaceValue(i, v.to_owned())),
    ]
    .boxed()
}

/// Applies one mutation.
pub fn mutate(doc: &mut Vec<u8>, m: &Mutation) {
    let len = doc.len();
    match m {
        Mutation::FlipBit(i, b) if len > 0 => doc[i % len] ^= 1 << b,
        Mutation::SetByte(i, v) if len > 0 => doc[i % len] = *v,
        Mutation::Insert(i, bytes) => {
            let at = i % (len + 1);
            doc.splice(at..at, bytes.iter().copied());
        }
        Mutation::Delete(i, n) if len > 0 => {
            let at = i % len;
            doc.drain(at..(at + n).min(len));
        }
        Mutation::Truncate(i) => doc.truncate(i % (len + 1)),
        Mutation::DuplicateLine(i) | Mutation::DeleteLine(i) | Mutation::ReplaceValue(i, _) => {
            // Splitting always gives at least one line.
            let mut lines = split_lines(doc);
            let at = i % lines.len();
            match m {
                Mutation::DuplicateLine(_) => lines.insert(at, lines[at].clone()),
                Mutation::DeleteLine(_) => {
                    lines.remove(at);
                }
                Mutation::ReplaceValue(_, value) => {
                    let line = &mut lines[at];
                    let colon = line.iter().position(|b| *b == b':').unwrap_or(line.len());
                    line.truncate(colon);
                    line.extend_from_slice(b": ");
                    line.extend_from_slice(value.as_bytes());
                }
                _ => unreachable!(),
            }
            *doc = lines.join(&b'\n');
        }
        Mutation::SwapLines(a, b) => {
            let mut lines = split_lines(doc);
            let n = lines.len();
            lines.swap(a % n, b % n);
            *doc = lines.join(&b'\n');
        }
        _ => {}
    }
}

fn split_lines(doc: &[u8]) -> Vec<Vec<u8>> {
    doc.split(|b| *b == b'\n').map(<[u8]>::to_vec).collect()
}
