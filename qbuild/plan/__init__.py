"""Planning: keys, the stage graph and the pure planner."""
