//! The size and shape limits a shadow service enforces. Defaults are AWS IoT
//! Core's, so devices written against AWS behave the same here.

/// Limits applied to update requests and to the resulting shadow state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest serialized `desired` + `reported` state after a merge.
    pub max_state_bytes: usize,
    /// Deepest object nesting allowed inside `desired` or `reported`.
    pub max_depth: usize,
    /// Largest request payload accepted at all.
    pub max_request_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_state_bytes: 8 * 1024,
            max_depth: 6,
            max_request_bytes: 128 * 1024,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_aws_values() {
        let l = Limits::default();
        assert_eq!(
            (l.max_state_bytes, l.max_depth, l.max_request_bytes),
            (8192, 6, 131072)
        );
    }
}
