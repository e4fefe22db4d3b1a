"""Listeners on the events protocol (`rom_agent.domain.events`): Prometheus, and a recorder
for tests. Tracing and fleet coordination subscribe the same way, without touching the core."""
