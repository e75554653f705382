"""mesh-llm blackboard: a gossip-replicated message board for agents."""
