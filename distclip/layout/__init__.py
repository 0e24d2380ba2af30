"""Which ranks hold which part of each gradient: marks, discovery and the plan kept across calls."""
