"""Fleet mode: what several replicas share through Redis (optional) and PostgreSQL."""
