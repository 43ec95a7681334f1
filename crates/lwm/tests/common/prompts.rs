//! Prompt text shared by the lwm and lwm-cli integration tests (lwm-cli includes this file
//! by path).

/// `n` short records with numbers, about 18 tokens each: a long prompt for ring tests.
pub fn records(n: usize) -> String {
    (0..n)
        .map(|i| {
            format!(
                "Record {i}: vault {} holds the number {}. ",
                i * 7 % 31,
                i * 7919 % 100003
            )
        })
        .collect()
}
