"""Training: the engine and loop (plain torch) and their runners."""
