"""E4T (encoder-based domain tuning) on the demo world: see docs/e4t.md."""
