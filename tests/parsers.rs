//! Robustness of everything that parses client input: 20,000 deterministic random mutations of
//! valid messages and positions each; the parsers must answer (a value or an error), never panic.
//! (The same properties are fuzzed without bounds by `fuzz/`, on demand.)

use pgrelay::capture::position::{Position, PositionCodec};
use pgrelay::protocol;

/// xorshift64*: deterministic, so a failure reproduces.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

const INTERESTING: &[&str] = &[
    "\"",
    "\\",
    "{",
    "}",
    "[",
    "]",
    ":",
    ",",
    "null",
    "true",
    "1e999",
    "-0",
    "\u{0}",
    "é",
    "\u{10FFFF}",
    "~",
    ".",
    "_",
    "18446744073709551616",
    "\"type\"",
    "\"room\"",
    "\"since\"",
    "\"ref\"",
];

fn mutate(rng: &mut Rng, input: &str) -> String {
    let mut chars: Vec<char> = input.chars().collect();
    for _ in 0..=rng.below(4) {
        let at = rng.below(chars.len() + 1);
        match rng.below(5) {
            0 if !chars.is_empty() => {
                chars.remove(at.min(chars.len() - 1));
            }
            1 => chars.truncate(at),
            2 => {
                let piece = INTERESTING[rng.below(INTERESTING.len())];
                for (i, c) in piece.chars().enumerate() {
                    chars.insert((at + i).min(chars.len()), c);
                }
            }
            3 if !chars.is_empty() => {
                let i = at.min(chars.len() - 1);
                chars[i] = char::from_u32(rng.next() as u32 % 0x250).unwrap_or('x');
            }
            _ => {
                let dup: Vec<char> = chars[at.min(chars.len())..].to_vec();
                chars.extend(dup);
            }
        }
    }
    chars.into_iter().collect()
}

#[test]
fn the_message_parser_never_panics_on_mutated_input() {
    let seeds = [
        r#"{"type":"auth","token":"eyJ.x.y","ref":"1"}"#,
        r#"{"type":"join","room":"project:42","since":"p123","ref":"a"}"#,
        r#"{"type":"leave","room":"task:7"}"#,
        r#"{"type":"presence","room":"task:7","meta":{"tab":1}}"#,
        r#"{"type":"typing","room":"task:7","typing":true}"#,
        r#"{"type":"ping"}"#,
    ];
    let mut rng = Rng(0x5eed_1234_abcd_0001);
    let mut parsed = 0;
    for i in 0..20_000 {
        let input = mutate(&mut rng, seeds[i % seeds.len()]);
        if protocol::parse(&input).is_ok() {
            parsed += 1;
        }
    }
    assert!(
        parsed > 0 && parsed < 20_000,
        "the mutations exercise both outcomes: {parsed}"
    );
}

#[test]
fn positions_never_panic_and_whatever_opens_round_trips() {
    let codec = PositionCodec::new(&[9; 32]);
    let plain: Position = "100.105.100_103~104.110.104~42".parse().expect("valid");
    let seeds = [codec.seal(&plain), plain.to_string(), "774.774.".to_owned()];
    let mut rng = Rng(0x5eed_1234_abcd_0002);
    for i in 0..20_000 {
        let input = mutate(&mut rng, &seeds[i % seeds.len()]);
        if let Ok(position) = codec.open(&input) {
            assert_eq!(
                codec.open(&codec.seal(&position)),
                Ok(position.clone()),
                "{input:?}"
            );
            assert_eq!(
                position.to_string().parse::<Position>(),
                Ok(position),
                "{input:?}"
            );
        }
    }
}
