"""Reliability and security: hostile inputs, properties of the pure functions, and code-loading guarantees."""
