"""Training methods on top of the plain late-fusion loop: DGL, DAGR (+ Pareto), SAM, augmentation."""
