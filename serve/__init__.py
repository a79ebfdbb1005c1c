"""Online: the router core (`core`, NumPy, no Ray Serve), the Serve app (`app`), the pool's backends
(`backends`) and the batch routing job (`batch`). Nothing here imports `training`."""
