//! ftvm-repl: everything about keeping a backup in step with the primary.
