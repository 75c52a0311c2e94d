"""Latency: measure modules on a backend (profile) and predict architectures from a lookup table (table)."""
