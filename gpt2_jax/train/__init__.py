"""The jitted train step, its builder, the preflight, the loop and its hooks, monitor,
trackers, summary.
"""
