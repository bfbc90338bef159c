//! The partition a key lands in, as the producer that wrote it chose: a label topic keyed by
//! prediction id is joined partition by partition when it is partitioned like the record topic
//! (same partition count, same partitioner), as Kafka Streams joins co-partitioned topics.

/// How the producer of a topic picked partitions for keyed messages.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Partitioner {
    /// librdkafka's default (sluicegate's tee, confluent-kafka clients): CRC-32 of the key.
    #[default]
    ConsistentRandom,
    /// The Java producer's default (and librdkafka's `murmur2_random`): murmur2 of the key.
    Murmur2Random,
}

impl Partitioner {
    /// The partition of `key` among `partitions`; `None` for an empty key (both place those
    /// at random) or no partitions.
    pub fn partition(self, key: &[u8], partitions: i32) -> Option<i32> {
        if key.is_empty() || partitions <= 0 {
            return None;
        }
        let n = partitions as u32;
        Some(match self {
            Partitioner::ConsistentRandom => crc32fast::hash(key) % n,
            Partitioner::Murmur2Random => (murmur2(key) & 0x7fff_ffff) % n,
        } as i32)
    }
}

/// Kafka's murmur2 (`org.apache.kafka.common.utils.Utils.murmur2`), which librdkafka copies.
fn murmur2(data: &[u8]) -> u32 {
    const SEED: u32 = 0x9747_b28c;
    const M: u32 = 0x5bd1_e995;
    let mut h = SEED ^ data.len() as u32;
    let mut chunks = data.chunks_exact(4);
    for c in &mut chunks {
        let mut k = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> 24;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M) ^ k;
    }
    let tail = chunks.remainder();
    if !tail.is_empty() {
        for (i, b) in tail.iter().enumerate() {
            h ^= u32::from(*b) << (8 * i);
        }
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^ (h >> 15)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn murmur2_matches_kafkas_own_test_vectors() {
        // From Kafka's UtilsTest.testMurmur2 (signed 32-bit results).
        let cases: [(&[u8], i32); 6] = [
            (b"21", -973_932_308),
            (b"foobar", -790_332_482),
            (b"a-little-bit-long-string", -985_981_536),
            (b"a-little-bit-longer-string", -1_486_304_829),
            (
                b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8",
                -58_897_971,
            ),
            (b"abc", 479_470_107),
        ];
        for (key, want) in cases {
            assert_eq!(
                murmur2(key) as i32,
                want,
                "{}",
                String::from_utf8_lossy(key)
            );
        }
    }

    #[test]
    fn empty_keys_and_no_partitions_have_no_partition() {
        assert_eq!(Partitioner::ConsistentRandom.partition(b"", 3), None);
        assert_eq!(Partitioner::Murmur2Random.partition(b"k", 0), None);
    }
}
