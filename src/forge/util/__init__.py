"""Small shared utilities: configuration parsing."""
