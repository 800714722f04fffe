"""Training on several processes: one flow for every engine, one small adapter per engine."""
