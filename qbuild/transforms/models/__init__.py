"""Per-family rewrites for the kv_cache transform, one module per family (looked up by config.model_type)."""
