"""Is the input what the model knows: out-of-distribution guard, reference statistics, drift."""
