"""deep-repro."""
