//! Operation ids: time-ordered version-7 uuids (48-bit Unix milliseconds, then 74 random bits
//! from a per-backend xoshiro256** generator seeded from PostgreSQL's strong random source).
//! The layout (version, variant, where the millisecond prefix goes) is the `uuid` crate's
//! `Builder`; only the random bits are ours, so ids cost no system call.
//! Time order keeps inserts into the ledger's operation_id index at its right edge, so the cost
//! of a call does not grow with the ledger (random v4 ids touch a random leaf page each time). Operation ids need to be unique, not secret (they are not
//! capabilities: only service callers can act on one), and drawing 16 bytes from the strong
//! source on every call cost about 4% of a consume_credits_v2 call (callgrind).

/// xoshiro256** (Blackman and Vigna): 256-bit state, period 2^256 - 1.
#[derive(Debug, Clone)]
pub struct OpIds {
    s: [u64; 4],
}

impl OpIds {
    /// From 32 random bytes. An all-zero seed (the one fixed point) is replaced.
    pub fn from_seed(seed: [u8; 32]) -> Self {
        let mut s = [0u64; 4];
        for (i, chunk) in seed.chunks(8).enumerate() {
            let mut b = [0u8; 8];
            b.copy_from_slice(chunk);
            s[i] = u64::from_le_bytes(b);
        }
        if s == [0; 4] {
            s = [0x9E37_79B9_7F4A_7C15, 0xBF58_476D_1CE4_E5B9, 0x94D0_49BB_1331_11EB, 1];
        }
        OpIds { s }
    }

    fn next_u64(&mut self) -> u64 {
        let result = self.s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = self.s[1] << 17;
        self.s[2] ^= self.s[0];
        self.s[3] ^= self.s[1];
        self.s[1] ^= self.s[2];
        self.s[0] ^= self.s[3];
        self.s[2] ^= t;
        self.s[3] = self.s[3].rotate_left(45);
        result
    }

    /// The next id for time `unix_ms`: a version-7, variant-1 uuid (RFC 9562).
    pub fn next_uuid_v7(&mut self, unix_ms: u64) -> [u8; 16] {
        let mut r = [0u8; 10];
        r[..8].copy_from_slice(&self.next_u64().to_le_bytes());
        r[8..].copy_from_slice(&self.next_u64().to_le_bytes()[..2]);
        uuid::Builder::from_unix_timestamp_millis(unix_ms, &r).into_uuid().into_bytes()
    }

    /// The next id, formatted as a version-4, variant-1 uuid.
    pub fn next_uuid(&mut self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&self.next_u64().to_le_bytes());
        b[8..].copy_from_slice(&self.next_u64().to_le_bytes());
        uuid::Builder::from_random_bytes(b).into_uuid().into_bytes()
    }
}

/// Length of a uuid's text (`8-4-4-4-12` hex digits).
pub const UUID_TEXT_LEN: usize = 36;

/// A uuid as text, the way PostgreSQL prints it (lower-case, hyphenated).
pub fn uuid_text(bytes: &[u8; 16]) -> String {
    let mut buf = [0u8; UUID_TEXT_LEN];
    uuid::Uuid::from_bytes(*bytes).hyphenated().encode_lower(&mut buf).to_owned()
}

/// Parse a uuid in the forms PostgreSQL prints and clients send: hyphenated
/// (`8-4-4-4-12`) or 32 bare hex digits, either case, optionally in braces, surrounding
/// whitespace ignored. Hyphens elsewhere and the `urn:uuid:` form are refused.
pub fn parse_uuid(s: &str) -> Option<[u8; 16]> {
    let s = s.trim();
    let s = s.strip_prefix('{').and_then(|s| s.strip_suffix('}')).unwrap_or(s);
    if s.len() != 32 && s.len() != UUID_TEXT_LEN {
        return None;
    }
    uuid::Uuid::try_parse(s).ok().map(uuid::Uuid::into_bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashSet;

    #[test]
    fn ids_are_v4_and_unique() {
        let mut g = OpIds::from_seed([7; 32]);
        let mut seen = HashSet::new();
        for _ in 0..200_000 {
            let id = g.next_uuid();
            assert_eq!(id[6] >> 4, 4, "version 4");
            assert_eq!(id[8] >> 6, 0b10, "RFC 4122 variant");
            assert!(seen.insert(id), "repeated id");
        }
    }

    #[test]
    fn v7_ids_are_time_ordered_and_unique() {
        let mut g = OpIds::from_seed([9; 32]);
        let mut seen = HashSet::new();
        let mut last = [0u8; 16];
        for ms in [1_700_000_000_000u64, 1_700_000_000_001, 1_700_000_000_500, 1_800_000_000_000] {
            let id = g.next_uuid_v7(ms);
            assert_eq!(id[6] >> 4, 7, "version 7");
            assert_eq!(id[8] >> 6, 0b10, "RFC 9562 variant");
            assert_eq!(&id[..6], &ms.to_be_bytes()[2..], "48-bit millisecond prefix");
            assert!(id > last, "later milliseconds sort later");
            last = id;
        }
        for _ in 0..100_000 {
            assert!(seen.insert(g.next_uuid_v7(1_700_000_000_000)), "repeated id within one millisecond");
        }
    }

    #[test]
    fn different_seeds_give_different_streams() {
        let mut a = OpIds::from_seed([1; 32]);
        let mut b = OpIds::from_seed([2; 32]);
        assert_ne!(a.next_uuid(), b.next_uuid());
        let mut z = OpIds::from_seed([0; 32]);
        assert_ne!(z.next_uuid(), z.next_uuid());
    }

    /// The hand-written layout of 0.2.0, kept to check that the `uuid` crate's gives the same
    /// bytes from the same random stream.
    fn v7_before(g: &mut OpIds, unix_ms: u64) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[..6].copy_from_slice(&unix_ms.to_be_bytes()[2..]);
        b[6..14].copy_from_slice(&g.next_u64().to_le_bytes());
        b[14..].copy_from_slice(&g.next_u64().to_le_bytes()[..2]);
        b[6] = (b[6] & 0x0f) | 0x70;
        b[8] = (b[8] & 0x3f) | 0x80;
        b
    }

    fn v4_before(g: &mut OpIds) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&g.next_u64().to_le_bytes());
        b[8..].copy_from_slice(&g.next_u64().to_le_bytes());
        b[6] = (b[6] & 0x0f) | 0x40;
        b[8] = (b[8] & 0x3f) | 0x80;
        b
    }

    /// The lookup-table formatter of 0.2.0 (src/spi.rs).
    fn text_before(bytes: &[u8; 16]) -> String {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut out = String::with_capacity(36);
        for (i, b) in bytes.iter().enumerate() {
            if matches!(i, 4 | 6 | 8 | 10) {
                out.push('-');
            }
            out.push(HEX[(b >> 4) as usize] as char);
            out.push(HEX[(b & 0x0f) as usize] as char);
        }
        out
    }

    /// The parser of 0.2.0 (identity.rs): hyphens anywhere.
    fn parse_before(s: &str) -> Option<[u8; 16]> {
        let s = s.trim();
        let s = s.strip_prefix('{').and_then(|s| s.strip_suffix('}')).unwrap_or(s);
        let hex: Vec<u8> = s.bytes().filter(|&c| c != b'-').collect();
        if hex.len() != 32 || s.len() > 36 {
            return None;
        }
        let mut out = [0u8; 16];
        for (i, pair) in hex.chunks(2).enumerate() {
            let hi = (pair[0] as char).to_digit(16)?;
            let lo = (pair[1] as char).to_digit(16)?;
            out[i] = (hi * 16 + lo) as u8;
        }
        Some(out)
    }

    proptest! {
        #[test]
        fn same_ids_as_before(seed in any::<[u8; 32]>(), ms in 0u64..(1 << 48)) {
            let (mut a, mut b) = (OpIds::from_seed(seed), OpIds::from_seed(seed));
            for _ in 0..4 {
                prop_assert_eq!(a.next_uuid_v7(ms), v7_before(&mut b, ms));
                prop_assert_eq!(a.next_uuid(), v4_before(&mut b));
            }
        }

        #[test]
        fn same_text_as_before(bytes in any::<[u8; 16]>()) {
            let t = uuid_text(&bytes);
            prop_assert_eq!(&t, &text_before(&bytes));
            prop_assert_eq!(parse_uuid(&t), Some(bytes));
            prop_assert_eq!(parse_uuid(&t.to_uppercase()), Some(bytes));
            prop_assert_eq!(parse_uuid(&t.replace('-', "")), Some(bytes));
            prop_assert_eq!(parse_uuid(&format!(" {{{t}}} ")), Some(bytes));
        }

        /// Whatever the new parser accepts, the old one accepted with the same value.
        #[test]
        fn parse_accepts_no_more_than_before(s in "[{ ]?[0-9a-fA-FxX-]{30,38}[} ]?") {
            if let Some(v) = parse_uuid(&s) {
                prop_assert_eq!(parse_before(&s), Some(v));
            }
        }
    }

    #[test]
    fn parse_forms() {
        let a = [0x11u8; 16];
        assert_eq!(parse_uuid("11111111-1111-1111-1111-111111111111"), Some(a));
        assert_eq!(parse_uuid("{11111111-1111-1111-1111-111111111111}"), Some(a));
        assert_eq!(parse_uuid("11111111111111111111111111111111"), Some(a));
        // Refused now (PostgreSQL refuses them too); 0.2.0 accepted hyphens anywhere.
        assert_eq!(parse_uuid("1111111-1111-1111-1111-1111111111111"), None);
        assert_eq!(parse_uuid("urn:uuid:11111111-1111-1111-1111-111111111111"), None);
        assert_eq!(parse_uuid("zz111111-1111-1111-1111-111111111111"), None);
        assert_eq!(parse_uuid(""), None);
        assert_eq!(uuid_text(&a), "11111111-1111-1111-1111-111111111111");
    }

    #[test]
    fn bits_are_balanced() {
        // Each of the 122 random bits is set about half the time.
        let mut g = OpIds::from_seed([42; 32]);
        let mut ones = [0u32; 128];
        let n = 20_000;
        for _ in 0..n {
            let id = g.next_uuid();
            for (i, byte) in id.iter().enumerate() {
                for bit in 0..8 {
                    ones[i * 8 + bit] += ((byte >> bit) & 1) as u32;
                }
            }
        }
        let fixed = [6 * 8 + 4, 6 * 8 + 5, 6 * 8 + 6, 6 * 8 + 7, 8 * 8 + 6, 8 * 8 + 7];
        for (i, &c) in ones.iter().enumerate() {
            if !fixed.contains(&i) {
                assert!((9_000..11_000).contains(&c), "bit {i} set {c} times of {n}");
            }
        }
    }
}
