"""Small shared utilities: configuration parsing, the host-pool reaper. No import-time side effects."""
