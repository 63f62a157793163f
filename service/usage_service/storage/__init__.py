"""PostgreSQL storage: the pool, migrations and every query. The only place that knows tables."""
