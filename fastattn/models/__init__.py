"""Full models assembled from fastattn modules (added by the model issues)."""
