//! Rendezvous (highest-random-weight) hashing: each account ranks the servers by a score of
//! (account, server name); it goes to the best-scored server that can take it. A server that
//! leaves or joins changes only its own accounts' choice, and every process with the same
//! servers and the same hash agrees without talking. The hash is SHA-256, fixed for good, so
//! that replicas of different builds agree too.

/// The score of `server` (of `weight`) for `account`: weighted as Schindelhauer and
/// Schomaker's logarithmic method, so that a server of weight 2 gets twice the accounts.
pub fn score(account: &str, server: &str, weight: u32) -> f64 {
    let mut input = Vec::with_capacity(account.len() + server.len() + 1);
    input.extend_from_slice(account.as_bytes());
    input.push(0);
    input.extend_from_slice(server.as_bytes());
    let digest = ring::digest::digest(&ring::digest::SHA256, &input);
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest.as_ref()[..8]);
    // 53 bits make an exact f64 in (0, 1]: never 0, whose logarithm is infinite.
    let bits = u64::from_be_bytes(first) >> 11;
    let uniform = (bits + 1) as f64 / (1u64 << 53) as f64;
    f64::from(weight) / -uniform.ln().min(-f64::MIN_POSITIVE)
}

/// The index of the best-scored of `servers` (name, weight) for `account`.
pub fn best<'a>(account: &str, servers: impl Iterator<Item = (&'a str, u32)>) -> Option<usize> {
    servers
        .enumerate()
        .map(|(index, (name, weight))| (index, score(account, name, weight)))
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .map(|(index, _)| index)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn choose(account: &str, servers: &[(&str, u32)]) -> String {
        let index = best(account, servers.iter().copied()).unwrap();
        servers[index].0.to_owned()
    }

    #[test]
    fn only_the_removed_servers_accounts_move() {
        let three = [("a", 1), ("b", 1), ("c", 1)];
        let two = [("a", 1), ("c", 1)];
        let mut moved = 0;
        for n in 0..3000 {
            let account = format!("user{n}@example.test");
            let before = choose(&account, &three);
            let after = choose(&account, &two);
            if before != "b" {
                assert_eq!(before, after, "{account} moved though its server stayed");
            } else {
                moved += 1;
            }
        }
        // About a third each.
        assert!((800..1200).contains(&moved), "{moved}");
    }

    #[test]
    fn weights_share_the_accounts() {
        let servers = [("small", 1), ("large", 3)];
        let large = (0..4000)
            .filter(|n| choose(&format!("u{n}"), &servers) == "large")
            .count();
        assert!((2800..3200).contains(&large), "{large}");
    }

    #[test]
    fn the_score_is_fixed_across_builds() {
        // Computed apart from this code (Python's hashlib): a change here would send accounts
        // to other servers on upgrade, and replicas of two builds would disagree.
        let servers = [("imap1", 1), ("imap2", 1), ("imap3", 1)];
        assert!((score("alice@example.test", "imap1", 1) - 22.836173).abs() < 1e-5);
        assert!((score("carol@example.test", "imap2", 1) - 0.743888).abs() < 1e-5);
        assert_eq!(choose("alice@example.test", &servers), "imap1");
        assert_eq!(choose("carol@example.test", &servers), "imap3");
        let reversed = [("imap3", 1), ("imap2", 1), ("imap1", 1)];
        assert_eq!(choose("alice@example.test", &reversed), "imap1");
    }
}
