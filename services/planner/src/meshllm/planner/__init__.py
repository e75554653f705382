"""The planner: decides which workers serve which models and publishes placements."""
