//! Exchanges of the in-process broker: bindings and routing.

use crate::topology::{ExchangeKind, ExchangeSpec};

/// An exchange and the queues bound to it.
#[derive(Debug)]
pub(crate) struct Exchange {
    /// How it was declared.
    pub(crate) spec: ExchangeSpec,
    /// `(binding key, queue)`, each once.
    bindings: Vec<(String, String)>,
}

impl Exchange {
    pub(crate) fn new(spec: ExchangeSpec) -> Self {
        Self {
            spec,
            bindings: Vec::new(),
        }
    }

    /// Binds `queue` with `key`; binding twice is one binding.
    pub(crate) fn bind(&mut self, queue: &str, key: &str) {
        let known = self
            .bindings
            .iter()
            .any(|(bound_key, bound_queue)| bound_key == key && bound_queue == queue);
        if !known {
            self.bindings.push((key.to_string(), queue.to_string()));
        }
    }

    /// Removes every binding of `queue` (the queue was deleted).
    pub(crate) fn unbind_queue(&mut self, queue: &str) {
        self.bindings
            .retain(|(_, bound_queue)| bound_queue != queue);
    }

    /// The queues a message with `routing_key` goes to, each once, in binding order.
    pub(crate) fn route(&self, routing_key: &str) -> Vec<String> {
        let mut queues: Vec<String> = Vec::new();
        for (key, queue) in &self.bindings {
            let matches = match self.spec.kind {
                ExchangeKind::Direct => key == routing_key,
                ExchangeKind::Topic => topic_matches(key, routing_key),
                ExchangeKind::Fanout => true,
            };
            if matches && !queues.contains(queue) {
                queues.push(queue.clone());
            }
        }
        queues
    }
}

/// Whether a topic binding `pattern` matches `routing_key`: both are
/// `.`-separated words; `*` stands for exactly one word, `#` for zero or more.
pub(crate) fn topic_matches(pattern: &str, routing_key: &str) -> bool {
    let pattern: Vec<&str> = pattern.split('.').collect();
    let key: Vec<&str> = routing_key.split('.').collect();
    words_match(&pattern, &key)
}

fn words_match(pattern: &[&str], key: &[&str]) -> bool {
    match pattern.split_first() {
        None => key.is_empty(),
        Some((&"#", rest)) => (0..=key.len()).any(|skipped| words_match(rest, &key[skipped..])),
        Some((&"*", rest)) => key
            .split_first()
            .is_some_and(|(_, key_rest)| words_match(rest, key_rest)),
        Some((word, rest)) => key
            .split_first()
            .is_some_and(|(first, key_rest)| first == word && words_match(rest, key_rest)),
    }
}
