"""Collection schemas: the model (pure) and its compiled validator."""
