"""shaper's tests, one package per tier (README, "Tests"): imported as `tests.<tier>.<module>`, so two tiers may
each have a test_api.py, and shared helpers come from `tests.support` with no sys.path edits."""
