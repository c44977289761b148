"""Example configurations, shipped as ``featcache.config_examples`` (see pyproject.toml)."""
