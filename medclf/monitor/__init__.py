"""Is the input what the model knows: out-of-distribution guard, reference statistics, drift, and the artifact opened with them."""
