"""The embedded model zoo (see zoo/*/README.md for each model's card)."""
