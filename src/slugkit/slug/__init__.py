"""The SLUG method itself: gradients (Alg. 1), layer importance / alignment / Pareto front (Alg. 2), the single
edit and its step-size search (Alg. 3). Short enough to check against the paper line by line."""
