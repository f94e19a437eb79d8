"""Plugin processes started and supervised by the agent."""
