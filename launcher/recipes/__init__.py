"""User-level recipe code that conf/recipe/*.yaml names with _target_."""
