"""Operator tooling: the admin API client and the commands built on it."""
